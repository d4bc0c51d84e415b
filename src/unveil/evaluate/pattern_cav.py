"""EDDP's unsupervised detectors against supervised Pattern-CAVs, concept by concept (the S³ table).

For every annotated concept c (with enough labelled cells on the train split):

* **Pattern-CAV** (Pahde et al.; supervised): ``v_c = mean(x | c) − mean(x | not c)`` over the
  train maps' cells, a cell labelled c when the concept's mask covers at least ``cover`` of it. As a
  detector it fires where ``v_cᵀx > t_c``; ``t_c`` is the threshold (among the quantiles
  :data:`QUANTILES` of the train scores) with the highest train IoU, so the Pattern-CAV gets its
  labels both for its direction and for its threshold.
* **EDDP**: the detector with the highest train IoU against c (selection only; the detectors were
  learned without labels), with its own rule ``σ(wᵀx − b) > 0.5``.

IoU is Network Dissection's (maps upsampled bilinearly to the masks, summed over the validation
images). ``S³ = Σ_c IoU_val(c)`` over the concepts compared: one detector per concept, so it rewards
covering every concept, not many detectors of one concept (S1) or distinct labels only (S2). The
encoders are compared too: ``cos(ŝ, v_c)``, ``cos(mean difference, v_c)`` and ``cos(w, v_c)`` for the
selected EDDP detector (the mean difference is the detector's own positives against the rest, on the
train maps: Pattern-CAV's estimator with the detector as the labeller).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import ValidationError
from .iou import iou_from_counts

__all__ = ["PatternCAVComparison", "compare_with_pattern_cavs", "QUANTILES"]

#: train-score quantiles tried as a Pattern-CAV's threshold
QUANTILES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 0.998)
SCHEMA = "unveil.pattern_cav_comparison/1"


@dataclass(frozen=True)
class PatternCAVComparison:
    """Per concept: validation IoU of the supervised Pattern-CAV and of the best EDDP detector, and the
    cosines of the EDDP detector's directions with the Pattern-CAV. ``s3_*`` are the sums of the IoUs."""

    concepts: List[str]
    n_cells: List[int]
    pattern_cav_iou: List[float]
    eddp_iou: List[float]
    eddp_detector: List[int]
    cos_signal: List[float]
    cos_mean_difference: List[float]
    cos_filter: List[float]
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def s3_eddp(self) -> float:
        return float(np.sum(self.eddp_iou))

    @property
    def s3_pattern_cav(self) -> float:
        return float(np.sum(self.pattern_cav_iou))

    @property
    def eddp_wins(self) -> int:
        """Concepts where EDDP's detector has the higher validation IoU."""
        return int(np.sum(np.asarray(self.eddp_iou) > np.asarray(self.pattern_cav_iou)))

    def to_dict(self) -> Dict[str, Any]:
        def clean(v):
            return [None if not np.isfinite(x) else float(x) for x in v]
        return {"schema": SCHEMA, "s3_eddp": self.s3_eddp, "s3_pattern_cav": self.s3_pattern_cav,
                "eddp_wins": self.eddp_wins, "n_compared": len(self.concepts), "concepts": list(self.concepts),
                "n_cells": [int(n) for n in self.n_cells], "pattern_cav_iou": clean(self.pattern_cav_iou),
                "eddp_iou": clean(self.eddp_iou), "eddp_detector": [int(i) for i in self.eddp_detector],
                "cos_signal": clean(self.cos_signal), "cos_mean_difference": clean(self.cos_mean_difference),
                "cos_filter": clean(self.cos_filter), "config": dict(self.config)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "PatternCAVComparison":
        if not isinstance(doc, Mapping) or doc.get("schema") != SCHEMA:
            raise ValidationError(f"not a Pattern-CAV comparison (schema {SCHEMA!r}).")
        n = len(doc.get("concepts") or [])
        keys = ("n_cells", "pattern_cav_iou", "eddp_iou", "eddp_detector", "cos_signal", "cos_mean_difference",
                "cos_filter")
        vals = {}
        for k in keys:
            v = doc.get(k)
            if not isinstance(v, list) or len(v) != n:
                raise ValidationError(f"Pattern-CAV comparison field {k!r} must be a list of {n} numbers.")
            vals[k] = [float("nan") if x is None else x for x in v]
        return cls(concepts=[str(c) for c in doc["concepts"]], n_cells=[int(x) for x in vals["n_cells"]],
                   pattern_cav_iou=[float(x) for x in vals["pattern_cav_iou"]],
                   eddp_iou=[float(x) for x in vals["eddp_iou"]], eddp_detector=[int(x) for x in vals["eddp_detector"]],
                   cos_signal=[float(x) for x in vals["cos_signal"]],
                   cos_mean_difference=[float(x) for x in vals["cos_mean_difference"]],
                   cos_filter=[float(x) for x in vals["cos_filter"]], config=dict(doc.get("config") or {}))


def _cells(masks: torch.Tensor, hw) -> torch.Tensor:
    """Coverage of each layer cell by each mask: (N, C, H, W) bool -> (N, C, h, w) float."""
    return F.adaptive_avg_pool2d(masks.float(), hw)


def _iou_sweep(scores: torch.Tensor, mask: torch.Tensor, thresholds: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """IoU of ``upsample(scores) > t`` with ``mask`` for every t (ascending). scores (N, h, w), mask (N, H, W) bool.

    One pass: each pixel is binned by how many thresholds lie below it; the counts of all pixels and of
    the mask's pixels give the detected area and the intersection at every threshold at once.
    """
    T = thresholds.numel()
    thr = thresholds.float().contiguous()
    counts = torch.zeros(T + 1, dtype=torch.float64)
    counts_in = torch.zeros(T + 1, dtype=torch.float64)
    area = 0.0
    for s in range(0, scores.shape[0], batch):
        up = F.interpolate(scores[s:s + batch, None], size=mask.shape[-2:], mode="bilinear", align_corners=False)
        idx = torch.bucketize(up.flatten(), thr)  # = number of thresholds strictly below the value
        m = mask[s:s + batch].flatten()
        counts += torch.bincount(idx, minlength=T + 1).double()
        counts_in += torch.bincount(idx[m], minlength=T + 1).double()
        area += float(m.sum())
    # value > t_j  <=>  more than j thresholds lie below it
    det = counts.sum() - torch.cumsum(counts, 0)[:T]
    inter = counts_in.sum() - torch.cumsum(counts_in, 0)[:T]
    return iou_from_counts(inter, det, area)


@torch.no_grad()
def compare_with_pattern_cavs(train_maps, train_masks, val_maps, val_masks, pairs, eddp_iou_train, eddp_iou_val, *,
                              concept_names: Optional[Sequence[str]] = None, concepts: Optional[Sequence[int]] = None,
                              cover: float = 0.5, min_cells: int = 20) -> PatternCAVComparison:
    """Compare EDDP's detectors with supervised Pattern-CAVs concept by concept (see the module docstring).

    Parameters
    ----------
    train_maps, val_maps : tensor (N, D, h, w)
        The layer's maps of the train and validation images.
    train_masks, val_masks : bool array or tensor (N, C, H, W)
        Concept masks of the same images.
    pairs : DirectionPairs
        EDDP's pairs fitted on these maps (decoders, encoders; mean differences are measured here).
    eddp_iou_train, eddp_iou_val : array (I, C)
        IoU of every EDDP detector with every concept (e.g. :class:`~unveil.evaluate.dissection.DissectionResult`'s
        ``iou_train`` / ``iou_val``), computed with the same masks.
    concept_names : sequence of str, optional
    concepts : sequence of int, optional
        Concepts to compare (default: every concept with at least ``min_cells`` labelled train cells and
        at least as many unlabelled ones).
    cover : float
        A cell is labelled c when c's mask covers at least this share of it.

    Returns
    -------
    PatternCAVComparison

    Examples
    --------
    >>> cmp = compare_with_pattern_cavs(m_tr, masks_tr, m_va, masks_va, pairs,
    ...                                 res.iou_train, res.iou_val)          # doctest: +SKIP
    >>> cmp.s3_eddp, cmp.s3_pattern_cav                                      # doctest: +SKIP
    """
    from ..directions.editing_directions import mean_difference_directions
    Xt = torch.as_tensor(train_maps).float()
    Xv = torch.as_tensor(val_maps).float()
    Mt = torch.as_tensor(np.asarray(train_masks)).bool()
    Mv = torch.as_tensor(np.asarray(val_masks)).bool()
    if Xt.dim() != 4 or Xv.dim() != 4 or Mt.dim() != 4 or Mv.dim() != 4:
        raise ValidationError("maps must be (N, D, h, w) and masks (N, C, H, W).")
    if Xt.shape[0] != Mt.shape[0] or Xv.shape[0] != Mv.shape[0] or Mt.shape[1] != Mv.shape[1]:
        raise ValidationError(f"maps and masks disagree: train {tuple(Xt.shape)} vs {tuple(Mt.shape)}, val "
                              f"{tuple(Xv.shape)} vs {tuple(Mv.shape)} (one mask stack per image, same concepts).")
    if Xt.shape[1] != pairs.n_features or Xv.shape[1] != pairs.n_features:
        raise ValidationError(f"maps have {Xt.shape[1]} channels but the pairs {pairs.n_features}.")
    C = Mt.shape[1]
    it, iv = np.asarray(eddp_iou_train, float), np.asarray(eddp_iou_val, float)
    if it.shape != (pairs.n_concepts, C) or iv.shape != it.shape:
        raise ValidationError(f"eddp_iou_train / eddp_iou_val must be ({pairs.n_concepts}, {C}), got {it.shape} and "
                              f"{iv.shape}.")
    names = list(concept_names) if concept_names is not None else [f"c{c}" for c in range(C)]
    D, h, w = Xt.shape[1:]
    cov = _cells(Mt, (h, w)) >= cover  # (N, C, h, w)
    P = Xt.permute(0, 2, 3, 1).reshape(-1, D).double()
    Y = cov.permute(0, 2, 3, 1).reshape(-1, C)
    n_pos = Y.sum(0)
    if concepts is None:
        concepts = [c for c in range(C) if int(n_pos[c]) >= min_cells and int(Y.shape[0] - n_pos[c]) >= min_cells]
    concepts = [int(c) for c in concepts]
    if not concepts:
        raise ValidationError(f"no concept has {min_cells} labelled train cells (cover >= {cover}); use more images.")
    sums = Y.double().T @ P  # (C, D)
    total = P.sum(0)
    md_all = mean_difference_directions(Xt, pairs)
    rows: Dict[str, List] = {k: [] for k in ("n", "pc", "ed", "det", "cs", "cm", "cf")}
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    for c in concepts:
        npos = float(n_pos[c])
        v = sums[c] / npos - (total - sums[c]) / (P.shape[0] - npos)
        v = v / v.norm().clamp_min(1e-30)
        st = torch.einsum("ndhw,d->nhw", Xt.double(), v).float()
        sv = torch.einsum("ndhw,d->nhw", Xv.double(), v).float()
        flat = st.flatten()
        if flat.numel() > 2_000_000:
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
        thr = torch.quantile(flat.double(), q).float().sort().values
        iou_tr = _iou_sweep(st, Mt[:, c], thr)
        best_t = thr[int(torch.argmax(iou_tr))]
        rows["pc"].append(float(_iou_sweep(sv, Mv[:, c], best_t[None])[0]))
        i = int(np.argmax(it[:, c]))
        rows["det"].append(i)
        rows["ed"].append(float(iv[i, c]))
        rows["n"].append(int(npos))
        vf = v.float()

        def cos(u):
            u = u.float()
            return float(u @ vf / u.norm().clamp_min(1e-30)) if torch.isfinite(u).all() else float("nan")
        rows["cs"].append(cos(pairs.encoders[i]))
        rows["cm"].append(cos(md_all[i]))
        rows["cf"].append(cos(pairs.decoders[i]))
    return PatternCAVComparison(
        concepts=[names[c] for c in concepts], n_cells=rows["n"], pattern_cav_iou=rows["pc"], eddp_iou=rows["ed"],
        eddp_detector=rows["det"], cos_signal=rows["cs"], cos_mean_difference=rows["cm"], cos_filter=rows["cf"],
        config={"cover": cover, "min_cells": min_cells, "quantiles": list(QUANTILES),
                "n_train": int(Xt.shape[0]), "n_val": int(Xv.shape[0]),
                "s3": "sum over the compared concepts of the validation IoU of one detector per concept",
                "pattern_cav_threshold": "train-score quantile with the highest train IoU",
                "eddp_selection": "the detector with the highest train IoU (its own rule sigmoid(w.x - b) > 0.5)"})
