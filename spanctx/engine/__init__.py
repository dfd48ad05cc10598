"""The execution engine: the only code that runs the model and writes the store."""

from .engine import Assembly, Engine, Generated, KVLayoutMismatch, RowLogits
from .executor import Capabilities, EagerExecutor, Executor
from .stopping import FirstTokenClock, StopWhenSet, with_stopping_criterion

__all__ = ["Assembly", "Capabilities", "EagerExecutor", "Engine", "Executor", "FirstTokenClock", "Generated",
           "KVLayoutMismatch", "RowLogits", "StopWhenSet",
           "with_stopping_criterion"]
