"""The KV cache layer: ``SpanKV`` tensors, the store and its index, key rotation (rope),
KV operations, the weight fingerprint that namespaces keys, and the store's lower tiers
(``tiers/``: host memory, disk, Redis)."""
