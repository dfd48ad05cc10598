"""Span KV storage: the in-process store and its lower tiers (``tiers/``)."""
