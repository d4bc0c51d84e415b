"""The shortcut experiment (method.md §8): find a watermark concept with EDDP and remove it.

Protocol
--------
1. Model: ``worldnet-shortcut`` (trained with the "rook" watermark on class 0's images; the
   watermark spec is read from the checkpoint's json sidecar), or any WorldNet checkpoint file.
2. Fit data: ``n_fit`` images of the *training distribution* (the ``train`` split with the
   watermark, seed ``seed``); capture ``layer``; fit :class:`~unveil.EDDP` with the head above
   the layer (URA terms on).
3. The watermark detectors. Every detector is labelled, as in Network Dissection, with the world
   concept of highest IoU over the fit images (maps bilinearly upsampled to the image, cut at 0.5).
   The candidates are the detectors labelled "watermark" with an IoU of at least ``min_iou`` (0.04,
   the interpretable-detector rule): a glyph that the layer represents as several patterns (its
   parts, its offsets against the layer's grid) is found by several detectors, and removing only one
   of them leaves the others to carry the shortcut. ``detectors="select"`` (default) keeps, per edit
   direction, the candidates whose removal helps on held-out data (:func:`~unveil.edit.choose_concepts`:
   greedy, best IoU first; a detector labelled "watermark" that also fires on much else costs clean
   accuracy for little gain). ``detectors="label"`` corrects every candidate; ``detectors="best"``
   only the one of highest watermark IoU (the paper's protocol).
4. Strength: :func:`~unveil.edit.choose_strength` over :data:`GRID_MULTIPLIERS` times the
   detector's median signal value, on held-out data — the ``poisoned_test`` split
   of seed ``val_seed`` (the watermark stamped on every image of the other classes) under the
   constraint that the clean ``test`` split of the same seed loses at most ``max_clean_drop``.
5. Evaluation on the test images of seed ``seed`` (the checkpoint's own test set): clean accuracy and
   poisoned accuracy, before and after the correction.
6. Controls, each with the masks ``m_p`` of the same candidate detectors, its own selection among
   them (``"select"``) and its own strength, chosen by the same rule on the same held-out data (all
   directions have unit norm, so strengths are in the same units): the filter directions
   ``w/‖w‖``; ``n_random`` draws of random unit directions (one per candidate); two supervised
   Pattern-CAVs (difference of means, normalised, in place of every corrected detector's
   direction): with *cell* labels (mean activation of watermark positions
   minus non-watermark positions, a position labelled by the watermark covering ≥ ``cav_cover`` of its
   cell: finer supervision than the literature's) and with *image* labels as in Pahde et al. (max-pooled
   maps of the stamped fit images minus the unstamped ones; when every image of the target class is
   stamped this is also "target class vs the rest").
7. A label-free alternative to the signal vector, with the same masks and rule: each corrected
   detector's mean difference (:func:`~unveil.edit.mean_difference_directions`: the mean of the fit
   positions it fires at minus the others'), i.e. Pattern-CAV with the detector as the labeller.

An "oracle" row replaces the positions the true watermark mask covers with the mean activation of
non-watermark positions: a reference for what an edit at this layer can recover (not a strict
bound: a direction edit can do slightly better). "True-mask" rows apply the
signal, filter and Pattern-CAV edits with the true watermark cells as the mask instead of ``m_p``
(strength chosen by the same rule): they separate the direction's quality from the mask's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import ValidationError
from .._validation import make_generator
from ..evaluate.iou import MaskIoU
from ..models.accuracy import top1_accuracy

__all__ = ["run_shortcut_experiment", "watermark_iou", "concept_iou", "GRID_MULTIPLIERS"]
logger = logging.getLogger("unveil")

#: strengths tried for every direction, in units of the watermark detector's median signal value
GRID_MULTIPLIERS = (0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def watermark_iou(det_maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU per detector of ``upsample(det_maps) > threshold`` with pixel ``masks`` over a data set.

    det_maps : (N, I, h, w) detector activations; masks : bool (N, H, W). Returns (I,).
    """
    return concept_iou(det_maps, torch.as_tensor(masks).bool()[:, None], threshold)[:, 0]


