"""Intrinsic adapters from local folders (no model hub needed)."""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Mapping

import yaml
from mellea.backends.adapters import AdapterType, IntrinsicAdapter

__all__ = ["LocalIntrinsicAdapter"]


class LocalIntrinsicAdapter(IntrinsicAdapter):
    """A catalog intrinsic (``"requirement-check"``, ``"answerability"``, ...) whose PEFT
    adapter folder and io.yaml are on local disk, for machines without hub access.

    ``io_yaml`` is the io.yaml's path or its parsed mapping. Added to a backend like any
    ``IntrinsicAdapter``: ``backend.add_adapter(LocalIntrinsicAdapter(...))``.
    """

    def __init__(self, intrinsic_name: str, path: str | pathlib.Path, io_yaml: str | pathlib.Path | Mapping,
                 adapter_type: AdapterType = AdapterType.ALORA) -> None:
        folder = pathlib.Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
        config = dict(io_yaml) if isinstance(io_yaml, Mapping) else yaml.safe_load(pathlib.Path(io_yaml).read_text())
        with warnings.catch_warnings():  # IntrinsicAdapter warns that it is deprecated in favour of the hub-only Adapter
            warnings.simplefilter("ignore", DeprecationWarning)
            super().__init__(intrinsic_name, adapter_type, config_dict=config)
        self.local_path = folder

    def get_local_hf_path(self, base_model_name: str) -> str:
        """The local folder, whatever the base model's name."""
        return str(self.local_path)
