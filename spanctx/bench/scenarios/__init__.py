"""The benchmark scenarios. Each module has NAME, METHODS (canonical order, ``full``
first), a ``Config`` with the issue's default sizes,
and ``run(harness, config, methods) -> list[Row]``."""

from __future__ import annotations

from types import ModuleType

from ..harness import Harness
from ..records import Row
from . import chat, cold, parallel_fidelity, prefix, rag, requirement_checks
from .common import select_methods

SCENARIOS: dict[str, ModuleType] = {m.NAME: m for m in (prefix, rag, chat, requirement_checks, cold, parallel_fidelity)}


def run_scenario(h: Harness, name: str, config=None, methods: list[str] | None = None) -> list[Row]:
    """Run scenario ``name`` (default sizes unless ``config``) over ``methods`` (default all)."""
    try:
        scenario = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; scenarios: {', '.join(SCENARIOS)}") from None
    chosen = select_methods(name, scenario.METHODS, methods)
    return scenario.run(h, config or scenario.Config(), chosen)


__all__ = ["SCENARIOS", "run_scenario"]
