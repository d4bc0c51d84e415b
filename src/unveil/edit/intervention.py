"""The intervention at a layer: remove or insert concepts along their encoding directions.

For a concept i with detector ``(w_i, b_i)`` and signal vector ``ŝ_i`` (unit length), every
position p of the layer's feature map is edited as

    x'_p = x_p ∓ m_p · k_p · v_i          (− removes, + inserts)

- ``m_p = σ(w_iᵀx_p − b_i)``: the detector's activation (a soft mask: the edit happens where the
  concept is detected). A ``region`` mask replaces it.
- ``v_i``: the direction written along. ``"signal"`` (default here) is ``ŝ_i``; ``"filter"`` is the unit
  decoding direction ``w_i/‖w_i‖`` (the control the paper compares against); ``"mean-difference"`` is
  the detector's label-free difference of means (:func:`mean_difference_directions`, measured on the
  maps being edited unless given); a tensor gives any other unit directions (random directions,
  Pattern-CAV, ...). :class:`~unveil.edit.CorrectedModel` edits along the mean difference by default
  (README, "Which direction to edit with").
- ``k_p``: the strength. A number k is used as is (in the layer's units: the directions are unit
  vectors, so ``k`` is the length of the vector removed at a fully detected position). ``None``
  ("auto") removes *exactly what the detector reads*: ``k_p = (w_iᵀx_p − w_iᵀμ) / (w_iᵀv_i)``, with
  μ the data mean stored in the pairs. For ``v_i = ŝ_i`` this is the concept's signal value
  ``â_{p,i}`` (``DirectionPairs.signal_values``); after the edit of a fully detected position
  (``m_p = 1``) the detector reads ``w_iᵀx'_p = w_iᵀμ``, the value of an average patch.
- With several concepts, every mask and strength is computed on the *unedited* map and the edits
  are summed (the order of the concepts does not matter).
- When the layer's output is non-negative (post-ReLU), the result is clamped with ReLU so the
  edited map stays a possible output of the layer. ``nonneg=None`` detects this per batch (all
  activations ≥ 0); ``True``/``False`` force it.

:func:`edit_layer` applies such an edit inside a model's forward pass: it is
:func:`unveil.capture.on_layer` with ``replace=``, so the edit sees the layer's maps exactly as
:func:`unveil.capture.capture` returns them; the hook is removed when the ``with`` block exits,
also on errors.
"""
from __future__ import annotations

import logging
import numbers
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from .._errors import ValidationError
from .._validation import check_maps
from ..capture.hooks import on_layer
from ..directions.editing_directions import (DIRECTIONS, mean_difference_directions, resolve_concepts,
                                              resolve_directions)

__all__ = ["edit_maps", "edit_layer", "resolve_concepts", "resolve_directions", "check_strength",
           "mean_difference_directions", "MODES", "DIRECTIONS"]
logger = logging.getLogger("unveil")

MODES = ("remove", "insert")


def check_strength(strength) -> Optional[float]:
    if strength is None:
        return None
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not float(strength) == float(strength) \
            or abs(float(strength)) == float("inf"):
        raise ValidationError(f"strength must be a finite number (or None for the concept's own signal value), "
                              f"got {strength!r}.")
    if float(strength) < 0:
        raise ValidationError(f"strength must be >= 0 (use mode='insert' to add a concept), got {strength!r}.")
    return float(strength)


def _region(region, X: torch.Tensor) -> torch.Tensor:
    """A region mask as (N, 1, H, W) float on X's device, from (H, W), (N, H, W) or (N, 1, H, W)."""
    R = torch.as_tensor(region)
    if R.dtype == torch.bool:
        R = R.float()
    R = R.to(device=X.device, dtype=X.dtype)
    N, _, H, W = X.shape
    if R.dim() == 2:
        R = R[None, None]
    elif R.dim() == 3:
        R = R[:, None]
    if R.dim() != 4 or R.shape[1] != 1 or R.shape[2:] != (H, W) or R.shape[0] not in (1, N):
        raise ValidationError(f"region must be a mask on the layer's {H} x {W} grid: shape ({H}, {W}), "
                              f"(N, {H}, {W}) or (N, 1, {H}, {W}) with N = {N}; got {tuple(torch.as_tensor(region).shape)}.")
    return R