def concept_iou(det_maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, batch: int = 64) -> torch.Tensor:
    """IoU of every detector with every concept: ``upsample(det_maps) > threshold`` against pixel masks.

    det_maps : (N, I, h, w) detector activations; masks : bool (N, C, H, W). Returns (I, C).
    """
    N, I = det_maps.shape[:2]
    if masks.shape[0] != N or masks.dim() != 4:
        raise ValidationError(f"masks must have shape (N, C, H, W) with N = {N} (one per map); got "
                              f"{tuple(masks.shape)}.")
    H, W = masks.shape[-2:]
    C = masks.shape[1]
    acc = MaskIoU(I, C)
    for s in range(0, N, batch):
        up = F.interpolate(det_maps[s:s + batch].float(), size=(H, W), mode="bilinear",
                           align_corners=False) > threshold
        m = torch.as_tensor(masks[s:s + batch]).bool()
        acc.update(up.permute(0, 2, 3, 1).reshape(-1, I), m.permute(0, 2, 3, 1).reshape(-1, C))
    return acc.result().float()


def _accuracy(head, maps, labels, fn=None, batch=256) -> float:
    return top1_accuracy(lambda m: head(fn(m) if fn else m), maps, labels, batch)


def _region_accuracy(head, maps, labels, region, fn, k, batch=256) -> float:
    """Accuracy of ``head(fn(maps, region, k))`` with a per-image (N, 1, h, w) region mask."""
    return top1_accuracy(lambda m, r: head(m if k == 0 else fn(m, r[:, 0], k)), (maps, region), labels, batch)


