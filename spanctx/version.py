"""The package version: one place, read by ``pyproject.toml`` (setuptools ``attr:``, without
importing the package), ``spanctx.__version__`` and ``spanctx --version``."""

__version__ = "0.1.0"
