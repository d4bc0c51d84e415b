"""One exception family for everything a user can cause.

Every class subclasses :class:`UnveilError` *and* the builtin a user would catch
(``ValueError``, ``OSError``, ...), so ``except ValueError`` keeps working.
Messages follow one template: what went wrong, what was expected, what came, how to fix it.
"""
from __future__ import annotations

__all__ = [
    "UnveilError",
    "ValidationError",
    "NotFittedError",
    "CorruptFileError",
    "LayerError",
    "HeadError",
    "OutputExistsError",
    "BusyError",
    "DistributedError",
]


class UnveilError(Exception):
    """Base class of every error unveil raises on purpose."""


class ValidationError(UnveilError, ValueError):
    """An argument or an input array is not what the function expects."""


class NotFittedError(UnveilError, ValueError, AttributeError):
    """An estimator was used before ``fit``.

    Also a ``ValueError`` and an ``AttributeError``, like scikit-learn's ``NotFittedError``: code
    written for scikit-learn estimators catches it, and ``hasattr(est, "pairs_")`` is ``False``
    before ``fit``.
    """


class CorruptFileError(UnveilError, OSError):
    """A file unveil wrote (or reads) is missing, truncated or not in the expected format."""


class LayerError(UnveilError, ValueError):
    """A layer name does not exist in the model, or the layer cannot be used as asked."""


class HeadError(UnveilError, ValueError):
    """The head f+ (the network above the studied layer) does not accept the maps or returns the wrong shape."""


class OutputExistsError(UnveilError, FileExistsError):
    """An output path already holds something unveil will not replace (the user's files, or ours
    without ``overwrite``)."""


class BusyError(UnveilError, OSError):
    """Another process is writing the same folder (its lock is held)."""


class DistributedError(UnveilError, RuntimeError):
    """Another process of a distributed run failed, died or did not answer within the timeout."""
