"""unveil: learn the concepts a vision network's layer uses, as encoding-decoding direction pairs.

Heavy modules (models, reports) are imported lazily; ``import unveil`` stays fast.
"""
__version__ = "0.1.0"

from ._errors import (BusyError, CorruptFileError, DistributedError, HeadError, LayerError,  # noqa: E402
                      NotFittedError, OutputExistsError, UnveilError, ValidationError)
from .directions import EDDP, DirectionPairs  # noqa: E402

__all__ = ["__version__", "EDDP", "DirectionPairs", "explain", "influence", "UnveilError", "ValidationError", "NotFittedError",
           "CorruptFileError", "LayerError", "HeadError", "OutputExistsError", "BusyError",
           "DistributedError"]


def __getattr__(name):
    # ``unveil.explain(model, layer, pairs, images)``: the explain module is callable; imported on first use
    if name == "explain":
        import importlib
        return importlib.import_module(".explain", __name__)
    # ``unveil.influence(head, maps, labels, pairs)``: RCAV with the paper's null; a plain function
    if name == "influence":
        from .evaluate.influence import influence
        return influence
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
