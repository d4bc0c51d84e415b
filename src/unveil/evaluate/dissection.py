"""Network Dissection of concept detectors (method.md §7), computed in one stream over a dataset.

A *detector source* gives, per batch of images, maps ``(B, I, h, w)`` whose values ``> threshold``
mean "detector i fires here". It is either a callable ``detector(images)`` taking float images
``(B, 3, H, W)`` (for EDDP: ``lambda im: pairs.detect(features(im))`` with threshold 0.5, see
:func:`detector_from_pairs`) or maps precomputed for the whole dataset (a tensor / numpy array /
memmap of shape ``(len(dataset), I, h, w)``, row ``n`` belonging to ``dataset[n]``).

The dataset follows the protocol shared by ``unveil.data.world`` and ``unveil.data.broden``::

    len(ds); ds[n] -> sample with .image uint8 (H, W, 3), .masks bool (C, Hm, Wm), .label int
    ds.concepts -> list of objects with .name and .category (index = mask channel)

Choices (documented, tested):

* **Upsampling.** ``upsample="bilinear"`` (default, as NetDissect): the detector values are
  interpolated bilinearly (``torch.nn.functional.interpolate``, ``align_corners=False``) to the
  annotation resolution ``(Hm, Wm)`` and *then* thresholded: ``M_i = up(y_i) > t_i``.
  ``upsample="nearest"`` repeats each map cell instead. Maps already at ``(Hm, Wm)`` are used as they are.
* **Annotated categories.** Concept c of image n enters the sums of IoU_i(c) only when c is
  annotated on n. By default everything is annotated; a sample may carry ``.annotated`` (a bool
  vector over concepts, or a collection of category names), or pass ``annotated=`` to
  :func:`dissect` (an ``(len(dataset), C)`` bool array, or a callable ``(index, sample) ->`` either form).
* **IoU** of detector i and concept c: ``Σ_n |M_i ∩ L_c| / Σ_n |M_i ∪ L_c|`` over the images where c
  is annotated; 0 when the union is empty. Counts are exact (integers in float64).
* **Labels** ``c*_i = argmax_c IoU_train(i, c)`` (first index on ties); a detector whose best train
  IoU is 0 gets no label (``-1``, counted with IoU 0 everywhere).
* **Validation metrics** use the train label: ``val_iou = IoU_val(i, c*_i)``; pixel precision
  ``|M∩L|/|M|``, recall ``|M∩L|/|L|``, ``F1 = 2PR/(P+R)`` (0 where undefined), all over the
  validation images where ``c*_i`` is annotated. Interpretable: ``val_iou >= iou_threshold`` (0.04).
  ``S1 = Σ_i val_iou_i``; ``S2 = Σ_{distinct labels c} max_{i: c*_i = c} val_iou_i``;
  ``n_distinct`` = distinct labels among interpretable detectors; mPrecision/mRecall/mF1/mAP are
  means over all I detectors (an unlabelled detector counts 0).
* **AP** of the upsampled continuous value as a pixel scorer of ``c*_i`` on the validation split,
  streamed through histograms: ``n_bins`` equal-width bins per detector spanning the min..max of
  that detector's upsampled values on the *train* split (validation values outside are clamped
  into the end bins). AP = Σ_b ΔRecall_b · Precision_b over bins taken from the highest down, i.e.
  scikit-learn's ``average_precision_score`` with scores tied inside a bin (exact when the scores
  take at most one value per bin, e.g. binary maps).
* **Top activations** (for montages) over all dissected images (train and validation): the
  ``top_k`` images with the largest per-image maximum of the *raw* map, with the map cell
  (row, col) of that maximum.

Baselines (PCA, NMF, k-means components, raw channels...) get a detection rule with
:func:`fit_thresholds_on_train`: per component, the NetDissect top-quantile threshold over the
train split, then ``dissect(..., threshold=thresholds)``.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import ValidationError
from .._progress import progress as _progress
from .._validation import check_in_range, check_positive_int

__all__ = [
    "DissectionResult",
    "dissect",
    "fit_thresholds_on_train",
    "detector_from_pairs",
    "images_to_float",
    "average_precision_from_histograms",
]

logger = logging.getLogger("unveil")

_EXACT_F32 = 2 ** 24  # float32 sums of 0/1 products are exact below this count


# --------------------------------------------------------------------------- helpers
def images_to_float(images) -> torch.Tensor:
    """uint8 images ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)`` in [0, 1] (the default preprocessing).

    Examples
    --------
    >>> import numpy as np
    >>> images_to_float(np.full((2, 4, 4, 3), 255, np.uint8)).shape
    torch.Size([2, 3, 4, 4])
    """
    t = torch.as_tensor(np.asarray(images))
    if t.dim() != 4 or t.shape[-1] != 3:
        raise ValidationError(f"images must be a (B, H, W, 3) batch, got shape {tuple(t.shape)}.")
    return t.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def detector_from_pairs(pairs, features: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """The EDDP detector source: ``images -> pairs.detect(features(images))`` (fires where > 0.5).

    Parameters
    ----------
    pairs : DirectionPairs
    features : callable
        Float images ``(B, 3, H, W)`` -> the layer's feature maps ``(B, D, h, w)``.

    Examples
    --------
    >>> import torch
    >>> from unveil import DirectionPairs
    >>> p = DirectionPairs(torch.eye(3), torch.zeros(3), torch.eye(3))
    >>> det = detector_from_pairs(p, lambda im: im[:, :, ::2, ::2])
    >>> det(torch.ones(1, 3, 4, 4)).shape
    torch.Size([1, 3, 2, 2])
    """
    def detector(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pairs.detect(features(images))
    return detector


def average_precision_from_histograms(pos, neg) -> np.ndarray:
    """AP per row from score histograms (bins in increasing score order).

    ``AP = Σ_b (TP_b − TP_{b−1}) / P · TP_b / (TP_b + FP_b)``, with cumulative counts taken from the
    highest bin down: scikit-learn's ``average_precision_score`` when scores are tied within a bin.
    Rows without positives get AP 0.

    Parameters
    ----------
    pos, neg : array (R, n_bins)
        Counts of positive / negative pixels per score bin.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim != 2:
        raise ValidationError(f"pos and neg must be two (R, n_bins) arrays of one shape, got "
                              f"{pos.shape} and {neg.shape}.")
    tp = np.cumsum(pos[:, ::-1], axis=1)
    fp = np.cumsum(neg[:, ::-1], axis=1)
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        drec = np.where(total > 0, pos[:, ::-1] / total, 0.0)
    return (drec * prec).sum(axis=1)