def run_shortcut_experiment(*, layer: str = "layer3", n_concepts: int = 32, n_fit: int = 1400, n_val: int = 700,
                            n_test: int = 1000, seed: int = 0, val_seed: int = 1, n_random: int = 10,
                            max_clean_drop: float = 0.005, cav_cover: float = 0.3, eddp_params: Optional[dict] = None,
                            detectors: str = "select", min_iou: float = 0.04,
                            actmax: bool = True, actmax_steps: int = 96, checkpoint=None,
                            progress: bool = False) -> dict:
    """Run the shortcut experiment (see the module docstring) and return every number.

    Parameters
    ----------
    detectors : {"select", "label", "best"}
        Which detectors are corrected (step 3 of the module docstring): those of the detectors
        labelled "watermark" with IoU >= ``min_iou`` that help on held-out data (per direction), all
        of them, or only the one of highest watermark IoU.
    checkpoint : path, optional
        A WorldNet checkpoint (``.safetensors`` + ``.json`` sidecar) trained with a watermark;
        default the shipped ``worldnet-shortcut``. The watermark is the one recorded in its sidecar.

    Returns
    -------
    dict with ``"correction"`` (``poisoned_acc_before/after``, ``clean_acc_before/after``,
    ``filter_acc_after``, ``random_acc_after`` (mean over the random directions),
    ``pattern_cav_acc_after`` (cell labels), ``pattern_cav_image_acc_after`` (image labels),
    ``mean_difference_acc_after`` (label-free), ``watermark_iou`` (the best single detector), ``watermark_detectors``
    (the candidates) and ``union_iou`` (the candidates together), ``signal_detectors`` (those corrected
    along ŝ), ``strength``, and their clean accuracies and
    strengths), ``"activation_maximization"`` (``cos_signal``, ``cos_filter``, ``cos_pattern_cav``:
    means over detectors, plus the full summary) and ``"setup"``.

    Examples
    --------
    >>> res = run_shortcut_experiment(n_fit=700)      # doctest: +SKIP
    >>> res["correction"]["poisoned_acc_after"]        # doctest: +SKIP
    """
    if detectors not in ("select", "label", "best"):
        raise ValidationError(f"detectors must be 'select', 'label' or 'best', got {detectors!r}.")
    t0 = time.perf_counter()
    fitted, masks_fit = _fit_on_training_distribution(layer, n_concepts, n_fit, seed, eddp_params, checkpoint,
                                                      progress, t0)
    cand = _watermark_candidates(fitted, masks_fit, detectors, min_iou)
    del masks_fit
    splits = _held_out_and_test(fitted, n_val, val_seed, n_test, seed, progress)
    directions, mu_neg = _edit_directions(fitted, cand.detectors, seed, n_random, cav_cover)
    rows, grid, before = _edit_rows(fitted, cand.detectors, splits, directions, detectors, max_clean_drop)
    cov_t = _watermark_cells(splits.pois_test, fitted.X.shape[-1])  # the test images' true watermark cells
    correction = {
        **_correction_summary(rows, before, n_random),
        "watermark_iou": float(cand.iou[cand.best]), "watermark_detector": cand.best, "detectors_rule": detectors,
        "watermark_detectors": cand.detectors, "watermark_detectors_iou": [float(cand.iou[i]) for i in cand.detectors],
        "union_iou": cand.union_iou, "signal_detectors": rows["signal"]["detectors"],
        "union_precision": cand.union_precision, "union_recall": cand.union_recall,
        "second_best_iou": float(cand.iou.topk(2).values[1]) if len(cand.iou) > 1 else None,
        "strength": rows["signal"]["strength"], "filter_strength": rows["filter"]["strength"],
        "pattern_cav_strength": rows["pattern_cav"]["strength"],
        "signal_value_removal": _signal_value_removal(fitted, splits, rows["signal"]["detectors"]),
        "oracle_poisoned_acc": _oracle(fitted, splits, mu_neg, cov_t),
        "true_mask": _true_mask_rows(fitted, splits, directions, cand.best, grid, cov_t),
        "detector_precision": cand.precision, "detector_recall": cand.recall,
        "grid": grid, "rows": rows,
    }
    result = {"correction": correction,
              "setup": {"model": fitted.model_id, "layer": layer, "n_concepts": n_concepts, "n_fit": n_fit,
                        "n_val": n_val, "n_test": n_test, "seed": seed, "watermark": fitted.watermark.to_dict(),
                        "val_seed": val_seed, "n_random": n_random,
                        "max_clean_drop": max_clean_drop, "cav_cover": cav_cover,
                        "detectors": detectors, "min_iou": min_iou, "nonneg_layer": fitted.nonneg,
                        "fit_seconds": fitted.seconds, "eddp_params": eddp_params or {}}}
    if actmax:
        result["activation_maximization"] = _activation_maximization(fitted, cand.best, actmax_steps, seed)
    result["setup"]["seconds"] = time.perf_counter() - t0
    return result


@dataclass
class _Fitted:
    """Steps 1-2: the model, the head above ``layer``, the fit images' maps and EDDP's pairs on them."""

    model: torch.nn.Module
    model_id: str
    layer: str
    head: Any
    watermark: Any  # the checkpoint's WatermarkSpec
    fit: Any  # the ConceptWorld of the fit images
    X: torch.Tensor  # (n_fit, D, h, w) maps
    wm_fit: torch.Tensor  # (n_fit, H, W) watermark pixel masks
    nonneg: bool  # every map value >= 0 (edits clamp at 0)
    pairs: Any
    seconds: float  # loading + fit


@dataclass
class _Candidates:
    """Step 3: the watermark detectors and how well they cover the watermark on the fit images."""

    iou: torch.Tensor  # (I,) watermark IoU per detector
    best: int  # highest watermark IoU
    detectors: List[int]  # the candidates (or [best])
    precision: float  # the best detector, on the layer's cells
    recall: float
    union_precision: float  # the candidates together
    union_recall: float
    union_iou: float


