"""Edit directions of direction pairs: which concepts, and which unit vectors to edit them along.

Pure tensor math on :class:`~unveil.directions.DirectionPairs` and feature maps (no model, no hook);
:mod:`unveil.edit.intervention` applies the edits and re-exports these names.

- :func:`resolve_concepts`: concept indices or names -> distinct indices;
- :func:`resolve_directions`: the edit directions ``"signal"`` (ŝ), ``"filter"`` (w/‖w‖),
  ``"mean-difference"`` or given vectors;
- :func:`mean_difference_directions`: each detector's label-free difference of means (Pattern-CAV's
  estimator with the detector as the labeller).
"""
from __future__ import annotations

import numbers
from typing import List, Sequence

import torch

from .._errors import ValidationError
from .._validation import check_maps, check_positive_int

__all__ = ["resolve_concepts", "resolve_directions", "mean_difference_directions", "DIRECTIONS"]

DIRECTIONS = ("signal", "filter", "mean-difference")


def resolve_concepts(pairs, concepts) -> List[int]:
    """Concept indices (ints, names, or a mix) -> a list of distinct ints in ``range(pairs.n_concepts)``."""
    if isinstance(concepts, (numbers.Integral, str)) and not isinstance(concepts, bool):
        concepts = [concepts]
    if isinstance(concepts, torch.Tensor):
        concepts = concepts.flatten().tolist()
    try:
        items = list(concepts)
    except TypeError:
        raise ValidationError(f"concepts must be an index, a name or a list of them, got "
                              f"{type(concepts).__name__}.") from None
    if not items:
        raise ValidationError("concepts is empty; pass at least one concept index (0 .. "
                              f"{pairs.n_concepts - 1}) or name.")
    out: List[int] = []
    for c in items:
        if isinstance(c, str):
            if c not in pairs.names:
                raise ValidationError(f"unknown concept name {c!r}; these pairs have names "
                                      f"{pairs.names[:8]}{' ...' if pairs.n_concepts > 8 else ''}.")
            c = pairs.names.index(c)
        elif isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise ValidationError(f"concept indices must be integers or names, got {c!r}.")
        c = int(c)
        if not 0 <= c < pairs.n_concepts:
            raise ValidationError(f"unknown concept index {c}: these direction pairs have {pairs.n_concepts} "
                                  f"concepts, so indices run from 0 to {pairs.n_concepts - 1}.")
        if c in out:
            raise ValidationError(f"concept {c} is listed twice; list each concept once.")
        out.append(c)
    return out


def resolve_directions(pairs, idx: Sequence[int], direction, maps=None) -> torch.Tensor:
    """The (len(idx), D) edit directions: ``"signal"`` (ŝ), ``"filter"`` (w/‖w‖), ``"mean-difference"``
    (:func:`mean_difference_directions` on ``maps``, which it needs) or given vectors."""
    if isinstance(direction, str):
        if direction == "signal":
            V = pairs.encoders[list(idx)]
            return V / V.norm(dim=1, keepdim=True).clamp_min(1e-30)
        if direction == "filter":
            V = pairs.decoders[list(idx)]
            return V / V.norm(dim=1, keepdim=True).clamp_min(1e-30)
        if direction == "mean-difference":
            if maps is None:
                raise ValidationError("direction 'mean-difference' is measured on feature maps where the concepts "
                                      "occur; pass them (maps=..., or reference images), or use direction='signal'.")
            V = mean_difference_directions(maps, pairs, list(idx))
            bad = [int(c) for c, ok in zip(idx, torch.isfinite(V).all(1).tolist()) if not ok]
            if bad:
                raise ValidationError(f"concepts {bad} are detected at no position (or at every position) of the "
                                      f"reference maps, so their mean difference is undefined; use images where "
                                      f"they occur, or direction='signal'.")
            return V.to(pairs.decoders.device)
        raise ValidationError(f"direction must be one of {DIRECTIONS} or a ({len(idx)}, {pairs.n_features}) "
                              f"tensor of directions, got {direction!r}.")
    V = torch.as_tensor(direction, dtype=torch.float32)
    if V.dim() == 1:
        V = V[None]
    if V.shape != (len(idx), pairs.n_features):
        raise ValidationError(f"direction tensors must have shape ({len(idx)}, {pairs.n_features}) (one "
                              f"{pairs.n_features}-d vector per edited concept), got {tuple(V.shape)}.")
    if not torch.isfinite(V).all() or (V.norm(dim=1) == 0).any():
        raise ValidationError("direction vectors must be finite and non-zero.")
    return V.detach().to(pairs.decoders.device).contiguous()


def mean_difference_directions(maps, pairs, concepts=None, *, threshold: float = 0.5, batch_size: int = 64,
                               normalize: bool = True) -> torch.Tensor:
    """Each concept's mean difference: mean of the positions its detector fires at minus the others'.

    This is Pattern-CAV's estimator (difference of class means) with the concept's own detector as
    the labeller (``y_{p,i} > threshold``), so it needs no annotation. It differs from the signal
    vector ``ŝ_i``, which is estimated *within* the positive positions (method.md §3): ŝ follows how
    the representation varies with the concept's strength, the mean difference how it changes from
    "absent" to "present", confounds included (co-occurring concepts shift it too).

    Parameters
    ----------
    maps : tensor (N, D, H, W)
        Feature maps of the layer the pairs were fitted on (e.g. the fit images).
    pairs : DirectionPairs
    concepts : int, str or sequence, optional
        Default: every concept.
    threshold : float
        A position is positive where the detector's output exceeds it.
    batch_size : int
        Images per step (the maps are streamed).
    normalize : bool
        Return unit vectors (default) or the raw differences.

    Returns
    -------
    tensor (len(concepts), D); rows of concepts detected at no position, or at every position, are NaN.
    """
    X = check_maps(maps, "maps", n_features=pairs.n_features, allow_patches=False,
                   context=f"these direction pairs (layer {pairs.meta.get('layer', '?')!r})")
    idx = list(range(pairs.n_concepts)) if concepts is None else resolve_concepts(pairs, concepts)
    batch_size = check_positive_int(batch_size, "batch_size")
    D = X.shape[1]
    sum_pos = torch.zeros(len(idx), D, dtype=torch.float64)
    sum_all = torch.zeros(D, dtype=torch.float64)
    n_pos = torch.zeros(len(idx), dtype=torch.float64)
    for s in range(0, X.shape[0], batch_size):
        xb = X[s:s + batch_size]
        P = xb.permute(0, 2, 3, 1).reshape(-1, D).double()
        Y = (pairs.detect(xb)[:, idx].permute(0, 2, 3, 1).reshape(-1, len(idx)) > threshold).double()
        sum_pos += (Y.T @ P).cpu()
        sum_all += P.sum(0).cpu()
        n_pos += Y.sum(0).cpu()
    n = float(X.shape[0] * X.shape[2] * X.shape[3])
    n_neg = n - n_pos
    out = sum_pos / n_pos.clamp_min(1)[:, None] - (sum_all[None] - sum_pos) / n_neg.clamp_min(1)[:, None]
    if normalize:
        out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-30)
    out = out.float()
    out[(n_pos == 0) | (n_neg == 0)] = float("nan")
    return out
