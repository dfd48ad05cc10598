"""Which spanctx features a method needs, and a clear error when the runtime lacks one.

The harness is written against the public API that the feature issues name; it never
stands in for a missing feature. A method whose feature is absent stops its scenario
with ``MissingFeature`` naming what is missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import attrs

from .. import Context, Runtime


class MissingFeature(RuntimeError):
    """A benchmark method needs a spanctx feature that this runtime does not have."""


@attrs.frozen
class Feature:
    description: str
    present: Callable[[type[Runtime]], bool]  # given the runtime's class


def _has_parameter(function: Callable, name: str) -> bool:
    return name in inspect.signature(function).parameters


FEATURES: dict[str, Feature] = {
    "parallel": Feature("parallel spans: spanctx.Context.parallel(*docs) (issue 3)",
                        lambda rt: hasattr(Context, "parallel")),
    "repair": Feature("repair modes: Runtime.generate / next_token_logits(..., repair=...) (issue 3)",
                      lambda rt: _has_parameter(rt.generate, "repair")
                      and _has_parameter(rt.next_token_logits, "repair")),
    "adapters": Feature("adapters: Runtime.add_adapter(name, path) / unload_adapter(name) (issue 4)",
                        lambda rt: hasattr(rt, "add_adapter") and hasattr(rt, "unload_adapter")),
    "checks": Feature("constraint checks: Runtime.check(ctx, requirements, adapter=...) (issue 4)",
                      lambda rt: hasattr(rt, "check")),
}


def missing(features: Iterable[str], runtime_class: type[Runtime] = Runtime) -> list[str]:
    """Descriptions of the named features that ``runtime_class`` (or spans) lack."""
    return [FEATURES[name].description for name in features if not FEATURES[name].present(runtime_class)]


def require(scenario: str, needs: dict[str, tuple[str, ...]], runtime_class: type[Runtime] = Runtime) -> None:
    """Raise ``MissingFeature`` if any method in ``needs`` (method -> feature names) lacks one."""
    problems = {method: missing(features, runtime_class) for method, features in needs.items()}
    problems = {method: lacks for method, lacks in problems.items() if lacks}
    if problems:
        lines = [f"  {method}: needs {'; '.join(lacks)}" for method, lacks in problems.items()]
        raise MissingFeature(f"scenario {scenario!r} cannot run with this spanctx; missing:\n" + "\n".join(lines)
                             + "\n(pick other methods with --methods, or merge the feature first)")
