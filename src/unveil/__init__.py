"""unveil: learn the concepts a vision network's layer uses, as encoding-decoding direction pairs.

Heavy modules (models, reports) are imported lazily; ``import unveil`` stays fast.
"""
__version__ = "0.1.0"

from ._errors import (CorruptFileError, HeadError, LayerError, NotFittedError, UnveilError,  # noqa: E402
                      ValidationError)
from .directions import EDDP, DirectionPairs  # noqa: E402

__all__ = ["__version__", "EDDP", "DirectionPairs", "UnveilError", "ValidationError", "NotFittedError",
           "CorruptFileError", "LayerError", "HeadError"]