@dataclass
class _Splits:
    """Held-out images (strength choice, seed ``val_seed``) and test maps (evaluation, seed ``seed``)."""

    xv_clean: torch.Tensor
    xv_pois: torch.Tensor
    yv: torch.Tensor
    pois_val: Any
    yt: torch.Tensor
    pois_test: Any
    ev: Any  # evaluators of the held-out poisoned and clean images (their maps cached)
    ev_clean: Any
    Xt_clean: torch.Tensor
    Xt_pois: torch.Tensor


def _fit_on_training_distribution(layer, n_concepts, n_fit, seed, eddp_params, checkpoint, progress,
                                  t0: float) -> Tuple[_Fitted, np.ndarray]:
    """Steps 1-2; also returns the fit images' concept masks (N, C, H, W), for labelling the detectors."""
    from ..capture import capture, make_head
    from ..data.world import ConceptWorld, WatermarkSpec
    from ..directions import EDDP
    from ..models.worldnet import checkpoint_path, load_worldnet_file

    path = checkpoint_path(shortcut=True) if checkpoint is None else checkpoint
    model, meta = load_worldnet_file(path)
    model_id = "worldnet-shortcut" if checkpoint is None else f"worldnet@{meta['tensors_sha256'][:12]}"
    wm_doc = meta.get("metrics", {}).get("data", {}).get("watermark")
    if not wm_doc:
        raise ValidationError(f"checkpoint {str(path)!r} was not trained with a watermark (its sidecar records "
                              f"none); train one with `unveil world train --shortcut`.")
    WM = WatermarkSpec(**wm_doc)
    head = make_head(model, layer, input_size=64)

    fit = ConceptWorld(n_fit, split="train", seed=seed, watermark=WM)
    x_fit = fit.images_tensor(progress=progress)
    masks_fit = fit.masks_array()
    wm_fit = torch.from_numpy(masks_fit[:, -1])
    X = capture(model, layer, x_fit, progress=progress)
    nonneg = bool((X >= 0).all())
    est = EDDP(n_concepts=n_concepts, random_state=seed, progress=progress, **(eddp_params or {}))
    est.fit(X, head=head)
    pairs = est.pairs_.with_meta(layer=layer, model_id=model_id)
    fitted = _Fitted(model, model_id, layer, head, WM, fit, X, wm_fit, nonneg, pairs, time.perf_counter() - t0)
    return fitted, masks_fit


def _watermark_candidates(fitted: _Fitted, masks_fit: np.ndarray, detectors: str, min_iou: float) -> _Candidates:
    X, wm_fit = fitted.X, fitted.wm_fit
    det_fit = fitted.pairs.detect(X)
    iou_all = concept_iou(det_fit, torch.from_numpy(masks_fit))
    iou = iou_all[:, -1]  # the watermark is the world's last concept
    j = int(iou.argmax())
    labelled = sorted((i for i in range(iou_all.shape[0])
                       if int(iou_all[i].argmax()) == iou_all.shape[1] - 1 and float(iou[i]) >= min_iou),
                      key=lambda i: -float(iou[i]))
    js = labelled if detectors != "best" and labelled else [j]
    if detectors != "best" and not labelled:
        logger.warning("no detector is labelled 'watermark' with IoU >= %.3g; correcting the best one (%d, IoU %.3f)",
                       min_iou, j, float(iou[j]))
    logger.info("watermark detector %d, IoU %.3f; candidate detectors %s", j, float(iou[j]), js)
    # on the layer's cells: precision of the detectors (y > 0.5) and recall of the cells the watermark
    # touches (>= 5% of the cell covered); for the best one and for the corrected ones together
    cells = F.adaptive_avg_pool2d(wm_fit.float()[:, None], X.shape[-1])[:, 0] > 0.05

    def prec_rec(fired):
        return (float((fired & cells).sum() / fired.sum().clamp_min(1)),
                float((fired & cells).sum() / cells.sum().clamp_min(1)))
    det_prec, det_rec = prec_rec(det_fit[:, j] > 0.5)
    union_prec, union_rec = prec_rec((det_fit[:, js] > 0.5).any(1))
    union_iou = float(watermark_iou(det_fit[:, js].amax(1, keepdim=True), wm_fit)[0])
    return _Candidates(iou, j, js, det_prec, det_rec, union_prec, union_rec, union_iou)


