"""The package version (one place; ``unveil.__version__``, ``unveil --version`` and ``versions()`` read it)."""
__version__ = "0.1.0"
