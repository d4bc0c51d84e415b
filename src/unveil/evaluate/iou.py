"""Intersection over union of boolean masks: the one place it is computed.

:func:`iou_from_counts` is the formula, ``|A ∩ B| / (|A| + |B| − |A ∩ B|)`` with 0 where the union
is empty; :class:`MaskIoU` streams the counts of ``I`` masks against ``C`` masks over the same
positions (batch by batch, so the masks never need to be in memory at once) and :func:`mask_iou`
is its one-shot form. The counts are exact: sums of 0/1 products are taken in float32 only while
they stay below 2**24, in float64 above, and accumulated in float64.

The threshold sweep of :mod:`unveil.evaluate.pattern_cav` counts its own intersections (every
threshold at once) and network dissection (:mod:`unveil.evaluate.dissection`) its own (per
annotated image); both end in :func:`iou_from_counts`' formula.
"""
from __future__ import annotations

import numpy as np
import torch

from .._errors import ValidationError

__all__ = ["iou_from_counts", "MaskIoU", "mask_iou"]

_EXACT_F32 = 2 ** 24  # float32 sums of 0/1 products are exact below this count


def iou_from_counts(inter, area_a, area_b):
    """``inter / (area_a + area_b − inter)``, 0 where the union is empty (counts are whole numbers).

    Works on tensors and on numpy arrays (broadcasting as they do).

    Examples
    --------
    >>> import numpy as np
    >>> iou_from_counts(np.array([1.0, 0.0]), np.array([2.0, 0.0]), np.array([1.0, 0.0]))
    array([0.5, 0. ])
    """
    union = area_a + area_b - inter
    if isinstance(union, torch.Tensor):
        return inter / union.clamp_min(1)
    return inter / np.maximum(union, 1)


class MaskIoU:
    """Streamed IoU of ``n_a`` boolean masks with ``n_b`` boolean masks over the same positions.

    Call :meth:`update` with each batch of positions, ``a`` (n, n_a) and ``b`` (n, n_b) booleans
    (positions first), then :meth:`result`: the (n_a, n_b) float64 IoU.
    """

    def __init__(self, n_a: int, n_b: int):
        self.inter = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.area_a = torch.zeros(n_a, dtype=torch.float64)
        self.area_b = torch.zeros(n_b, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or a.shape[1] != self.inter.shape[0] \
                or b.shape[1] != self.inter.shape[1]:
            raise ValidationError(f"masks must be (n, {self.inter.shape[0]}) and (n, {self.inter.shape[1]}) booleans "
                                  f"over the same n positions, got {tuple(a.shape)} and {tuple(b.shape)}.")
        dt = torch.float32 if a.shape[0] < _EXACT_F32 else torch.float64
        u, m = a.to(dt), b.to(dt)
        self.inter += (u.T @ m).double().cpu()
        self.area_a += u.sum(0).double().cpu()
        self.area_b += m.sum(0).double().cpu()

    def result(self) -> torch.Tensor:
        """(n_a, n_b) float64 IoU of everything seen so far."""
        return iou_from_counts(self.inter, self.area_a[:, None], self.area_b[None, :])


def mask_iou(a, b) -> torch.Tensor:
    """IoU of every column of ``a`` (n, I) with every column of ``b`` (n, C), booleans: (I, C) float64.

    Examples
    --------
    >>> import torch
    >>> mask_iou(torch.tensor([[True], [True]]), torch.tensor([[True, False], [False, False]]))
    tensor([[0.5000, 0.0000]], dtype=torch.float64)
    """
    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    acc = MaskIoU(a.shape[1] if a.dim() == 2 else 0, b.shape[1] if b.dim() == 2 else 0)
    acc.update(a, b)
    return acc.result()