def _held_out_and_test(fitted: _Fitted, n_val: int, val_seed: int, n_test: int, seed: int,
                       progress: bool) -> _Splits:
    from ..capture import capture
    from ..data.world import ConceptWorld
    from ..edit.correction import _Evaluator
    model, layer = fitted.model, fitted.layer

    def split(n, s):
        clean = ConceptWorld(n, split="test", seed=s)
        pois = ConceptWorld(n, split="poisoned_test", seed=s, watermark=fitted.watermark)
        y = torch.from_numpy(clean.labels.copy())
        return clean.images_tensor(progress=progress), pois.images_tensor(progress=progress), y, pois
    xv_clean, xv_pois, yv, pois_val = split(n_val, val_seed)
    xt_clean, xt_pois, yt, pois_test = split(n_test, seed)
    ev = _Evaluator(model, layer, xv_pois, yv, 256, fitted.head)
    ev_clean = _Evaluator(model, layer, xv_clean, yv, 256, fitted.head)
    return _Splits(xv_clean, xv_pois, yv, pois_val, yt, pois_test, ev, ev_clean,
                   capture(model, layer, xt_clean), capture(model, layer, xt_pois))


def _edit_directions(fitted: _Fitted, js: List[int], seed: int, n_random: int,
                     cav_cover: float) -> Tuple[Dict[str, Any], torch.Tensor]:
    """Signal, filter, supervised Pattern-CAV (cell and image labels), mean difference and random directions.

    Also returns the mean activation of the non-watermark positions (the oracle's replacement value).
    """
    from ..edit.intervention import mean_difference_directions
    X, pairs = fitted.X, fitted.pairs
    D = pairs.n_features
    cover = F.adaptive_avg_pool2d(fitted.wm_fit.float()[:, None], X.shape[-1])[:, 0]
    P = X.permute(0, 2, 3, 1)
    pos = cover >= cav_cover
    cav = P[pos].mean(0) - P[~pos].mean(0)
    gen = make_generator(seed + 17)
    rand = torch.randn(n_random, len(js), D, generator=gen)
    directions = {"signal": "signal", "filter": "filter",
                  "pattern_cav": (cav / cav.norm())[None].expand(len(js), D).contiguous()}
    stamped = torch.from_numpy(fitted.fit.watermarked.copy())
    if stamped.any() and not stamped.all():
        pooled = X.amax(dim=(2, 3))
        cav_image = pooled[stamped].mean(0) - pooled[~stamped].mean(0)
        directions["pattern_cav_image"] = (cav_image / cav_image.norm())[None].expand(len(js), D).contiguous()
    else:
        logger.warning("every fit image (or none) carries the watermark; no image-label Pattern-CAV row")
    mean_diff = mean_difference_directions(X, pairs, js)
    if torch.isfinite(mean_diff).all():
        directions["mean_difference"] = mean_diff
    else:
        logger.warning("a corrected detector fires at no fit position (or at all of them); no mean-difference row")
    for r in range(n_random):
        directions[f"random_{r}"] = rand[r] / rand[r].norm(dim=1, keepdim=True)
    return directions, P[~pos].mean(0)[None, :, None, None]


