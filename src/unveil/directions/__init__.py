"""Estimators that see activations only (tensors or stores), never a model."""
from .pairs import DirectionPairs

__all__ = ["DirectionPairs"]
