"""Run ``benchmarks/mellea/bench.py`` with packages carried as wheels (the GPU box has no
Mellea and no registry):

    python benchmarks/mellea/carried.py SITE [--check | BENCH ARGS...]

``SITE`` is a folder the wheels were installed into (``pip install --target SITE``). Its
packages fill what the interpreter lacks: it goes at the END of ``sys.path``, so the
image's torch, transformers, peft and the rest win; only where the image has no pydantic
does it go first (the carried pydantic then gets the carried typing_extensions it needs,
not an older one of the image). ``--check`` imports Mellea's HF backend and says which
Mellea it found (exit 1 if none).
"""

import importlib.metadata
import importlib.util
import pathlib
import runpy
import sys

site = sys.argv[1]
if importlib.util.find_spec("pydantic") is None:
    sys.path.insert(0, site)
else:
    sys.path.append(site)

if sys.argv[2:3] == ["--check"]:
    try:
        import mellea.backends.huggingface
    except ImportError as exc:
        print(f"mellea not importable: {type(exc).__name__}: {exc}")
        sys.exit(1)
    print(f"mellea {importlib.metadata.version('mellea')} from {pathlib.Path(mellea.__file__).parent}")
    sys.exit(0)

bench = pathlib.Path(__file__).with_name("bench.py")
sys.argv = [str(bench), *sys.argv[2:]]
runpy.run_path(str(bench), run_name="__main__")
