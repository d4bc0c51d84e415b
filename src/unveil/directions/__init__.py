"""Estimators that see activations only (tensors or stores), never a model."""
from .eddp import EDDP
from .pairs import DirectionPairs

__all__ = ["EDDP", "DirectionPairs"]
