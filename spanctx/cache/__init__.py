"""The KV cache layer: ``SpanKV`` tensors, the store and its index, key rotation (rope),
KV operations and the weight fingerprint that namespaces keys."""
