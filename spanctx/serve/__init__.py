"""spanctx as a service: an OpenAI-compatible HTTP server with a span API (``app.py``), a
scheduler that batches concurrent requests (``scheduler.py``), a Python client
(``client.py``) and scale-out on Ray Serve with span-affinity routing (``ray_app.py``).

Nothing here is imported by the rest of spanctx; the server's dependencies are the
``serve`` extra (fastapi, uvicorn, prometheus-client) and Ray Serve the ``ray`` extra.
See docs/serving.md.
"""