def _safe_div(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.zeros(np.broadcast(a, b).shape)
    np.divide(a, b, out=out, where=b > 0)
    return out


def _check_indices(indices, n: int, name: str) -> List[int]:
    try:
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        ok = all(float(i) == float(j) for i, j in zip(idx, np.asarray(indices).reshape(-1)))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValidationError(f"{name} must be a sequence of integer dataset indices, got {indices!r:.80}.")
    if not idx:
        raise ValidationError(f"{name} is empty; pass at least one dataset index.")
    bad = [i for i in idx if i < 0 or i >= n]
    if bad:
        raise ValidationError(f"{name} holds indices outside the dataset (size {n}): {bad[:5]}; "
                              f"use indices in [0, {n - 1}].")
    return idx


def _concept_info(dataset) -> Tuple[List[str], List[str]]:
    concepts = getattr(dataset, "concepts", None)
    if concepts is None:
        raise ValidationError("the dataset has no .concepts list; expected objects with .name and "
                              ".category, one per mask channel.")
    names = [str(getattr(c, "name", c)) for c in concepts]
    cats = [str(getattr(c, "category", "")) for c in concepts]
    if not names:
        raise ValidationError("the dataset's .concepts list is empty; nothing to dissect against.")
    return names, cats


class _Source:
    """Uniform access to a callable detector or precomputed maps."""

    def __init__(self, detector, n_data: int, preprocess):
        self.callable = callable(detector) and not isinstance(detector, (torch.Tensor, np.ndarray))
        self.preprocess = preprocess or images_to_float
        if not self.callable:
            if not hasattr(detector, "shape") or len(detector.shape) != 4:
                raise ValidationError(
                    "detector must be a callable images (B, 3, H, W) -> maps (B, I, h, w), or precomputed "
                    f"maps of shape (len(dataset), I, h, w); got {type(detector).__name__} with shape "
                    f"{getattr(detector, 'shape', None)}.")
            if detector.shape[0] != n_data:
                raise ValidationError(f"precomputed maps have {detector.shape[0]} rows but the dataset has "
                                      f"{n_data} images; pass one map per dataset index (row n = dataset[n]).")
        self.detector = detector
        self.n_detectors: Optional[int] = None

    def maps(self, idx: List[int], images: Optional[np.ndarray]) -> torch.Tensor:
        if self.callable:
            with torch.no_grad():
                m = self.detector(self.preprocess(images))
        else:
            d = self.detector
            m = d[torch.as_tensor(idx)] if isinstance(d, torch.Tensor) else np.asarray(d[np.asarray(idx)])
        if not isinstance(m, torch.Tensor):
            m = torch.as_tensor(np.asarray(m))
        m = m.detach()
        if not m.is_floating_point():
            m = m.float()
        if m.dim() != 4 or m.shape[0] != len(idx):
            raise ValidationError(f"the detector returned maps of shape {tuple(m.shape)} for a batch of "
                                  f"{len(idx)} images; expected ({len(idx)}, I, h, w).")
        if self.n_detectors is None:
            self.n_detectors = int(m.shape[1])
        elif m.shape[1] != self.n_detectors:
            raise ValidationError(f"the detector returned {m.shape[1]} maps for one batch and "
                                  f"{self.n_detectors} for an earlier one; the number must stay fixed.")
        if not torch.isfinite(m).all():
            raise ValidationError("the detector maps contain NaN or infinite values; expected finite scores.")
        return m


def _annotated_row(value, n_concepts: int, categories: List[str], where: str) -> np.ndarray:
    if value is None:
        return np.ones(n_concepts, dtype=bool)
    arr = np.asarray(value) if not isinstance(value, (set, frozenset)) else np.asarray(sorted(value))
    if arr.size == 0:  # an empty collection of categories: nothing annotated
        return np.zeros(n_concepts, dtype=bool)
    if arr.dtype == bool:
        if arr.shape != (n_concepts,):
            raise ValidationError(f"the annotated mask of {where} has shape {arr.shape}; expected a bool "
                                  f"vector over the {n_concepts} concepts.")
        return arr
    if arr.dtype.kind in "US" or arr.dtype == object:
        cats = {str(c) for c in arr.reshape(-1)}
        return np.array([c in cats for c in categories], dtype=bool)
    raise ValidationError(f"the annotated value of {where} must be a bool vector over concepts or a "
                          f"collection of category names, got dtype {arr.dtype}.")


def _batches(dataset, indices: List[int], batch_size: int, source: _Source, annotated,
             n_concepts: int, categories: List[str]):
    """Yield (idx, images or None, masks (b,C,Hm,Wm) bool tensor, ann (b,C) bool tensor), grouped by shape."""
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        samples = [dataset[i] for i in idx]
        groups: Dict[Tuple, List[int]] = {}
        for j, s in enumerate(samples):
            masks = np.asarray(s.masks)
            if masks.ndim != 3 or masks.shape[0] != n_concepts:
                raise ValidationError(f"dataset[{idx[j]}].masks has shape {masks.shape}; expected "
                                      f"({n_concepts}, H, W), one channel per concept.")
            key = (np.asarray(s.image).shape if source.callable else None, masks.shape[1:])
            groups.setdefault(key, []).append(j)
        for js in groups.values():
            sub = [idx[j] for j in js]
            images = np.stack([np.asarray(samples[j].image) for j in js]) if source.callable else None
            masks = torch.from_numpy(np.stack([np.asarray(samples[j].masks, dtype=bool) for j in js]))
            rows = []
            for j in js:
                i = idx[j]
                if annotated is None:
                    a = getattr(samples[j], "annotated", None)
                elif callable(annotated):
                    a = annotated(i, samples[j])
                else:
                    a = annotated[i]
                rows.append(_annotated_row(a, n_concepts, categories, f"dataset[{i}]"))
            yield sub, images, masks, torch.from_numpy(np.stack(rows))


def _axis_weights(n_in: int, n_out: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(n_out, n_in): the weights bilinear interpolation (``align_corners=False``) gives one axis,
    read off by interpolating the identity (the map is linear and separable)."""
    key = (n_in, n_out, dtype, str(device))
    if key not in _AXIS_WEIGHTS:
        eye = torch.eye(n_in, dtype=dtype, device=device)[:, None, :, None]
        _AXIS_WEIGHTS[key] = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T
    return _AXIS_WEIGHTS[key]


_AXIS_WEIGHTS: Dict[Tuple, torch.Tensor] = {}


def _upsample(maps: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode == "bilinear":
        # as two small matrix products (one per axis): the same weights as F.interpolate, about 3x faster
        # on the CPU; values agree to float rounding (1e-7)
        h, w = maps.shape[-2:]
        return _axis_weights(h, size[0], maps.dtype, maps.device) @ maps @ \
            _axis_weights(w, size[1], maps.dtype, maps.device).T
    return F.interpolate(maps, size=size, mode="nearest")


# --------------------------------------------------------------------------- accumulator
class _Acc:
    """Running sums of one split: intersections, |M| and |L| per (detector, concept) with annotation."""

    def __init__(self, n_det: int, n_con: int):
        self.inter = torch.zeros(n_det, n_con, dtype=torch.float64)
        self.sum_m = torch.zeros(n_det, n_con, dtype=torch.float64)
        self.sum_l = torch.zeros(n_con, dtype=torch.float64)
        self.n_images = 0

    def iou(self) -> np.ndarray:
        union = self.sum_m + self.sum_l[None, :] - self.inter
        return _safe_div(self.inter.numpy(), union.numpy())


class _TopK:
    def __init__(self, n_det: int, k: int):
        self.k = k
        self.values = torch.full((n_det, 0), -math.inf, dtype=torch.float64)
        self.index = torch.zeros((n_det, 0), dtype=torch.long)
        self.rows = torch.zeros((n_det, 0), dtype=torch.long)
        self.cols = torch.zeros((n_det, 0), dtype=torch.long)
        self.h = torch.zeros((n_det, 0), dtype=torch.long)
        self.w = torch.zeros((n_det, 0), dtype=torch.long)
        self.split = torch.zeros((n_det, 0), dtype=torch.long)

    def update(self, maps: torch.Tensor, idx: List[int], split: int = 0) -> None:
        if self.k == 0:
            return
        b, n_det, h, w = maps.shape
        mx, arg = maps.reshape(b, n_det, h * w).max(dim=-1)  # (b, I)
        vals = torch.cat([self.values, mx.T.double().cpu()], 1)
        index = torch.cat([self.index, torch.as_tensor(idx).expand(n_det, b)], 1)
        rows = torch.cat([self.rows, (arg // w).T.cpu()], 1)
        cols = torch.cat([self.cols, (arg % w).T.cpu()], 1)
        hh = torch.cat([self.h, torch.full((n_det, b), h)], 1)
        ww = torch.cat([self.w, torch.full((n_det, b), w)], 1)
        sp = torch.cat([self.split, torch.full((n_det, b), split)], 1)
        # stable: larger value first, earlier dataset position first on ties
        order = torch.from_numpy(np.lexsort((np.arange(vals.shape[1])[None].repeat(n_det, 0),
                                             -vals.numpy()), axis=-1)[:, :self.k].copy())
        self.values, self.index = vals.gather(1, order), index.gather(1, order)
        self.rows, self.cols = rows.gather(1, order), cols.gather(1, order)
        self.h, self.w = hh.gather(1, order), ww.gather(1, order)
        self.split = sp.gather(1, order)


def _accumulate(acc: _Acc, maps: torch.Tensor, masks: torch.Tensor, ann: torch.Tensor, thr: torch.Tensor,
                mode: str, max_elements: int, ranges=None, hist=None, labels=None, n_bins: int = 0) -> None:
    """Add one shape-homogeneous batch to ``acc`` (and to the AP histograms / score ranges)."""
    dev = maps.device
    b, n_det = maps.shape[:2]
    hm, wm = masks.shape[-2:]
    P = hm * wm
    masks = masks.to(dev)
    ann = ann.to(dev)
    flat = masks.reshape(b, -1, P)
    present = flat.any(-1) & ann  # (b, C)
    cols = present.any(0).nonzero().flatten()
    ann_f = ann.to(torch.float64)
    exact32 = b * P < _EXACT_F32
    mdt = torch.float32 if exact32 else torch.float64
    if cols.numel():
        Lp = flat[:, cols].to(mdt) * ann[:, cols, None].to(mdt)  # (b, Cp, P)
        acc.sum_l[cols.cpu()] += Lp.sum(dim=(0, 2)).double().cpu()
    acc.n_images += b
    chunk = max(1, min(n_det, max_elements // max(1, b * P)))
    thr = thr.to(dev)
    for i0 in range(0, n_det, chunk):
        i1 = min(n_det, i0 + chunk)
        up = _upsample(maps[:, i0:i1], (hm, wm), mode).reshape(b, i1 - i0, P)
        M = (up > thr[i0:i1, None]).to(mdt)  # (b, i, P) where each detector fires
        acc.sum_m[i0:i1] += (M.sum(-1).double().T @ ann_f).cpu()
        if cols.numel():  # per image (i, P) @ (P, Cp), summed over the batch: exact counts, no transposed copy
            inter = torch.bmm(M, Lp.transpose(1, 2)).sum(0)
            acc.inter[i0:i1, cols.cpu()] += inter.double().cpu()
        if ranges is not None:  # train pass: min/max of upsampled values for the AP histograms
            lo, hi = ranges
            lo[i0:i1] = torch.minimum(lo[i0:i1], up.amin(dim=(0, 2)).double().cpu())
            hi[i0:i1] = torch.maximum(hi[i0:i1], up.amax(dim=(0, 2)).double().cpu())
        if hist is not None:  # validation pass: histograms of scores vs the label's pixels
            lab = labels[i0:i1]
            has = lab >= 0
            if not has.any():
                continue
            labc = lab.clamp_min(0).to(dev)
            pos = flat[:, labc]  # (b, ic, P)
            a = ann[:, labc][:, :, None].expand(b, i1 - i0, P)
            valid = a & has.to(dev)[None, :, None]
            lo, hi = hist["lo"][i0:i1].to(dev), hist["hi"][i0:i1].to(dev)
            width = (hi - lo).clamp_min(1e-300)
            # bin = floor((value - lo) / width * n_bins), in place; one bincount over (detector, bin,
            # positive or not), the pixels that are not scored in a bin of their own
            t = up.double()
            t.sub_(lo[None, :, None]).div_(width[None, :, None]).mul_(n_bins).floor_().clamp_(0, n_bins - 1)
            bins = t.long()
            del t
            tot = n_det * n_bins
            bins.add_((torch.arange(i0, i1, device=dev) * n_bins)[None, :, None])
            bins.add_(tot * (~pos).long())
            bins.masked_fill_(~valid, 2 * tot)
            counts = torch.bincount(bins.reshape(-1), minlength=2 * tot + 1).double().cpu()
            hist["pos"] += counts[:tot].reshape(n_det, n_bins)
            hist["neg"] += counts[tot:2 * tot].reshape(n_det, n_bins)


# --------------------------------------------------------------------------- result
@dataclass
class DissectionResult:
    """Outcome of :func:`dissect`.

    Attributes
    ----------
    detector_names, concept_names, concept_categories : list of str
    labels : (I,) int array — train-split label c*_i (index into the concepts), -1 for none
    iou_train, iou_val : (I, C) arrays — IoU of every (detector, concept) on each split
    val_iou, precision, recall, f1, ap : (I,) arrays — validation metrics against the label
    summary : dict — S1, S2, n_interpretable, n_distinct, mPrecision, mRecall, mAP, mF1, ...
    top_values, top_indices, top_rows, top_cols, top_map_h, top_map_w : (I, k) arrays —
        the strongest images per detector (dataset index, max value, map cell of the max, map size)
    config : dict — threshold(s), upsampling, bins, split sizes
    """

    detector_names: List[str]
    concept_names: List[str]
    concept_categories: List[str]
    labels: np.ndarray
    iou_train: np.ndarray
    iou_val: np.ndarray
    val_iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    ap: np.ndarray
    summary: Dict[str, float]
    top_values: np.ndarray
    top_indices: np.ndarray
    top_rows: np.ndarray
    top_cols: np.ndarray
    top_map_h: np.ndarray
    top_map_w: np.ndarray
    top_split: Optional[np.ndarray] = None
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_detectors(self) -> int:
        return len(self.detector_names)

    @property
    def train_iou(self) -> np.ndarray:
        """(I,) train IoU of each detector with its label (0 for unlabelled detectors)."""
        lab = np.clip(self.labels, 0, None)
        return np.where(self.labels >= 0, self.iou_train[np.arange(self.n_detectors), lab], 0.0)

    @property
    def interpretable(self) -> np.ndarray:
        return (self.labels >= 0) & (self.val_iou >= self.config.get("iou_threshold", 0.04))

    def label_names(self) -> List[Optional[str]]:
        return [self.concept_names[c] if c >= 0 else None for c in self.labels]

    def table(self) -> List[Dict[str, Any]]:
        """One row per detector: name, label, category, train/val IoU, precision, recall, F1, AP."""
        rows = []
        tr, interp = self.train_iou, self.interpretable
        for i, name in enumerate(self.detector_names):
            c = int(self.labels[i])
            rows.append({"detector": i, "name": name,
                         "label": self.concept_names[c] if c >= 0 else None,
                         "category": self.concept_categories[c] if c >= 0 else None,
                         "train_iou": float(tr[i]), "val_iou": float(self.val_iou[i]),
                         "precision": float(self.precision[i]), "recall": float(self.recall[i]),
                         "f1": float(self.f1[i]), "ap": float(self.ap[i]),
                         "interpretable": bool(interp[i])})
        return rows

    def top_activations(self, detector: int, k: Optional[int] = None) -> List[Dict[str, Any]]:
        """The strongest images of one detector, for montages.

        Each entry: ``index`` (dataset index), ``split`` ("train" or "val": which data set ``index``
        refers to when a separate ``val_dataset`` was dissected), ``value`` (max of the raw map), ``row``/``col`` (map cell
        of the max), ``map_size`` (h, w), and ``box`` = (y0, x0, y1, x1) of that cell as fractions of
        the image height/width (multiply by the image size for pixels).
        """
        if not 0 <= int(detector) < self.n_detectors:
            raise ValidationError(f"detector must be in [0, {self.n_detectors - 1}], got {detector}.")
        i = int(detector)
        kk = self.top_indices.shape[1] if k is None else min(int(k), self.top_indices.shape[1])
        out = []
        for j in range(kk):
            if not np.isfinite(self.top_values[i, j]):
                break
            h, w = int(self.top_map_h[i, j]), int(self.top_map_w[i, j])
            r, c = int(self.top_rows[i, j]), int(self.top_cols[i, j])
            sp = "val" if self.top_split is not None and self.top_split[i, j] == 1 else "train"
            out.append({"index": int(self.top_indices[i, j]), "split": sp, "value": float(self.top_values[i, j]),
                        "row": r, "col": c, "map_size": (h, w),
                        "box": (r / h, c / w, (r + 1) / h, (c + 1) / w)})
        return out

    def to_dict(self, include_iou: bool = False) -> Dict[str, Any]:
        """JSON-ready dict: summary, per-detector table, top activations, config (+ full IoU if asked)."""
        d = {"summary": dict(self.summary), "detectors": self.table(), "config": dict(self.config),
             "concepts": [{"name": n, "category": c} for n, c in zip(self.concept_names, self.concept_categories)],
             "top_activations": [self.top_activations(i) for i in range(self.n_detectors)]}
        if include_iou:
            d["iou_train"] = self.iou_train.tolist()
            d["iou_val"] = self.iou_val.tolist()
        return d


# --------------------------------------------------------------------------- public API
def _threshold_vector(threshold, n_det: int) -> torch.Tensor:
    if isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
        check_in_range(threshold, "threshold")
        return torch.full((n_det,), float(threshold))
    t = torch.as_tensor(np.asarray(threshold, dtype=np.float64)).reshape(-1).float()
    if t.numel() != n_det:
        raise ValidationError(f"threshold has {t.numel()} entries but the detector gives {n_det} maps; "
                              f"pass one number or one threshold per detector.")
    if not torch.isfinite(t).all():
        raise ValidationError("threshold contains NaN or infinite values.")
    return t


def dissect(detector, dataset, train_indices: Sequence[int], val_indices: Sequence[int], *,
            threshold: Union[float, Sequence[float], torch.Tensor] = 0.5, batch_size: int = 32,
            upsample: str = "bilinear", annotated=None, iou_threshold: float = 0.04, n_bins: int = 1024,
            top_k: int = 8, detector_names: Optional[List[str]] = None,
            preprocess: Optional[Callable] = None, max_elements: int = 2 ** 23,
            val_dataset=None, val_maps=None, progress: bool = False) -> DissectionResult:
    """Label detectors with concepts and score them (Network Dissection, method.md §7), streaming.

    Parameters
    ----------
    detector : callable or array
        ``detector(images (B, 3, H, W) float) -> maps (B, I, h, w)``, or precomputed maps
        ``(len(dataset), I, h, w)`` (tensor, array or memmap; row n = ``dataset[n]``).
    dataset : dataset following the concept-dataset protocol (see the module docstring).
    train_indices, val_indices : sequences of int
        Dataset indices of the split that chooses labels and of the split that scores them.
    threshold : float or (I,) array
        A detector fires where its (upsampled) value is ``> threshold`` (0.5 for EDDP's sigmoid maps).
    batch_size : int
        Images per detector call; memory is O(batch_size · I · Hm · Wm / chunks), never O(dataset).
    upsample : {"bilinear", "nearest"}
        How maps reach the annotation resolution before thresholding (bilinear = NetDissect).
    annotated : None, (len(dataset), C) bool array, or callable ``(index, sample)``
        Which concepts are annotated per image (see the module docstring); default: the sample's
        ``.annotated`` attribute if it has one, otherwise all.
    iou_threshold : float
        Validation IoU from which a detector counts as interpretable (0.04, NetDissect).
    n_bins : int
        Histogram bins per detector for the streamed AP.
    top_k : int
        Images kept per detector for :meth:`DissectionResult.top_activations` (0 = none).
    detector_names : list of str, optional
    preprocess : callable, optional
        uint8 images ``(B, H, W, 3)`` -> the detector's input; default :func:`images_to_float`.
    max_elements : int
        Upper bound on the elements of one upsampled chunk ``(b, i, Hm·Wm)``; detectors are chunked to fit.
    val_dataset : dataset, optional
        A separate validation data set (e.g. ``ConceptWorld(split="val")``); ``val_indices`` then
        index it. Its concepts must be the same. ``annotated`` must then be None or a callable.
    val_maps : array, optional
        Precomputed maps for ``val_dataset`` (rows = its images), needed when ``detector`` is precomputed.
    progress : bool
        Show tqdm bars.

    Returns
    -------
    DissectionResult

    Examples
    --------
    >>> res = dissect(lambda im: pairs.detect(features(im)), world, train_idx, val_idx)  # doctest: +SKIP
    >>> res.summary["S1"], res.table()[0]["label"]  # doctest: +SKIP
    """
    n_data = len(dataset)
    vds = dataset if val_dataset is None else val_dataset
    tr = _check_indices(train_indices, n_data, "train_indices")
    va = _check_indices(val_indices, len(vds), "val_indices")
    batch_size = check_positive_int(batch_size, "batch_size")
    n_bins = check_positive_int(n_bins, "n_bins")
    top_k = check_positive_int(top_k, "top_k", minimum=0)
    max_elements = check_positive_int(max_elements, "max_elements")
    iou_threshold = check_in_range(iou_threshold, "iou_threshold", 0.0, 1.0)
    if upsample not in ("bilinear", "nearest"):
        raise ValidationError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}.")
    if annotated is not None and not callable(annotated):
        annotated = np.asarray(annotated, dtype=bool)
    names, cats = _concept_info(dataset)
    if annotated is not None and not callable(annotated) and annotated.shape != (n_data, len(names)):
        raise ValidationError(f"annotated must have shape (len(dataset), n_concepts) = {(n_data, len(names))}, "
                              f"got {annotated.shape}.")
    source, vsource = _sources(detector, dataset, val_dataset, val_maps, annotated, preprocess, (names, cats))

    bar = _progress(total=len(tr) + len(va), enabled=progress, desc="dissect", unit="img")
    opts = dict(threshold=threshold, upsample=upsample, max_elements=max_elements, n_con=len(names), cats=cats,
                annotated=annotated, batch_size=batch_size)
    # pass 1: train split -> IoU per (detector, concept), labels, score ranges
    state = _label_pass(dataset, tr, source, top_k, bar, **opts)
    n_det = source.n_detectors
    iou_train = state["train"].iou()
    best = iou_train.argmax(axis=1)
    labels = np.where(iou_train[np.arange(n_det), best] > 0, best, -1)
    # pass 2: validation split -> IoU, pixel precision/recall, AP histograms
    hist = _validation_pass(vds, va, vsource, state, labels, n_bins, 1 if val_dataset is not None else 0, bar,
                            **opts)
    bar.close()
    scores = _validation_scores(state["val"], labels, hist, iou_threshold)
    summary = scores.pop("summary")
    if detector_names is None:
        detector_names = [f"detector_{i}" for i in range(n_det)]
    elif len(detector_names) != n_det:
        raise ValidationError(f"detector_names has {len(detector_names)} entries for {n_det} detectors.")
    thr = state["thr"]
    config = {"threshold": float(thr[0]) if bool((thr == thr[0]).all()) else thr.tolist(),
              "upsample": upsample, "iou_threshold": iou_threshold, "n_bins": n_bins, "top_k": top_k,
              "n_train": len(tr), "n_val": len(va), "separate_val_dataset": val_dataset is not None}
    top = state["top"]
    logger.info("dissection: S1=%.3f S2=%.3f interpretable=%d/%d distinct=%d", summary["S1"], summary["S2"],
                summary["n_interpretable"], n_det, summary["n_distinct"])
    return DissectionResult(
        detector_names=list(map(str, detector_names)), concept_names=names, concept_categories=cats,
        labels=labels.astype(np.int64), iou_train=iou_train, summary=summary, **scores,
        top_values=top.values.numpy(), top_indices=top.index.numpy(), top_rows=top.rows.numpy(),
        top_cols=top.cols.numpy(), top_map_h=top.h.numpy(), top_map_w=top.w.numpy(),
        top_split=top.split.numpy(), config=config)


def _sources(detector, dataset, val_dataset, val_maps, annotated, preprocess, concepts):
    """The detector's maps for the train and the validation images (:class:`_Source` each), checked."""
    source = _Source(detector, len(dataset), preprocess)
    if val_dataset is None:
        if val_maps is not None:
            raise ValidationError("val_maps is only used together with val_dataset; put all maps in `detector`.")
        return source, source
    if _concept_info(val_dataset) != concepts:
        raise ValidationError("val_dataset has other concepts than dataset (names or categories differ); "
                              "both splits must share one concept list.")
    if annotated is not None and not callable(annotated):
        raise ValidationError("with a separate val_dataset, annotated must be None or a callable "
                              "(index, sample) -> mask; an array cannot say which data set it covers.")
    if source.callable:
        return source, source
    if val_maps is None:
        raise ValidationError("precomputed maps cover `dataset` only; pass val_maps= with one map per "
                              "val_dataset image (or a callable detector).")
    return source, _Source(val_maps, len(val_dataset), preprocess)


def _label_pass(dataset, indices, source, top_k: int, bar, *, threshold, upsample, max_elements, n_con, cats,
                annotated, batch_size) -> Dict[str, Any]:
    """Pass 1 over the train split: IoU per (detector, concept), the score ranges, the top images.
    Returns the state both passes share (thresholds, accumulators, top-k)."""
    state: Dict[str, Any] = {}
    for idx, images, masks, ann in _batches(dataset, indices, batch_size, source, annotated, n_con, cats):
        maps = source.maps(idx, images)
        if not state:
            n_det = maps.shape[1]
            state = {"thr": _threshold_vector(threshold, n_det), "train": _Acc(n_det, n_con),
                     "val": _Acc(n_det, n_con), "top": _TopK(n_det, top_k),
                     "lo": torch.full((n_det,), math.inf, dtype=torch.float64),
                     "hi": torch.full((n_det,), -math.inf, dtype=torch.float64)}
        _accumulate(state["train"], maps, masks, ann, state["thr"], upsample, max_elements,
                    ranges=(state["lo"], state["hi"]))
        state["top"].update(maps, idx)
        bar.update(len(idx))
    return state


def _validation_pass(vds, indices, vsource, state, labels, n_bins: int, split: int, bar, *, threshold, upsample,
                     max_elements, n_con, cats, annotated, batch_size) -> Dict[str, torch.Tensor]:
    """Pass 2 over the validation split: IoU, pixel precision / recall (into ``state["val"]``) and the
    AP histograms of each detector against its label (returned)."""
    n_det = len(labels)
    lo = torch.where(torch.isfinite(state["lo"]), state["lo"], torch.zeros(()))
    hi = torch.where(torch.isfinite(state["hi"]), state["hi"], torch.ones(()))
    hist = {"lo": lo, "hi": torch.maximum(hi, lo),
            "pos": torch.zeros(n_det, n_bins, dtype=torch.float64),
            "neg": torch.zeros(n_det, n_bins, dtype=torch.float64)}
    lab_t = torch.as_tensor(labels, dtype=torch.long)
    for idx, images, masks, ann in _batches(vds, indices, batch_size, vsource, annotated, n_con, cats):
        maps = vsource.maps(idx, images)
        if maps.shape[1] != n_det:
            raise ValidationError(f"the validation maps have {maps.shape[1]} detectors, the train maps {n_det}.")
        _accumulate(state["val"], maps, masks, ann, state["thr"], upsample, max_elements,
                    hist=hist, labels=lab_t, n_bins=n_bins)
        state["top"].update(maps, idx, split=split)
        bar.update(len(idx))
    return hist


def _validation_scores(val: "_Acc", labels: np.ndarray, hist, iou_threshold: float) -> Dict[str, Any]:
    """Per detector, against its label on the validation split: IoU, precision, recall, F1, AP; and the
    summary (S1, S2, interpretable and distinct counts, means)."""
    n_det = len(labels)
    iou_val = val.iou()
    has = labels >= 0
    lab = np.clip(labels, 0, None)
    rows = np.arange(n_det)
    inter = val.inter.numpy()[rows, lab]
    precision = np.where(has, _safe_div(inter, val.sum_m.numpy()[rows, lab]), 0.0)
    recall = np.where(has, _safe_div(inter, val.sum_l.numpy()[lab]), 0.0)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    ap = np.where(has, average_precision_from_histograms(hist["pos"].numpy(), hist["neg"].numpy()), 0.0)
    val_iou = np.where(has, iou_val[rows, lab], 0.0)
    interp = has & (val_iou >= iou_threshold)
    s2 = 0.0
    for c in np.unique(labels[has]):
        s2 += float(val_iou[labels == c].max())
    summary = {"S1": float(val_iou.sum()), "S2": s2, "n_interpretable": int(interp.sum()),
               "n_distinct": int(len(np.unique(labels[interp]))),
               "mPrecision": float(precision.mean()), "mRecall": float(recall.mean()),
               "mAP": float(ap.mean()), "mF1": float(f1.mean()),
               "n_detectors": int(n_det), "n_labelled": int(has.sum())}
    return {"iou_val": iou_val, "val_iou": val_iou, "precision": precision, "recall": recall, "f1": f1, "ap": ap,
            "summary": summary}


def fit_thresholds_on_train(detector, dataset, train_indices: Sequence[int], *, quantile: float = 0.995,
                            batch_size: int = 32, preprocess: Optional[Callable] = None,
                            progress: bool = False) -> torch.Tensor:
    """Per-component detection thresholds for a baseline: the NetDissect top-quantile rule.

    For component i, with ``n`` = number of its map values over the whole train split (all images,
    all map positions, at map resolution, *before* upsampling) and ``m = ceil((1 − quantile)·n)``,
    the threshold ``t_i`` is the ``(m+1)``-th largest value, so that exactly the ``m`` largest values
    satisfy ``value > t_i`` when there are no ties (the top ``1 − quantile`` fraction fires). It is
    computed exactly in one stream by keeping the running ``m + 1`` largest values per component
    (memory O(I·m)); all train maps must therefore have one size ``h × w``.

    Parameters
    ----------
    detector : callable or array
        Same as :func:`dissect` (continuous component maps, e.g. PCA/NMF projections).
    dataset, train_indices : as in :func:`dissect`
    quantile : float in (0, 1)
        0.995 (NetDissect's top 0.5 %) by default.

    Returns
    -------
    (I,) float32 tensor, for ``dissect(..., threshold=thresholds)``.

    Examples
    --------
    >>> thr = fit_thresholds_on_train(pca_maps, world, train_idx)  # doctest: +SKIP
    >>> res = dissect(pca_maps, world, train_idx, val_idx, threshold=thr)  # doctest: +SKIP
    """
    quantile = check_in_range(quantile, "quantile", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    tr = _check_indices(train_indices, len(dataset), "train_indices")
    batch_size = check_positive_int(batch_size, "batch_size")
    source = _Source(detector, len(dataset), preprocess)
    top: Optional[torch.Tensor] = None
    keep = None
    size = None
    bar = _progress(total=len(tr), enabled=progress, desc="thresholds", unit="img")
    for start in range(0, len(tr), batch_size):
        idx = tr[start:start + batch_size]
        images = None
        if source.callable:
            imgs = [np.asarray(dataset[i].image) for i in idx]
            if len({im.shape for im in imgs}) > 1:
                # one call per image size; maps must still share one size (checked below)
                parts = [source.maps([i], im[None]) for i, im in zip(idx, imgs)]
                maps = torch.cat(parts, 0)
            else:
                images = np.stack(imgs)
                maps = source.maps(idx, images)
        else:
            maps = source.maps(idx, None)
        b, n_det, h, w = maps.shape
        if size is None:
            size = (h, w)
            n_total = len(tr) * h * w
            keep = min(n_total, math.ceil((1.0 - quantile) * n_total - 1e-9) + 1)  # guard 0.01*400 = 4.000...04
        elif (h, w) != size:
            raise ValidationError(f"fit_thresholds_on_train needs maps of one size; got {size} and then {(h, w)}. "
                                  f"Resize the images to one size first.")
        vals = maps.detach().permute(1, 0, 2, 3).reshape(n_det, -1).double().cpu()
        cand = vals if top is None else torch.cat([top, vals], 1)
        top = cand.topk(min(keep, cand.shape[1]), dim=1).values
        bar.update(len(idx))
    bar.close()
    return top[:, -1].float().clone()