def edit_maps(X, pairs, concepts, *, strength: Optional[float] = None, mode: str = "remove",
              direction: Union[str, torch.Tensor] = "signal", region=None,
              nonneg: Optional[bool] = None) -> torch.Tensor:
    """Remove or insert ``concepts`` in feature maps (see the module docstring for the formula).

    Parameters
    ----------
    X : tensor (N, D, H, W)
        Feature maps of the layer the pairs were fitted on.
    pairs : DirectionPairs
    concepts : int, str or sequence
        Concept indices (or names).
    strength : float or None
        k (>= 0) in the layer's units, or None for the concept's own signal value ("remove what the
        detector reads").
    mode : {"remove", "insert"}
    direction : {"signal", "filter", "mean-difference"} or tensor (len(concepts), D)
        ``"mean-difference"`` is measured on ``X`` itself; pass a tensor from
        :func:`mean_difference_directions` to measure it once on other maps.
    region : mask, optional
        (H, W), (N, H, W) or (N, 1, H, W) weights replacing the detector mask m_p.
    nonneg : bool or None
        Clamp the result at 0 (None: when every entry of X is >= 0).

    Returns
    -------
    tensor (N, D, H, W)

    Examples
    --------
    >>> import torch
    >>> from unveil import DirectionPairs
    >>> pairs = DirectionPairs(torch.eye(2) * 10, torch.full((2,), 5.0), torch.eye(2))
    >>> X = torch.tensor([1.0, 0.2]).reshape(1, 2, 1, 1)
    >>> edit_maps(X, pairs, 0).flatten()  # concept 0 (detected) removed: its signal value 1 is taken away
    tensor([0.0067, 0.2000])
    """
    if mode not in MODES:
        raise ValidationError(f"mode must be one of {MODES}, got {mode!r}.")
    X = check_maps(X, "X", n_features=pairs.n_features, allow_patches=False, detach=False,
                   context=f"these direction pairs (layer {pairs.meta.get('layer', '?')!r})")
    idx = resolve_concepts(pairs, concepts)
    k = check_strength(strength)
    V = resolve_directions(pairs, idx, direction, maps=X.detach() if direction == "mean-difference" else None)
    V = V.to(device=X.device, dtype=X.dtype)
    W = pairs.decoders[idx].to(device=X.device, dtype=X.dtype)
    b = pairs.biases[idx].to(device=X.device, dtype=X.dtype)
    z = torch.einsum("ndhw,id->nihw", X, W)
    if region is None:
        m = torch.sigmoid(z - b[None, :, None, None])
    else:
        m = _region(region, X).expand(X.shape[0], len(idx), *X.shape[2:])
    if k is None:
        if mode == "insert":
            raise ValidationError("mode='insert' needs an explicit strength (there is no signal value to read "
                                  "where the concept is absent); pass strength=k.")
        mu = pairs.mean.to(device=X.device, dtype=X.dtype)
        wv = (W * V).sum(1)
        if (wv.abs() < 1e-12).any():
            raise ValidationError("a direction is orthogonal to its concept's decoder (wᵀv = 0), so the automatic "
                                  "strength is undefined; pass strength=k.")
        amount = m * (z - (W @ mu)[None, :, None, None]) / wv[None, :, None, None]
    else:
        amount = m * k
    delta = torch.einsum("nihw,id->ndhw", amount, V)
    out = X - delta if mode == "remove" else X + delta
    if nonneg is None:
        nonneg = bool((X >= 0).all())
    if nonneg:
        out = out.clamp_min(0)
    return out


# ------------------------------------------------------------------------------------- hooks
@contextmanager
def edit_layer(model: nn.Module, layer: str, fn: Callable[[torch.Tensor], torch.Tensor], *,
               tokens: str = "patches", prefix_tokens: Optional[int] = None) -> Iterator[None]:
    """Replace ``layer``'s output by ``fn(maps)`` during the forward passes run inside the block.

    ``fn`` receives the output as ``(N, D, H, W)`` maps (vectors as ``(N, D, 1, 1)``, ViT tokens
    on their patch grid; prefix tokens are passed through unchanged) and returns maps of the same
    shape. The hook is removed when the block exits, also when it raises. This is
    :func:`unveil.capture.on_layer` with ``replace=fn``; the maps are laid out exactly as
    :func:`unveil.capture.capture` returns them.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten())
    >>> with edit_layer(net, "0", lambda m: m * 0):
    ...     net(torch.ones(1, 1, 2, 2)).abs().sum().item()
    0.0
    """
    with on_layer(model, layer, replace=fn, tokens=tokens, prefix_tokens=prefix_tokens):
        yield