def _edit_rows(fitted: _Fitted, js: List[int], splits: _Splits, directions: Dict[str, Any], detectors: str,
               max_clean_drop: float) -> Tuple[Dict[str, dict], List[float], Tuple[float, float]]:
    """Per direction: its detectors and strength chosen on held-out data, its test accuracies.

    Also returns the grid of strengths and the test accuracies before any edit (clean, poisoned).
    """
    from ..edit import choose_concepts, choose_strength
    from ..edit.correction import default_grid
    from ..edit.intervention import edit_maps
    model, layer, pairs, head, nonneg = fitted.model, fitted.layer, fitted.pairs, fitted.head, fitted.nonneg
    s = splits
    # multiples of the watermark detector's median signal value; the top end is wide (32x) because the
    # filter and Pattern-CAV controls can keep gaining up to ~8x (measured at layer2), and a grid that
    # stopped there would cap the controls, not the signal vector
    grid = default_grid(pairs, js, s.ev.maps, multipliers=GRID_MULTIPLIERS)
    before = _accuracy(head, s.Xt_clean, s.yt), _accuracy(head, s.Xt_pois, s.yt)
    rows = {}
    for name, d in directions.items():
        steps = None
        if detectors == "select":
            sel = choose_concepts(model, layer, pairs, js, s.xv_pois, s.yv, s.xv_clean, s.yv, grid=grid,
                                  max_clean_drop=max_clean_drop, direction=d, nonneg=nonneg, head=head,
                                  _evaluators=(s.ev, s.ev_clean))
            choice, used, steps = sel.choice, sel.concepts, sel.steps
            d = d if isinstance(d, str) else d[[js.index(c) for c in used]]
        else:
            choice = choose_strength(model, layer, pairs, js, s.xv_pois, s.yv, s.xv_clean, s.yv, grid=grid,
                                     max_clean_drop=max_clean_drop, direction=d, nonneg=nonneg, head=head,
                                     _evaluators=(s.ev, s.ev_clean))
            used = js

        def fn(m, _k=choice.strength, _d=d, _used=used):
            return edit_maps(m, pairs, _used, strength=_k, direction=_d, nonneg=nonneg)
        rows[name] = {"strength": choice.strength, "detectors": used, "val_poisoned_acc": choice.accuracy,
                      "val_clean_acc": choice.clean_accuracy, "clean_acc_after": _accuracy(head, s.Xt_clean, s.yt, fn),
                      "poisoned_acc_after": _accuracy(head, s.Xt_pois, s.yt, fn), "table": choice.table,
                      "selection": steps}
    return rows, grid, before


def _correction_summary(rows: Dict[str, dict], before: Tuple[float, float], n_random: int) -> dict:
    """The headline accuracies: before, after the signal edit and after each control's edit."""
    base_clean, base_pois = before
    rnd = [rows[f"random_{r}"] for r in range(n_random)]
    return {
        "poisoned_acc_before": base_pois, "poisoned_acc_after": rows["signal"]["poisoned_acc_after"],
        "clean_acc_before": base_clean, "clean_acc_after": rows["signal"]["clean_acc_after"],
        "filter_acc_after": rows["filter"]["poisoned_acc_after"],
        "filter_clean_acc_after": rows["filter"]["clean_acc_after"],
        "random_acc_after": float(np.mean([r["poisoned_acc_after"] for r in rnd])) if rnd else None,
        "random_acc_after_max": float(np.max([r["poisoned_acc_after"] for r in rnd])) if rnd else None,
        "random_clean_acc_after": float(np.mean([r["clean_acc_after"] for r in rnd])) if rnd else None,
        "pattern_cav_acc_after": rows["pattern_cav"]["poisoned_acc_after"],
        "pattern_cav_clean_acc_after": rows["pattern_cav"]["clean_acc_after"],
        **{f"{name}_{key}": rows[name][field] if name in rows else None
           for name in ("pattern_cav_image", "mean_difference")
           for key, field in (("acc_after", "poisoned_acc_after"), ("clean_acc_after", "clean_acc_after"),
                              ("strength", "strength"), ("detectors", "detectors"))},
    }


