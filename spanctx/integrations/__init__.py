"""spanctx inside other libraries; each integration is an optional extra."""
