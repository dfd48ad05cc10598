"""The docs cannot drift: every ```python block of README.md and docs/*.md runs, on CPU
with the tiny presets, in order, one namespace per file (later blocks use earlier names).

A block may opt out only with the line ``<!-- skip-snippet: <reason> -->`` right before
its opening fence (e.g. it needs a GPU, a server or a download); the reason is required.
Blocks run in a temporary working directory, so files they write go away. Top-level
``await`` works (a block that uses it runs in a fresh event loop).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!-- skip-snippet: (?P<reason>\S.*?) -->")
README_MAX_LINES = 260


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` for each ```python block of ``path``."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next((j for j in range(start, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise AssertionError(f"{path.name}:{i + 1}: unclosed ```python block")
            skip = SKIP.fullmatch(lines[i - 1].strip()) if i else None
            blocks.append((start, "\n".join(lines[start:end]) + "\n", skip["reason"] if skip else None))
            i = end
        elif SKIP.fullmatch(lines[i].strip()) and not (i + 1 < len(lines) and lines[i + 1].strip() == "```python"):
            raise AssertionError(f"{path.name}:{i + 1}: a skip-snippet marker must be the line right before "
                                 "a ```python block, with a reason")
        i += 1
    return blocks


def run_block(code: str, name: str, namespace: dict) -> None:
    compiled = compile(code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if compiled.co_flags & inspect.CO_COROUTINE:
        asyncio.run(eval(compiled, namespace))
    else:
        exec(compiled, namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")  # a real module: pydantic and
    monkeypatch.setitem(sys.modules, module.__name__, module)         # dataclasses look names up there
    namespace = module.__dict__
    for line, code, skip in python_blocks(page):
        if skip is None:
            run_block(code, f"{page.relative_to(ROOT)}:{line}", namespace)


def test_the_readme_fits_on_a_few_screens_and_shows_running_code():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    runnable = [b for b in python_blocks(readme) if b[2] is None]
    assert runnable and len(runnable[0][1].splitlines()) <= 25  # the quickstart


def test_the_block_finder_reads_markers_and_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\na = 1\n```\n<!-- skip-snippet: needs a GPU -->\n```python\nb\n```\n"
                    "```bash\nls\n```\n")
    assert python_blocks(page) == [(2, "a = 1\n", None), (6, "b\n", "needs a GPU")]
    page.write_text("<!-- skip-snippet: no block follows -->\ntext\n")
    with pytest.raises(AssertionError, match="right before"):
        python_blocks(page)
    namespace: dict = {}
    run_block("import asyncio\nawait asyncio.sleep(0)\nx = 2\n", "async", namespace)
    assert namespace["x"] == 2
