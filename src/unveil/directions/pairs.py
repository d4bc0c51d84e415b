"""`DirectionPairs`: decoding directions (filters + thresholds) and encoding directions (signal vectors).

Direction pairs are a value: the constructor copies every tensor it is given, ``names`` and ``meta``
are read-only, and every change (:meth:`DirectionPairs.with_names`, :meth:`~DirectionPairs.with_meta`,
:meth:`~DirectionPairs.replace`, :meth:`~DirectionPairs.to`) returns new pairs. Two pairs are equal
(``==``) when their tensors are exactly equal and their names, metadata and detection rule agree.

How a concept is detected is a field, ``detection_rule``:

- ``"threshold"`` (default): concept i is present where ``σ(w_iᵀx − b_i) > 0.5``, one hyperplane
  per concept (EDDP and most baselines);
- ``"argmax"``: exactly one concept per position, the arg-max of affine scores ``A_k·x + c_k``
  (``score_weights``, ``score_offsets``); this expresses nearest-centroid (k-means) and
  largest-cosine (spherical k-means) assignment.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

from .._errors import CorruptFileError, OutputExistsError, ValidationError
from .._io import _is_ours, load_bundle, save_bundle
from .._validation import as_tensor, check_maps

__all__ = ["DirectionPairs", "ArgmaxPairs", "DETECTION_RULES"]

#: The detection rules a :class:`DirectionPairs` can hold.
DETECTION_RULES = ("threshold", "argmax")
# the saved format of each rule (the file names are ``<kind>.json`` + ``<kind>.safetensors``)
_KIND = {"threshold": "pairs", "argmax": "argmax_pairs"}
_TENSORS = ("decoders", "biases", "encoders", "mean")
_SCORES = ("score_weights", "score_offsets")

_READ_ONLY = ("DirectionPairs are immutable: their names and meta cannot be changed in place; "
              "pairs.with_names(...) and pairs.with_meta(...) return new pairs with the change.")


def _read_only(*_args, **_kwargs):
    raise TypeError(_READ_ONLY)


class _ReadOnlyList(list):
    """A list that refuses every change (``names``, and lists inside ``meta``); JSON-serialisable."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __reduce_ex__(self, protocol):
        return type(self), (list(self),)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return type(self)(copy.deepcopy(list(self), memo))


