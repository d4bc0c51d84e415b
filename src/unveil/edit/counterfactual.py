"""Counterfactuals: what the model predicts when a concept is removed from, or inserted into, an image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .._errors import ValidationError
from .._validation import check_positive_int
from ..capture.layers import model_device_dtype
from .intervention import check_strength, edit_layer, edit_maps, resolve_concepts

__all__ = ["Counterfactual", "counterfactual", "check_images"]


def check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValidationError(f"images must be a (N, C, H, W) tensor of preprocessed images, got {got}; for one "
                              f"image add a batch axis (image[None]).")
    if images.shape[0] == 0:
        raise ValidationError("images is empty (N = 0); pass at least one image.")
    if not images.is_floating_point():
        raise ValidationError(f"images must be floating point (preprocessed), got dtype {images.dtype}.")
    return images


@dataclass
class Counterfactual:
    """Predictions before and after an edit.

    Attributes
    ----------
    probs_before, probs_after : tensor (N, K)
        Softmax of the logits of the unedited and the edited forward pass.
    logits_before, logits_after : tensor (N, K)
    concepts : list of int
    mode : str
    strength : float or None
    """

    probs_before: torch.Tensor
    probs_after: torch.Tensor
    logits_before: torch.Tensor
    logits_after: torch.Tensor
    concepts: list
    mode: str
    strength: Optional[float]

    @property
    def pred_before(self) -> torch.Tensor:
        return self.probs_before.argmax(1)

    @property
    def pred_after(self) -> torch.Tensor:
        return self.probs_after.argmax(1)

    @property
    def flipped(self) -> torch.Tensor:
        """Bool (N,): the predicted class changed."""
        return self.pred_before != self.pred_after


@torch.no_grad()
def counterfactual(model: nn.Module, layer: str, pairs, images, concept, *, strength: Optional[float] = None,
                   mode: str = "remove", region=None, direction: Union[str, torch.Tensor] = "signal",
                   nonneg: Optional[bool] = None, batch_size: int = 32, tokens: str = "patches") -> Counterfactual:
    """Remove or insert a concept at the layer and return the new class probabilities.

    The edit is ``x'_p = x_p ∓ m_p·k·ŝ_i`` at every position p of ``layer``'s output, with
    ``m_p = σ(w_iᵀx_p − b_i)`` (or ``region``), ReLU-clamped for a non-negative layer (see
    :mod:`unveil.edit.intervention`). It runs inside the model's forward pass (a forward hook,
    removed afterwards); the model is used as given (mode and device unchanged).

    Parameters
    ----------
    model : nn.Module
    layer : str
        The layer the pairs were fitted on.
    pairs : DirectionPairs
    images : tensor (N, C, H, W)
        Preprocessed images (moved batch by batch to the model's device).
    concept : int, str or list
        The concept(s) to edit (indices or names).
    strength : float or None
        k >= 0; None (remove only) removes the concept's own signal value at each position.
    mode : {"remove", "insert"}
    region : mask, optional
        Where to edit on the layer's grid ((H, W), (N, H, W) or (N, 1, H, W)); replaces the
        detector mask. Inserting a concept where it is not detected needs a region.
    direction : {"signal", "filter"} or tensor
        Edit along the signal vector (default), the filter, or given unit directions.
    nonneg : bool or None
        ReLU clamp; None detects a non-negative layer per batch.
    batch_size : int

    Returns
    -------
    Counterfactual

    Examples
    --------
    >>> cf = counterfactual(model, "layer4", pairs, images, concept=3)  # doctest: +SKIP
    >>> cf.probs_after.shape, cf.flipped.float().mean()                # doctest: +SKIP
    """
    images = check_images(images)
    batch_size = check_positive_int(batch_size, "batch_size")
    idx = resolve_concepts(pairs, concept)
    k = check_strength(strength)
    if k is None and mode == "insert":
        raise ValidationError("mode='insert' needs an explicit strength (there is no signal value to read where the "
                              "concept is absent); pass strength=k.")
    device, dtype = model_device_dtype(model)
    before, after = [], []
    for s in range(0, images.shape[0], batch_size):
        xb = images[s:s + batch_size].to(device=device, dtype=dtype)
        reg = region
        if region is not None:
            r = torch.as_tensor(region)
            if r.dim() >= 3 and r.shape[0] == images.shape[0]:
                reg = r[s:s + batch_size]
        before.append(model(xb).float().cpu())
        fn = (lambda X, _r=reg: edit_maps(X, pairs, idx, strength=k, mode=mode, direction=direction, region=_r,
                                          nonneg=nonneg))
        with edit_layer(model, layer, fn, tokens=tokens):
            after.append(model(xb).float().cpu())
    lb, la = torch.cat(before), torch.cat(after)
    return Counterfactual(lb.softmax(1), la.softmax(1), lb, la, idx, mode, k)
