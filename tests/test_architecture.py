"""The shape of the package: only the engine runs the model, only its interpreter writes
the store, every import follows the layer table of docs/architecture.md (type-only imports
count), the import graph has no cycle, and the core needs no torch."""

from __future__ import annotations

import ast
import contextlib
import re
import subprocess
import sys
import traceback
from pathlib import Path

from adapter_helpers import INVOCATION, adapter_pair, fresh_runtime
from conftest import tiny_runtime

import spanctx
from spanctx import Context
from spanctx.cache.store import KVStore

PACKAGE = Path(spanctx.__file__).parent
ENGINE = PACKAGE / "engine"
# the executors' files, whose code calls the model, and the one that writes the store
EXECUTOR = ENGINE / "executor.py"
STATIC = {ENGINE / "static.py", ENGINE / "static_layout.py"}
INTERPRETER = ENGINE / "interpreter.py"
SYSTEM = "You answer from the documents. "
DOCS = ("Doc A: the river rose. ", "Doc B: the gauge was cleaned. ")


def _innermost_package_frame() -> Path:
    """The innermost frame of spanctx's own code (outside its bench harness) on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename)
        if PACKAGE in path.parents and "bench" not in path.parts:
            return path
    raise AssertionError("a model call from outside spanctx")


@contextlib.contextmanager
def callers_recorded(rt):
    """Record, for every model forward and store write, the spanctx file that made it."""
    model_callers, store_writers = set(), set()
    hook = rt.model.register_forward_pre_hook(lambda *_: model_callers.add(_innermost_package_frame()))
    put = KVStore.put

    def recorded_put(store, key, kv):
        store_writers.add(_innermost_package_frame())
        return put(store, key, kv)

    KVStore.put = recorded_put
    try:
        yield model_callers, store_writers
    finally:
        hook.remove()
        KVStore.put = put


def every_feature(rt, adapter: str | None) -> None:
    """One call of every feature, over plain, chat and parallel contexts."""
    plain = Context().append(SYSTEM).append("Question: what rose?")
    parallel = Context().append(SYSTEM).parallel(*DOCS).append("Question: what rose?")
    chat = Context().chat([{"role": "user", "content": "hello"}])
    for ctx in (plain, parallel):
        rt.generate(ctx, 3)
        list(rt.stream(ctx, 3))
        rt.next_token_logits(ctx)
        rt.hidden_states(ctx, "last")
        rt.hidden_states(ctx, "mean")
        rt.score(ctx, [" yes", " no way"])
    rt.generate(parallel, 2, repair="blend:0.5")
    rt.generate(parallel, 2, repair="head:2")
    rt.generate_batch([plain, parallel, chat], 3)
    rt.check(plain, ["short", "polite"], adapter=adapter)
    rt.check(parallel, ["short"])
    rt.check_loop(plain, ["short"], adapter=adapter, max_rounds=2, max_new_tokens=3)


def test_only_the_engine_runs_the_model_and_writes_the_store(tmp_path_factory):
    arch, alora, _ = adapter_pair("llama", tmp_path_factory, "architecture", (1, 2))
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora, invocation=INVOCATION)
    with callers_recorded(rt) as (model_callers, store_writers):
        every_feature(rt, "check")
    assert model_callers == {EXECUTOR}
    assert store_writers == {INTERPRETER}


def test_with_the_static_executor_too():
    rt = tiny_runtime(executor="static")
    with callers_recorded(rt) as (model_callers, store_writers):
        every_feature(rt, None)
    assert EXECUTOR in model_callers and model_callers & STATIC and model_callers <= {EXECUTOR, *STATIC}
    assert store_writers == {INTERPRETER}


def test_the_probes_run_through_the_engine_too():
    rt = tiny_runtime()
    with callers_recorded(rt) as (model_callers, _):
        rt.engine.__dict__.pop("key_mover", None)
        assert rt.engine.key_mover.movable
    assert model_callers == {EXECUTOR}


def _module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """The spanctx modules ``path`` (a file under ``root``) imports: at the top, in
    functions, and under ``TYPE_CHECKING`` (a type-only import is an arrow too)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("spanctx"):
                out.add(base)
                out.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("spanctx"))
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def layer_table() -> dict[str, tuple[tuple[str, ...], frozenset[str]]]:
    """docs/architecture.md's table: layer -> (its paths in the package, the layers it may
    import). The row whose paths start with "the rest" has every path no other row names."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("layer", "---") or not line.startswith("|"):
            continue
        name, where, _, may = cells
        paths = () if where.startswith("the rest") else tuple(
            p.removeprefix("spanctx/") for p in re.findall(r"`([^`]+)`", where))
        allowed = frozenset() if may == "nothing" else frozenset(m.strip() for m in may.split(","))
        table[name] = (paths, allowed)
    return table


def layer_of(module: str, table) -> str:
    """The layer of a module (dotted name below ``spanctx``), by the longest matching path."""
    path = module.removeprefix("spanctx.").replace(".", "/")
    best, rest = None, None
    for name, (paths, _) in table.items():
        if not paths:
            rest = name
        for p in paths:
            if (path + ".py" == p or (path + "/").startswith(p.rstrip("/") + "/")) and (
                    best is None or len(p) > best[1]):
                best = (name, len(p))
    return best[0] if best else rest


def test_the_layer_table_is_read():
    table = layer_table()
    assert list(table) == ["hf", "core", "cache", "engine", "session", "features", "face", "integrations"]
    assert table["core"][1] == {"hf"} and table["hf"][1] == set()
    assert layer_of("spanctx.core.keys", table) == "core"
    assert layer_of("spanctx.hf", table) == "hf"
    assert layer_of("spanctx.runtime", table) == layer_of("spanctx.bench.cli", table) == "face"
    assert layer_of("spanctx.integrations.mellea.backend", table) == "integrations"


def layer_violations(graph: dict[str, set[str]], table) -> list[str]:
    """Every arrow of ``graph`` that the layer ``table`` does not allow."""
    wrong = []
    for module, deps in sorted(graph.items()):
        if module == "spanctx":
            continue
        mine = layer_of(module, table)
        for dep in sorted(deps):
            if dep == "spanctx":
                wrong.append(f"{module} imports the package spanctx (its __init__)")
                continue
            theirs = layer_of(dep, table)
            if theirs != mine and theirs not in table[mine][1]:
                wrong.append(f"{module} ({mine}) imports {dep} ({theirs})")
    return wrong


def test_every_import_follows_the_layer_table():
    assert layer_violations(import_graph(), layer_table()) == []


def test_the_layer_check_finds_wrong_arrows():
    graph = {"spanctx.engine.engine": {"spanctx.features.batch", "spanctx.cache.store"},
             "spanctx.features.checks": {"spanctx.runtime", "spanctx.session.api"},
             "spanctx.core.keys": {"spanctx"}}
    assert layer_violations(graph, layer_table()) == [
        "spanctx.core.keys imports the package spanctx (its __init__)",
        "spanctx.engine.engine (engine) imports spanctx.features.batch (features)",
        "spanctx.features.checks (features) imports spanctx.runtime (face)"]


def test_the_core_imports_no_torch():
    core = sorted((PACKAGE / "core").glob("*.py")) + [PACKAGE / "hf.py"]
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path
    # and at run time: every core module imports with torch blocked (the package's
    # __init__, which imports everything, is skipped)
    script = (f"import sys, types\nsys.modules['torch'] = None\n"
              f"pkg = types.ModuleType('spanctx'); pkg.__path__ = [{str(PACKAGE)!r}]; sys.modules['spanctx'] = pkg\n"
              + "".join(f"import spanctx.core.{p.stem}\n" for p in core if p.parent.name == "core")
              + "import spanctx.hf\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # packages import their modules: a package and its own modules are one node
    merged = {name: {m for m in deps if not m.startswith(name + ".") and not name.startswith(m + ".")}
              for name, deps in graph.items()}
    assert _cycle(merged) is None, " -> ".join(_cycle(merged))


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_type_only_imports_are_counted(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from spanctx.runtime import Runtime\n")
    assert "spanctx.runtime" in _imports(module, root=tmp_path)


def test_modules_stay_small():
    sizes = {p.relative_to(PACKAGE): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}


def _protocol_members(name: str) -> set[str]:
    """The names a Protocol class of session/api.py declares (attributes and methods)."""
    tree = ast.parse((PACKAGE / "session" / "api.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    return {n.target.id if isinstance(n, ast.AnnAssign) else n.name for n in cls.body
            if isinstance(n, (ast.AnnAssign, ast.FunctionDef))}


def _session_uses(path: Path) -> set[str]:
    """What the functions of ``path`` read off their ``SessionAPI`` argument: ``name``, or
    ``engine.name`` for a final call."""
    uses = set()
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = {a.arg for a in fn.args.args if a.annotation is not None and ast.unparse(a.annotation) == "SessionAPI"}
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in params:
                uses.add(node.attr)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                  and isinstance(node.value.value, ast.Name) and node.value.value.id in params
                  and node.value.attr == "engine"):
                uses.add(f"{node.value.attr}.{node.attr}")
    return uses


def test_features_use_only_the_session_protocol(tmp_path):
    allowed = _protocol_members("SessionAPI") | {f"engine.{m}" for m in _protocol_members("FinalCalls")}
    probe = tmp_path / "probe.py"
    probe.write_text("def f(rt: SessionAPI):\n    return rt.store, rt.engine.assemble, rt.engine.run, rt.holding\n")
    assert _session_uses(probe) - allowed == {"store", "engine.assemble"}
    used = {p.name: _session_uses(p) for p in (PACKAGE / "features").glob("*.py")}
    assert sum(map(len, used.values())) > 20  # the features do take a SessionAPI
    assert {name: uses - allowed for name, uses in used.items() if uses - allowed} == {}


def test_module_names_are_unique():
    stems = [p.stem for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert sorted({s for s in stems if stems.count(s) > 1}) == []
