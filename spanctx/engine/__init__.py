"""The execution engine: the only code that runs the model and writes the store."""

from .calls import FinalCall, FinalOutput
from .engine import Assembly, Engine, KVLayoutMismatch
from .executor import EagerExecutor, Executor
from .stopping import FirstTokenClock, StopWhenSet, with_stopping_criterion

__all__ = ["Assembly", "EagerExecutor", "Engine", "Executor", "FinalCall", "FinalOutput", "FirstTokenClock",
           "KVLayoutMismatch", "StopWhenSet", "with_stopping_criterion"]
