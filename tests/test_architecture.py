"""The shape of the package: only the engine runs the model, only its interpreter writes
the store, and the import graph has no cycle."""

from __future__ import annotations

import ast
import contextlib
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


def _imports(path: Path) -> set[str]:
    """The spanctx modules ``path`` imports at run time (``TYPE_CHECKING`` blocks aside)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


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


def test_modules_stay_small():
    sizes = {p.relative_to(PACKAGE): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}
