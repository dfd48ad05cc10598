"""The session: one model's store, resolver, adapters and engine behind a lock; it resolves
a context, runs a final call and returns results with their stats."""
