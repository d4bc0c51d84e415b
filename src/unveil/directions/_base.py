"""The estimator contract every direction-finding method follows (scikit-learn compatible).

- ``__init__`` only stores its keyword hyperparameters (``get_params``/``set_params`` and
  :func:`sklearn.base.clone` come from :class:`sklearn.base.BaseEstimator`);
- ``fit(X, y=None, *, head=None)`` validates the hyperparameters once against the class's
  ``_parameter_constraints`` table, learns, and returns ``self``; ``y`` is used only by supervised
  methods (patch labels), ``head`` only by the methods that read the network above the layer;
- learned state ends in ``_`` (``pairs_``, ``n_features_in_``), so
  :func:`sklearn.utils.validation.check_is_fitted` works; reading it before ``fit`` raises
  :class:`~unveil.NotFittedError` (a ``ValueError`` and an ``AttributeError``);
- ``transform(X)`` returns the signal values of the fitted pairs, ``detect(X)`` their detector
  activations.

Examples
--------
>>> import torch
>>> from sklearn.base import clone
>>> from sklearn.utils.validation import check_is_fitted
>>> from unveil.directions.baselines import PCABaseline
>>> est = PCABaseline(n_concepts=2, random_state=0)
>>> est.get_params()
{'n_concepts': 2, 'random_state': 0}
>>> X = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
>>> est.fit(X).transform(X).shape
torch.Size([50, 2])
>>> check_is_fitted(est)
>>> clone(est).set_params(n_concepts=1).fit(X).pairs_.n_concepts
1
>>> PCABaseline(n_concepts=0).fit(X)
Traceback (most recent call last):
...
unveil._errors.ValidationError: n_concepts must be an integer >= 1, got 0; pass a valid value to PCABaseline(...) or set_params().
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, Iterable, List

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from .._errors import NotFittedError, ValidationError

__all__ = ["DirectionEstimator", "Interval", "Options", "validate_params"]


class Interval:
    """A constraint: a number of type ``kind`` (``numbers.Integral`` or ``numbers.Real``) in a range.

    ``closed`` is ``"left"``, ``"right"``, ``"both"`` or ``"neither"``; ``None`` bounds are open.
    Booleans are refused, and so are non-finite reals.
    """

    def __init__(self, kind, low=None, high=None, closed: str = "both"):
        if kind not in (numbers.Integral, numbers.Real):
            raise TypeError(f"Interval kind must be numbers.Integral or numbers.Real, got {kind!r}.")
        if closed not in ("left", "right", "both", "neither"):
            raise ValueError(f"closed must be 'left', 'right', 'both' or 'neither', got {closed!r}.")
        self.kind, self.low, self.high, self.closed = kind, low, high, closed

    def accepts(self, value) -> bool:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, self.kind):
            return False
        if not np.isfinite(value):
            return False
        if self.low is not None:
            if value < self.low or (value == self.low and self.closed not in ("left", "both")):
                return False
        if self.high is not None:
            if value > self.high or (value == self.high and self.closed not in ("right", "both")):
                return False
        return True

    def __str__(self) -> str:
        what = "an integer" if self.kind is numbers.Integral else "a finite number"
        lo = None if self.low is None else (">=" if self.closed in ("left", "both") else ">")
        hi = None if self.high is None else ("<=" if self.closed in ("right", "both") else "<")
        if lo and hi:
            return f"{what} in {'[' if lo == '>=' else '('}{self.low}, {self.high}{']' if hi == '<=' else ')'}"
        if lo:
            return f"{what} {lo} {self.low}"
        if hi:
            return f"{what} {hi} {self.high}"
        return what


class Options:
    """A constraint: one of a fixed set of values (e.g. strings)."""

    def __init__(self, values: Iterable):
        self.values = frozenset(values)

    def accepts(self, value) -> bool:
        try:
            return value in self.values and not isinstance(value, (bool, np.bool_))
        except TypeError:  # unhashable
            return False

    def __str__(self) -> str:
        return f"one of {sorted(self.values, key=repr)}"


class _Boolean:
    def accepts(self, value) -> bool:
        return isinstance(value, (bool, np.bool_))

    def __str__(self) -> str:
        return "True or False"


class _RandomState:
    def accepts(self, value) -> bool:
        return (isinstance(value, (numbers.Integral, np.random.Generator, torch.Generator))
                and not isinstance(value, (bool, np.bool_)))

    def __str__(self) -> str:
        return "an int, a numpy Generator or a torch.Generator"


class _NoneOnly:
    def accepts(self, value) -> bool:
        return value is None

    def __str__(self) -> str:
        return "None"


class _InstanceOf:
    def __init__(self, types, label: str):
        self.types, self.label = types, label

    def accepts(self, value) -> bool:
        return isinstance(value, self.types) and not isinstance(value, (bool, np.bool_, str))

    def __str__(self) -> str:
        return self.label


class _Device:
    def accepts(self, value) -> bool:
        return isinstance(value, (str, torch.device))

    def __str__(self) -> str:
        return "a device name such as 'cpu' or 'cuda:0', or a torch.device"


_NAMED = {"boolean": _Boolean, "random_state": _RandomState, "device": _Device,
          "dict": lambda: _InstanceOf(dict, "a dict"),
          "sequence": lambda: _InstanceOf((list, tuple), "a list or tuple")}


def _as_constraint(c):
    if c is None:
        return _NoneOnly()
    if isinstance(c, str) and c in _NAMED:
        return _NAMED[c]()
    if isinstance(c, (Interval, Options)):
        return c
    raise TypeError(f"unknown parameter constraint {c!r}; use None, {', '.join(repr(k) for k in _NAMED)}, Interval or Options.")


def validate_params(params: Dict[str, Any], constraints: Dict[str, List], owner: str) -> None:
    """Check every parameter that has an entry in ``constraints`` (a list of accepted forms: ``None``,
    ``"boolean"``, ``"random_state"``, :class:`Interval`, :class:`Options`); a value passes when it
    matches one of them. Raises :class:`ValidationError` with one line naming the first bad parameter.

    Examples
    --------
    >>> import numbers
    >>> table = {"n_init": [Interval(numbers.Integral, 1, None, closed="left")],
    ...          "rule": [Options({"otsu", "active"}), None]}
    >>> validate_params({"n_init": 3, "rule": None}, table, "Demo")
    >>> validate_params({"n_init": 3, "rule": "median"}, table, "Demo")
    Traceback (most recent call last):
    ...
    unveil._errors.ValidationError: rule must be one of ['active', 'otsu'] or None, got 'median'; pass a valid value to Demo(...) or set_params().
    """
    for name, forms in constraints.items():
        if name not in params:
            continue
        forms = [_as_constraint(c) for c in forms]
        value = params[name]
        if not any(f.accepts(value) for f in forms):
            expected = " or ".join(str(f) for f in forms)
            raise ValidationError(f"{name} must be {expected}, got {value!r}; pass a valid value to {owner}(...) "
                                  f"or set_params().")


class DirectionEstimator(TransformerMixin, BaseEstimator):
    """Base class of the estimators that learn :class:`~unveil.directions.DirectionPairs`.

    Subclasses define ``__init__`` (assignments only), ``_parameter_constraints`` (parameter name ->
    list of accepted forms, see :func:`validate_params`) and ``fit``, which calls
    :meth:`_validate_params` first and sets ``pairs_`` and ``n_features_in_`` last. See the module
    docstring for the contract.
    """

    _parameter_constraints: Dict[str, List] = {}
    #: learned attributes whose reading before ``fit`` raises NotFittedError (instead of a bare AttributeError)
    _learned_attributes = ("pairs_", "n_features_in_")

    def fit(self, X, y=None, *, head=None) -> "DirectionEstimator":  # pragma: no cover - abstract
        """Learn ``pairs_`` from feature maps ``X`` (labels ``y`` and the head only where a method uses them)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement fit.")

    def set_params(self, **params) -> "DirectionEstimator":
        """Set hyperparameters (scikit-learn's contract); an unknown name is one clear ``ValidationError``."""
        valid = self.get_params(deep=False)
        for k in params:
            if k.partition("__")[0] not in valid:
                raise ValidationError(f"unknown parameter {k!r} for {type(self).__name__}; valid: {sorted(valid)}.")
        return super().set_params(**params)

    def _validate_params(self) -> None:
        """Check the hyperparameters against ``_parameter_constraints`` (once, at the start of ``fit``)."""
        validate_params(self.get_params(deep=False), self._parameter_constraints, type(self).__name__)

    def __sklearn_is_fitted__(self) -> bool:
        return "pairs_" in vars(self)

    def __getattr__(self, name):
        # only reached when normal lookup fails: a learned attribute before fit
        if name in type(self)._learned_attributes:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X) before using {name}.")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X) first.")

    def transform(self, X) -> torch.Tensor:
        """Signal values of the fitted pairs: (N, I, H, W) for maps, (P, I) for patches."""
        self._check_fitted()
        return self.pairs_.signal_values(X)

    def detect(self, X) -> torch.Tensor:
        """Detector activations of the fitted pairs (see :meth:`DirectionPairs.detect`)."""
        self._check_fitted()
        return self.pairs_.detect(X)