class _ReadOnlyDict(dict):
    """A dict that refuses every change (``meta`` and the dicts inside it); JSON-serialisable."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    update = pop = popitem = clear = setdefault = _read_only

    def __reduce_ex__(self, protocol):
        return type(self), (dict(self),)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return type(self)(copy.deepcopy(dict(self), memo))


def _freeze(value):
    """A read-only deep copy of JSON-like ``value`` (dicts and lists/tuples become read-only; a tuple
    becomes a list, as it would after a save and load)."""
    if isinstance(value, (_ReadOnlyDict, _ReadOnlyList, str, int, float, bool, type(None))):
        return value
    if isinstance(value, Mapping):
        return _ReadOnlyDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return _ReadOnlyList(_freeze(v) for v in value)
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is kept (and refused by save)
        return value


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares no memory with the caller's tensor."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _same_tensor(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


class DirectionPairs:
    """I concepts of one layer, each a pair of directions in the layer's D-dimensional space.

    An immutable value: the tensors are copied on construction, ``names`` and ``meta`` are
    read-only, and the ``with_*``/``replace``/``to`` methods return new pairs.

    Parameters
    ----------
    decoders : (I, D) tensor
        Row i is the decoding direction with its magnitude, ``g_i * w̄_i``.
    biases : (I,) tensor
        Detector thresholds ``b_i``: concept i is detected where ``σ(w_iᵀx − b_i) > 0.5``.
    encoders : (I, D) tensor
        Signal vectors ``ŝ_i`` (how concept i is written into the representation).
    mean : (D,) tensor, optional
        The data mean ``E[x]``; signal values are measured relative to it (zeros if omitted).
    names : list of str, optional
        A label per concept (e.g. from dissection). Defaults to ``"concept_<i>"``.
    meta : dict, optional
        Free-form JSON-serialisable metadata (layer, model, seed, method, ...).
    detection_rule : {"threshold", "argmax"}
        ``"threshold"`` (default): concept i is present where ``σ(w_iᵀx − b_i) > 0.5``.
        ``"argmax"``: ``detect(X)[n, i, h, w] = 1`` where ``i = argmax_k (A_k·x + c_k)`` and 0
        elsewhere (exactly one concept per position); ``decision_function`` returns the scores minus
        the best other score (> 0 exactly where the concept is detected). The biases are then not
        used for detection.
    score_weights : (I, D) tensor, optional
        ``A``; required with ``detection_rule="argmax"`` and refused otherwise.
    score_offsets : (I,) tensor, optional
        ``c``; required with ``detection_rule="argmax"`` and refused otherwise.

    Examples
    --------
    >>> import torch
    >>> from unveil import DirectionPairs
    >>> p = DirectionPairs(torch.eye(2), torch.zeros(2), torch.eye(2))
    >>> p.detect(torch.ones(1, 2, 3, 3)).shape
    torch.Size([1, 2, 3, 3])
    >>> p.names
    ['concept_0', 'concept_1']
    >>> q = p.with_names(["stripes", "dots"])
    >>> q.names, p.names[0]
    (['stripes', 'dots'], 'concept_0')
    >>> q == p, q == p.with_names(["stripes", "dots"])
    (False, True)

    Nearest-centroid assignment to the centroids (0, 0) and (4, 0) as argmax pairs:

    >>> mu = torch.tensor([[0., 0.], [4., 0.]])
    >>> km = DirectionPairs(mu, torch.zeros(2), mu, detection_rule="argmax",
    ...                     score_weights=2 * mu, score_offsets=-(mu ** 2).sum(1))
    >>> km.detect(torch.tensor([[1., 0.], [3., 1.]]))
    tensor([[1., 0.],
            [0., 1.]])
    """

    __hash__ = None  # equality is by value, and the tensors could be written in place

    def __init__(self, decoders, biases, encoders, mean=None, names: Optional[List[str]] = None,
                 meta: Optional[dict] = None, *, detection_rule: str = "threshold", score_weights=None,
                 score_offsets=None):
        # copies: writing the caller's tensors later must not change these pairs, and results must
        # not depend on the memory layout of the inputs
        W = _own(as_tensor(decoders, "decoders"))
        b = _own(as_tensor(biases, "biases"))
        S = _own(as_tensor(encoders, "encoders"))
        if W.dim() != 2:
            raise ValidationError(f"decoders must be (I, D), got shape {tuple(W.shape)}.")
        n, d = W.shape
        if b.shape != (n,):
            raise ValidationError(f"biases must have shape ({n},) to match decoders {tuple(W.shape)}, got {tuple(b.shape)}.")
        if S.shape != (n, d):
            raise ValidationError(f"encoders must have shape {(n, d)} to match decoders, got {tuple(S.shape)}.")
        m = torch.zeros(d) if mean is None else _own(as_tensor(mean, "mean"))
        if m.shape != (d,):
            raise ValidationError(f"mean must have shape ({d},), got {tuple(m.shape)}.")
        for name, t in (("decoders", W), ("biases", b), ("encoders", S), ("mean", m)):
            if not torch.isfinite(t).all():
                raise ValidationError(f"{name} contains NaN or infinite values.")
        A, c = self._check_rule(detection_rule, score_weights, score_offsets, n, d)
        if names is None:
            names = [f"concept_{i}" for i in range(n)]
        if isinstance(names, str) or len(names) != n:
            raise ValidationError(f"names must have one entry per concept ({n}), got "
                                  f"{len(names) if not isinstance(names, str) else 'a single string'}.")
        fields = {"_decoders": W, "_biases": b, "_encoders": S, "_mean": m.to(W.device),
                  "_names": _ReadOnlyList(str(x) for x in names), "_meta": _freeze(dict(meta or {})),
                  "_detection_rule": detection_rule,
                  "_score_weights": None if A is None else A.to(W.device),
                  "_score_offsets": None if c is None else c.to(W.device)}
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    @staticmethod
    def _check_rule(rule, A, c, n, d):
        if rule not in DETECTION_RULES:
            raise ValidationError(f"detection_rule must be one of {list(DETECTION_RULES)}, got {rule!r}.")
        if rule == "threshold":
            if A is not None or c is not None:
                raise ValidationError("score_weights and score_offsets are used only with detection_rule='argmax'; "
                                      "pass detection_rule='argmax' or leave them out.")
            return None, None
        if A is None or c is None:
            raise ValidationError("detection_rule='argmax' needs score_weights (I, D) and score_offsets (I,).")
        A, c = _own(as_tensor(A, "score_weights")), _own(as_tensor(c, "score_offsets"))
        if A.shape != (n, d) or c.shape != (n,):
            raise ValidationError(f"score_weights must be {(n, d)} and score_offsets ({n},); got {tuple(A.shape)} "
                                  f"and {tuple(c.shape)}.")
        for name, t in (("score_weights", A), ("score_offsets", c)):
            if not torch.isfinite(t).all():
                raise ValidationError(f"{name} contains NaN or infinite values.")
        return A, c

    # ------------------------------------------------------------- fields
    @property
    def decoders(self) -> torch.Tensor:
        """(I, D) decoding directions (treat as read-only: the tensor is the pairs' own)."""
        return self._decoders

    @property
    def biases(self) -> torch.Tensor:
        """(I,) detector thresholds."""
        return self._biases

    @property
    def encoders(self) -> torch.Tensor:
        """(I, D) signal vectors."""
        return self._encoders

    @property
    def mean(self) -> torch.Tensor:
        """(D,) data mean."""
        return self._mean

    @property
    def names(self) -> List[str]:
        """One label per concept (a read-only list; see :meth:`with_names`)."""
        return self._names

    @property
    def meta(self) -> Dict:
        """Metadata (a read-only dict, nested values read-only too; see :meth:`with_meta`)."""
        return self._meta

    @property
    def detection_rule(self) -> str:
        """``"threshold"`` or ``"argmax"`` (see the class docstring)."""
        return self._detection_rule

    @property
    def score_weights(self) -> Optional[torch.Tensor]:
        """(I, D) score weights of the ``"argmax"`` rule; ``None`` for ``"threshold"``."""
        return self._score_weights

    @property
    def score_offsets(self) -> Optional[torch.Tensor]:
        """(I,) score offsets of the ``"argmax"`` rule; ``None`` for ``"threshold"``."""
        return self._score_offsets

    def __setattr__(self, name, value):
        raise AttributeError(f"DirectionPairs are immutable: cannot set {name!r}. Build changed pairs with "
                             f"pairs.replace({name}=...), pairs.with_names(...) or pairs.with_meta(...).")

    def __delattr__(self, name):
        raise AttributeError(f"DirectionPairs are immutable: cannot delete {name!r}.")

    # ------------------------------------------------------------ new values
    def _fields(self) -> dict:
        return {"decoders": self._decoders, "biases": self._biases, "encoders": self._encoders, "mean": self._mean,
                "names": self._names, "meta": self._meta, "detection_rule": self._detection_rule,
                "score_weights": self._score_weights, "score_offsets": self._score_offsets}

    def replace(self, **changes) -> "DirectionPairs":
        """New pairs with some fields replaced (any constructor argument); these pairs are unchanged.

        Switching ``detection_rule`` to ``"threshold"`` drops the score weights and offsets.

        Examples
        --------
        >>> import torch
        >>> p = DirectionPairs(torch.eye(2), torch.zeros(2), torch.eye(2))
        >>> p.replace(biases=torch.ones(2)).biases, p.biases
        (tensor([1., 1.]), tensor([0., 0.]))
        """
        fields = self._fields()
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ValidationError(f"cannot replace {unknown}: DirectionPairs fields are {sorted(fields)}.")
        if changes.get("detection_rule") == "threshold":
            fields.update(score_weights=None, score_offsets=None)
        fields.update(changes)
        return DirectionPairs(**fields)

    def with_names(self, names) -> "DirectionPairs":
        """New pairs with these concept names (one per concept).

        Examples
        --------
        >>> import torch
        >>> p = DirectionPairs(torch.eye(2), torch.zeros(2), torch.eye(2))
        >>> p.with_names(["a", "b"]).names
        ['a', 'b']
        """
        return self.replace(names=names)

    def with_meta(self, updates: Optional[Mapping] = None, /, **more) -> "DirectionPairs":
        """New pairs whose metadata is this ``meta`` updated with ``updates`` and keyword entries.

        Examples
        --------
        >>> import torch
        >>> p = DirectionPairs(torch.eye(2), torch.zeros(2), torch.eye(2), meta={"method": "pca"})
        >>> q = p.with_meta({"layer": "layer4"}, model_id="resnet18")
        >>> dict(q.meta) == {"method": "pca", "layer": "layer4", "model_id": "resnet18"}, dict(p.meta)
        (True, {'method': 'pca'})
        """
        return self.replace(meta={**self._meta, **dict(updates or {}), **more})

    def to(self, device) -> "DirectionPairs":
        """The same pairs with every tensor on ``device``."""
        return self.replace(**{k: v.to(device) for k, v in self._fields().items() if isinstance(v, torch.Tensor)})

    def __eq__(self, other):
        if not isinstance(other, DirectionPairs):
            return NotImplemented
        if self._detection_rule != other._detection_rule or list(self._names) != list(other._names):
            return False
        try:
            same_meta = bool(self._meta == other._meta)
        except (ValueError, RuntimeError, TypeError):  # e.g. arrays inside meta (not JSON)
            same_meta = False
        return same_meta and all(_same_tensor(getattr(self, k), getattr(other, k)) for k in _TENSORS + _SCORES)

    # ------------------------------------------------------------------ shape
    @property
    def n_concepts(self) -> int:
        return self._decoders.shape[0]

    @property
    def n_features(self) -> int:
        return self._decoders.shape[1]

    def __len__(self) -> int:
        return self.n_concepts

    def __repr__(self) -> str:
        layer = self._meta.get("layer")
        return (f"DirectionPairs(n_concepts={self.n_concepts}, n_features={self.n_features}"
                + (f", layer={layer!r}" if layer else "")
                + (f", detection_rule={self._detection_rule!r}" if self._detection_rule != "threshold" else "") + ")")

    # --------------------------------------------------------------- compute
    def _project(self, X) -> torch.Tensor:
        """``w_iᵀx`` per position; float32, or float64 where float32 overflows (|x| near 3.4e38)."""
        X = check_maps(X, "X", n_features=self.n_features, detach=False,
                       context=f"these direction pairs (layer {self._meta.get('layer', '?')!r})")
        z = _einsum(X, self._decoders.to(X.device))
        if not torch.isfinite(z).all():
            # finite inputs whose products or sums leave float32's range: exact enough in float64
            z = _einsum(X.double(), self._decoders.to(X.device, torch.float64))
        return z

    def _scores(self, X) -> torch.Tensor:
        """The argmax rule's affine scores ``A_k·x + c_k`` per position."""
        X = check_maps(X, "X", n_features=self.n_features, context="these direction pairs")
        A, c = self._score_weights.to(X.device), self._score_offsets.to(X.device)
        if X.dim() == 2:
            return X @ A.T + c
        return torch.einsum("ndhw,id->nihw", X, A) + c[None, :, None, None]

    def _bias_shape(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        v = v.to(z.device, z.dtype)
        return v if z.dim() == 2 else v[None, :, None, None]

    def decision_function(self, X) -> torch.Tensor:
        """``w_iᵀx − b_i`` per position: (N, I, H, W) for maps, (P, I) for patches.

        With ``detection_rule="argmax"``: each score minus the best other score.
        """
        if self._detection_rule == "argmax":
            s = self._scores(X)
            if self.n_concepts == 1:
                return torch.ones_like(s)
            top2 = s.topk(2, dim=1).values
            best_other = torch.where(s >= top2.narrow(1, 0, 1), top2.narrow(1, 1, 1), top2.narrow(1, 0, 1))
            return s - best_other
        z = self._project(X)
        d = z - self._bias_shape(z, self._biases)
        if not torch.isfinite(d).all():
            z = z.double()
            d = z - self._bias_shape(z, self._biases)
        return _as_float32(d, "decision values w_iᵀx − b_i")

    def detect(self, X) -> torch.Tensor:
        """Detector activations ``σ(w_iᵀx − b_i)`` in [0, 1]; concept present where > 0.5.

        With ``detection_rule="argmax"``: one-hot of the arg-max of the scores along the concept axis.
        """
        if self._detection_rule == "argmax":
            s = self._scores(X)
            return torch.nn.functional.one_hot(s.argmax(1), self.n_concepts).movedim(-1, 1).to(s.dtype)
        z = self._project(X)
        return torch.sigmoid(z - self._bias_shape(z, self._biases)).float()

    def signal_values(self, X) -> torch.Tensor:
        """Mean-centred latent factors ``(w_iᵀx − w_iᵀE[x]) / (w_iᵀŝ_i)`` (method.md §3)."""
        z = self._project(X)
        W = self._decoders.to(z.device)
        offset = W @ self._mean.to(z.device)
        scale = (W * self._encoders.to(z.device)).sum(1)
        tiny = scale.abs() < 1e-12
        if tiny.any():
            raise ValidationError(f"decoder and encoder of concepts {tiny.nonzero().flatten().tolist()} are "
                                  f"orthogonal (wᵀŝ = 0), so their signal values are undefined.")
        out = (z - self._bias_shape(z, offset)) / self._bias_shape(z, scale)
        if not torch.isfinite(out).all():
            W = W.double()
            offset, scale = W @ self._mean.to(z.device, torch.float64), (W * self._encoders.to(z.device)).sum(1)
            z = z.double()
            out = (z - self._bias_shape(z, offset)) / self._bias_shape(z, scale)
        return _as_float32(out, "signal values")

    # ----------------------------------------------------------- persistence
    def save(self, path, overwrite: bool = True) -> Path:
        """Save to the folder ``path`` as ``pairs.json`` + ``pairs.safetensors`` (one transaction; no pickle).

        Argmax pairs are saved as ``argmax_pairs.json`` + ``argmax_pairs.safetensors`` (with the score
        weights and offsets); :meth:`load` tells the two apart. Files of those names that unveil did
        not write are never replaced; saved pairs (of either rule) are replaced only when
        ``overwrite``.

        Examples
        --------
        >>> import tempfile, torch
        >>> p = DirectionPairs(torch.eye(2), torch.zeros(2), torch.eye(2), meta={"layer": "layer4"})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = p.save(tmp)
        ...     DirectionPairs.load(tmp) == p
        True
        """
        kind = _KIND[self._detection_rule]
        directory = Path(path)
        others = [k for k in _KIND.values() if k != kind and _is_ours(directory / f"{k}.json", k)]
        if others and not overwrite:
            raise OutputExistsError(f"{str(directory)!r} already holds saved pairs ({others[0]}.json); pass "
                                    f"overwrite=True (CLI: --overwrite) to replace them, or choose another folder.")
        tensors = {k: self._fields()[k] for k in _TENSORS + (_SCORES if self._detection_rule == "argmax" else ())}
        out = save_bundle(directory, kind, tensors,
                          {"n_concepts": self.n_concepts, "n_features": self.n_features,
                           "names": list(self._names), "meta": self._meta}, overwrite=overwrite)
        for other in others:  # saved pairs of the other rule were replaced by these: one set per folder
            for suffix in (".json", ".safetensors"):
                try:
                    (directory / f"{other}{suffix}").unlink()
                except FileNotFoundError:
                    pass
        return out

    @classmethod
    def load(cls, path, device="cpu") -> "DirectionPairs":
        """Load pairs saved by :meth:`save`, whatever their detection rule.

        Raises :class:`CorruptFileError` on a damaged folder.
        """
        directory = Path(path)
        kinds = [k for k in _KIND.values() if _is_ours(directory / f"{k}.json", k)]
        if len(kinds) > 1:
            raise CorruptFileError(f"{str(directory)!r} holds two sets of saved pairs ({' and '.join(kinds)}); "
                                   f"remove the one you do not want, or save the pairs again.")
        if not kinds:  # nothing of ours: load_bundle says what is wrong with what is there (or missing)
            kinds = [k for k in _KIND.values() if (directory / f"{k}.json").exists()][:1] or ["pairs"]
        kind = kinds[0]
        rule = {v: k for k, v in _KIND.items()}[kind]
        tensors, doc = load_bundle(directory, kind)
        names, meta = doc.get("names"), doc.get("meta")
        if names is not None and not (isinstance(names, list) and all(isinstance(v, str) for v in names)):
            raise CorruptFileError(f"saved pairs at {str(path)!r}: 'names' is a {type(names).__name__}, expected a "
                                   f"list of strings. Save the pairs again.")
        if meta is not None and not isinstance(meta, dict):
            raise CorruptFileError(f"saved pairs at {str(path)!r}: 'meta' is a {type(meta).__name__}, expected an "
                                   f"object (dict). Save the pairs again.")
        try:
            scores = {k: tensors[k] for k in _SCORES} if rule == "argmax" else {}
            obj = cls(tensors["decoders"], tensors["biases"], tensors["encoders"], tensors["mean"],
                      names=names, meta=meta, detection_rule=rule, **scores)
        except (KeyError, TypeError, ValueError) as exc:  # ValidationError is a ValueError
            raise CorruptFileError(f"saved pairs at {str(path)!r} are inconsistent ({exc}).") from None
        return obj.to(device)


class _ArgmaxPairsMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, DirectionPairs) and obj.detection_rule == "argmax"


class ArgmaxPairs(metaclass=_ArgmaxPairsMeta):
    """Argmax direction pairs, kept for compatibility: ``ArgmaxPairs(...)`` returns a
    :class:`DirectionPairs` with ``detection_rule="argmax"``.

    ``isinstance(p, ArgmaxPairs)`` is true for such pairs, and :meth:`load` loads them (refusing
    threshold pairs). New code should use :class:`DirectionPairs` directly.

    Examples
    --------
    >>> import torch
    >>> p = ArgmaxPairs(torch.eye(2), torch.zeros(2), torch.eye(2), score_weights=torch.eye(2),
    ...                 score_offsets=torch.zeros(2))
    >>> type(p).__name__, p.detection_rule, isinstance(p, ArgmaxPairs)
    ('DirectionPairs', 'argmax', True)
    """

    def __new__(cls, decoders, biases, encoders, mean=None, names=None, meta=None, *, score_weights,
                score_offsets) -> DirectionPairs:
        return DirectionPairs(decoders, biases, encoders, mean, names, meta, detection_rule="argmax",
                              score_weights=score_weights, score_offsets=score_offsets)

    @staticmethod
    def load(path, device="cpu") -> DirectionPairs:
        """:meth:`DirectionPairs.load`, refusing pairs whose detection rule is not ``"argmax"``."""
        pairs = DirectionPairs.load(path, device)
        if pairs.detection_rule != "argmax":
            raise CorruptFileError(f"no saved argmax pairs at {str(path)!r}: the folder holds pairs with detection "
                                   f"rule {pairs.detection_rule!r}; load them with DirectionPairs.load.")
        return pairs


def _einsum(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return X @ W.T if X.dim() == 2 else torch.einsum("ndhw,id->nihw", X, W)


def _as_float32(z: torch.Tensor, what: str) -> torch.Tensor:
    """``z`` as float32; a value beyond float32's range (about 3.4e38) is refused, never returned as inf/NaN."""
    out = z.float()
    if not torch.isfinite(out).all():
        big = float(z.detach().abs().max())
        raise ValidationError(f"the {what} reach {big:.3g}, beyond the float32 range (3.4e38): the activations "
                              f"are too large for these direction pairs. Rescale the maps (e.g. divide by their "
                              f"largest value) or check the model's numerics.")
    return out
