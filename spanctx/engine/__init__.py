"""The execution engine: the only code that runs the model and writes the store."""

from .engine import (
           Assembly,
           Engine,
           FirstTokenClock,
           Generated,
           KVLayoutMismatch,
           StopWhenSet,
           with_stopping_criterion,
)
from .executor import Capabilities, EagerExecutor, Executor

__all__ = ["Assembly", "Capabilities", "EagerExecutor", "Engine", "Executor", "FirstTokenClock", "Generated",
           "KVLayoutMismatch", "StopWhenSet",
           "with_stopping_criterion"]
