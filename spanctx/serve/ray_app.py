"""Scale-out on Ray Serve: N model replicas behind one HTTP ingress, routed by span affinity.

- ``SpanctxReplica``: one runtime and its scheduler (``LocalBackend``) per replica, one
  GPU each (``num_gpus=1``) or N CPU replicas. Replicas share a tier store when the
  ``RuntimeSpec`` names one (``--tier redis://...``): a span computed on one replica is
  found by the others.
- ``SpanAffinityRouter``: a Ray Serve ``RequestRouter`` (the custom-router API of Ray
  2.60) that ranks replicas by ``routing.affinity_ranks``: the replica most likely to
  hold the request's span path first, spill-over when it is loaded. It runs inside
  Ray's own routing loop, so queue-length probing, back-off and replica failures stay
  Ray's; a router deployment of our own would add a hop and re-implement them.
- ``Ingress``: the same FastAPI app as the single process (``app.create_app``) over a
  ``RayBackend`` that streams each request from a replica.

Every reply says which replica served it (``Done.value["replica"]``; the span endpoint
returns it), with that replica's store counters, so affinity can be checked.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import AsyncIterator, Sequence

import attrs
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ..core.spans import Context
from .jobs import Delta, Done
from .local import LocalBackend, RuntimeSpec, raise_for
from .protocol import ApiError, GenRequest
from .routing import affinity_ranks, route_key

__all__ = ["SpanAffinityRouter", "build_app", "serve_forever"]


class SpanAffinityRouter(RequestRouter):
    """Routes by the ``route_key`` keyword of a request (see ``spanctx.serve.routing``)."""

    def initialize_state(self, spill: int = 8) -> None:
        self.spill = spill

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = None if pending_request is None else pending_request.kwargs.get("route_key")
        return affinity_ranks(key, candidate_replicas, lambda r: r.replica_id.unique_id,
                              lambda r: self.replica_queue_len_cache.get(r.replica_id), self.spill)


class SpanctxReplica:
    """One runtime behind its scheduler; ``generate`` streams events as plain values."""

    def __init__(self, spec: RuntimeSpec, max_batch: int | None, max_queue: int,
                 join_tokens: int | None = None) -> None:
        self.backend = LocalBackend(spec.build(), max_batch=max_batch, max_queue=max_queue, join_tokens=join_tokens)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def generate(self, request: GenRequest, route_key: str | None = None) -> AsyncIterator:
        """``(i, Delta)`` pairs, ``(i, {"done": ...})`` per choice, or one ``{"api_error": ...}``."""
        try:
            async for i, event in self.backend.generate(request):
                yield i, self._done(event) if isinstance(event, Done) else event
        except ApiError as exc:
            yield {"api_error": [exc.status, exc.body()]}

    async def check(self, ctx: Context, requirements: Sequence[str], adapter: str | None,
                    route_key: str | None = None) -> dict:
        try:
            return {"verdicts": await self.backend.check(ctx, requirements, adapter)}
        except ApiError as exc:
            return {"api_error": [exc.status, exc.body()]}

    async def health(self) -> dict:
        return {"replica": self.replica, **await self.backend.health()}

    def _done(self, done: Done) -> dict:
        try:
            raise_for(done)
        except ApiError as exc:
            return {"api_error": [exc.status, exc.body()]}
        fields = attrs.asdict(done, recurse=False)
        fields.update(error=None, value={"replica": self.replica, "store": attrs.asdict(self.backend.rt.store.stats)})
        return {"done": fields}


class RayBackend:
    """The app's backend on Ray: each request streamed from the replica the router picks."""

    def __init__(self, handle, route_depth: int) -> None:
        self.handle, self.route_depth = handle, route_depth

    async def generate(self, request: GenRequest) -> AsyncIterator[tuple[int, Delta | Done]]:
        """All of a request's choices on one replica: they batch there and share its spans."""
        key = route_key(request.ctx, request.salt, self.route_depth)
        stream = self.handle.options(stream=True).generate.remote(request, route_key=key)
        running = request.n
        try:
            async for item in stream:
                if isinstance(item, dict):  # refused before any choice ran
                    raise _api_error(item)
                i, event = item
                if isinstance(event, dict):
                    running -= 1
                    event = Done(**event["done"]) if "done" in event else Done("error", error=_api_error(event))
                yield i, event
                if not running:
                    return
        finally:
            if running:
                stream.cancel()  # the client left: the replica's generator is cancelled, its jobs too

    async def check(self, ctx: Context, requirements: Sequence[str], adapter: str | None) -> list[dict]:
        out = await self.handle.check.remote(ctx, requirements, adapter, route_key=route_key(ctx, None,
                                                                                              self.route_depth))
        if "api_error" in out:
            raise _api_error(out)
        return out["verdicts"]

    async def health(self) -> dict:
        return {"status": "ok", "one_replica": await self.handle.health.remote()}

    def gauges(self) -> dict[str, float]:
        return {}  # request-level series only: each replica's store counters ride on its replies


def _api_error(event: dict) -> ApiError:
    status, body = event["api_error"]
    error = body["error"]
    return ApiError(status, error["message"], type=error["type"], param=error["param"], code=error["code"])


class _Ingress:
    def __init__(self, replicas, model_name: str, route_depth: int) -> None:
        self.handle, self.model_name, self.route_depth = replicas, model_name, route_depth

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(RayBackend(self.handle, self.route_depth), self.model_name)


def build_app(spec: RuntimeSpec, model_name: str, *, replicas: int, max_batch: int | None = None,
              max_queue: int = 64, route_depth: int = 1, spill: int = 8, gpus_per_replica: float | None = None,
              router: str = "affinity", join_tokens: int | None = None):
    """The Serve application: ``replicas`` model replicas and the ingress. ``router``:
    "affinity" (``SpanAffinityRouter``) or "default" (Ray's power of two choices)."""
    if gpus_per_replica is None:
        import torch

        gpus_per_replica = 1.0 if torch.cuda.is_available() else 0.0
    config = (RequestRouterConfig(request_router_class=SpanAffinityRouter, request_router_kwargs={"spill": spill})
              if router == "affinity" else RequestRouterConfig())
    replica = serve.deployment(SpanctxReplica, name="spanctx-replica", num_replicas=replicas,
                               ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 1},
                               max_ongoing_requests=max_queue + (max_batch or 8),
                               request_router_config=config)
    ingress = serve.deployment(serve.ingress()(_Ingress), name="spanctx-ingress",
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(spec, max_batch, max_queue, join_tokens), model_name, route_depth)


def serve_forever(spec: RuntimeSpec, model_name: str, *, replicas: int, host: str, port: int, **options) -> int:
    """``spanctx serve --replicas N``: start Ray (or join ``RAY_ADDRESS``), run until Ctrl-C."""
    import ray

    ray.init(include_dashboard=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM shuts down like Ctrl-C
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(spec, model_name, replicas=replicas, **options), name="spanctx", route_prefix="/")
        print(f"spanctx serve: {model_name} on http://{host}:{port}/v1 ({replicas} replicas)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