def _signal_value_removal(fitted: _Fitted, splits: _Splits, js_s: List[int]) -> dict:
    """The exact removal of the signal value (k = signal value at each position, no tuning), with the
    detectors corrected along ŝ."""
    from ..edit.intervention import edit_maps
    head, pairs, nonneg, s = fitted.head, fitted.pairs, fitted.nonneg, splits
    return {"clean_acc_after": _accuracy(head, s.Xt_clean, s.yt, lambda m: edit_maps(m, pairs, js_s, nonneg=nonneg)),
            "poisoned_acc_after": _accuracy(head, s.Xt_pois, s.yt, lambda m: edit_maps(m, pairs, js_s, nonneg=nonneg))}


def _watermark_cells(world, h: int) -> torch.Tensor:
    """(N, 1, h, h) float: the layer's cells the watermark covers (> 5 %) on ``world``'s images."""
    wm = torch.from_numpy(world.masks_array()[:, -1]).float()
    return (F.adaptive_avg_pool2d(wm[:, None], h) > 0.05).float()


def _oracle(fitted: _Fitted, splits: _Splits, mu_neg: torch.Tensor, cov_t: torch.Tensor) -> float:
    """Poisoned test accuracy with the true watermark cells replaced by the mean of the non-watermark positions."""
    return _accuracy(fitted.head, splits.Xt_pois * (1 - cov_t) + cov_t * mu_neg, splits.yt)


def _true_mask_rows(fitted: _Fitted, splits: _Splits, directions: Dict[str, Any], j: int,
                    grid: List[float], cov_t: torch.Tensor) -> Dict[str, dict]:
    """The best detector's directions with the true watermark cells as the mask (instead of m_p).

    Separates the quality of the direction from the quality of the detector's mask. k is chosen on the
    held-out poisoned split by the same rule (clean images carry no watermark, so their mask is empty and
    the clean constraint holds trivially).
    """
    from ..edit.intervention import edit_maps
    head, pairs, nonneg, s = fitted.head, fitted.pairs, fitted.nonneg, splits
    cov_v = _watermark_cells(s.pois_val, fitted.X.shape[-1])
    true_mask = {}
    for name in ("signal", "filter", "pattern_cav"):
        d = directions[name] if isinstance(directions[name], str) else directions[name][:1]

        def fn_region(m, r, _k, _d=d):
            return edit_maps(m, pairs, [j], strength=_k, direction=_d, nonneg=nonneg, region=r)
        table = [(_region_accuracy(head, s.ev.maps, s.yv, cov_v, fn_region, k), k) for k in grid]
        best_acc, best_k = max(table, key=lambda t: (t[0], -t[1]))
        true_mask[name] = {"strength": best_k, "val_poisoned_acc": best_acc,
                           "poisoned_acc_after": _region_accuracy(head, s.Xt_pois, s.yt, cov_t, fn_region, best_k)}
    return true_mask


def _activation_maximization(fitted: _Fitted, j: int, steps: int, seed: int) -> dict:
    """Activation maximisation of every detector: cosines of the induced change with ŝ, w and Pattern-CAV."""
    from ..explain.actmax import maximize_detectors
    res = maximize_detectors(fitted.model, fitted.layer, fitted.pairs, steps=steps, reference_maps=fitted.X,
                             image_size=64, random_state=seed, batch_size=32)
    s = res.summary()
    return {
        "cos_signal": s["cos_signal"]["mean"] if s["cos_signal"] else None,
        "cos_filter": s["cos_filter"]["mean"] if s["cos_filter"] else None,
        "cos_pattern_cav": s["cos_pattern_cav"]["mean"] if s["cos_pattern_cav"] else None,
        "summary": s, "watermark_detector": {"cos_signal": float(res.cos_signal[j]),
                                             "cos_filter": float(res.cos_filter[j]),
                                             "cos_pattern_cav": float(res.cos_pattern_cav[j])},
        "images": res.images}
