"""Command line: ``spanctx demo`` (the cache-reuse demo) and ``spanctx bench`` (the benchmark matrix).

Imports are lazy: ``--help`` and ``--version`` load nothing heavy, ``demo`` needs only the
package's own dependencies, and ``bench`` (which draws plots) says so when matplotlib is
missing instead of failing on an import.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from .version import __version__

DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="spanctx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"spanctx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="questions over shared documents, answered with and without span reuse")
    demo.add_argument("--model", default=None,
                      help="preset name (default tiny-trained: a small trained model; tiny-llama etc.: random "
                           "weights) or a local model folder / hub id")
    demo.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    demo.add_argument("--dtype", choices=DTYPE_CHOICES, default=None)
    demo.add_argument("--docs", type=int, default=16,
                      help="documents in the shared context (~100 tokens each; fewer if the model's positions "
                           "are short)")
    demo.add_argument("--questions", type=int, default=5)
    demo.add_argument("--max-new-tokens", type=int, default=16,
                      help="tokens per answer (bytes, on the byte-tokenizer presets)")
    demo.add_argument("--tier", action="append", default=None, metavar="URL",
                      help="a lower span tier, fastest first (repeatable): pinned, cpu, disk:///path, "
                           "redis://host:port/0 (docs/tiers.md)")

    bench = sub.add_parser("bench", help="benchmark matrix: spanctx vs full-prefill generation "
                                         "(needs matplotlib: pip install 'spanctx[plots]')")
    if argv[:1] == ["bench"]:  # the bench module (and its options) loads only for this command
        if importlib.util.find_spec("matplotlib") is None:
            print("spanctx bench writes plots and needs matplotlib: pip install 'spanctx[plots]'", file=sys.stderr)
            return 2
        from .bench import command as bench_cli

        bench_cli.add_arguments(bench)

    serve = sub.add_parser("serve", help="OpenAI-compatible server over span reuse (pip install 'spanctx[serve]')")
    if argv[:1] == ["serve"]:  # loads only for this command
        from .serve import launch as serve_cli

        serve_cli.add_arguments(serve)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_cli.run(args)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
    return bench_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
