"""``spanctx serve MODEL``: one process (uvicorn), or ``--replicas N`` on Ray Serve."""

from __future__ import annotations

import argparse
import importlib.util
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="preset name, local model folder or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default MODEL)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--store-bytes", type=int, default=None, help="the span store's budget per replica")
    parser.add_argument("--tier", action="append", default=[], metavar="URL",
                        help="a shared tier store, e.g. redis://127.0.0.1:6379 (repeatable)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="load a PEFT adapter (LoRA or aLoRA) under NAME (repeatable)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="most requests decoding together (default 8): lanes on the static executor, else rows "
                             "of one batched call")
    parser.add_argument("--join-tokens", type=int, default=None,
                        help="new prompt tokens that may join the running lanes in one step (default 512; more wait)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (per replica)")
    parser.add_argument("--replicas", type=int, default=0,
                        help="N > 0: N replicas on Ray Serve with span-affinity routing (pip install 'spanctx[ray]')")
    parser.add_argument("--route-depth", type=int, default=1, help="context nodes hashed into the routing key")
    parser.add_argument("--spill", type=int, default=8,
                        help="queued+running requests at which a replica's affinity spills to another")
    parser.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 when CUDA is present")


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"spanctx serve needs {', '.join(missing)}: pip install 'spanctx[serve]'", file=sys.stderr)
        return 2
    adapters = []
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"--adapter takes NAME=PATH, got {item!r}", file=sys.stderr)
            return 2
        adapters.append((name, path))
    from .local import RuntimeSpec

    spec = RuntimeSpec(args.model, args.device, args.dtype, args.store_bytes, tuple(args.tier), tuple(adapters))
    name = args.served_model_name or args.model
    if args.replicas:
        if importlib.util.find_spec("ray") is None:
            print("--replicas needs Ray Serve: pip install 'spanctx[ray]' (or leave --replicas out for one process)",
                  file=sys.stderr)
            return 2
        from .ray_app import serve_forever

        return serve_forever(spec, name, replicas=args.replicas, host=args.host, port=args.port,
                             max_batch=args.max_batch, max_queue=args.max_queue, join_tokens=args.join_tokens,
                             route_depth=args.route_depth,
                             spill=args.spill, gpus_per_replica=args.gpus_per_replica)
    import uvicorn

    from .app import UVICORN_OPTIONS, create_app
    from .local import LocalBackend

    backend = LocalBackend(spec.build(), max_batch=args.max_batch, max_queue=args.max_queue,
                           join_tokens=args.join_tokens)
    print(f"spanctx serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(backend, name), host=args.host, port=args.port, **UVICORN_OPTIONS)
    backend.scheduler.close()
    return 0
