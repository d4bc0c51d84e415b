"""Recovery metrics against planted ground truth (method.md §6).

Pure functions on tensors/arrays that compare what a method found with the truth of a synthetic
data set:

- :func:`matched_iou` — IoU of every detector's positive set with every concept's patch set, with
  detectors matched to concepts by the Hungarian method (maximising the total IoU);
- :func:`direction_cosines` — absolute cosine of each matched estimated direction to the truth;
- :func:`signal_value_rmse` — RMSE of mean-centred signal values (latent factors);
- :func:`score_pairs` — all of the above for a :class:`~unveil.directions.DirectionPairs` on a
  :class:`~unveil.data.synthetic.SyntheticData`, returned as a :class:`RecoveryReport`.

Conventions
-----------
* An *assignment* is an int array of length I (one entry per true concept, in the order of the true
  concepts) holding the index of the estimated detector/direction matched to that concept, or -1
  when there are fewer estimates than concepts and the concept is left unmatched.
* Cosines are **absolute** (|cos|) for every method. Decomposition baselines (PCA, ICA, ...) have an
  arbitrary sign per component; reporting |cos| for all methods is the simplest rule that is fair
  to every one of them. A method with a correct sign loses nothing by it.
* Unmatched concepts score IoU 0, cosine 0 and RMSE NaN (and are excluded from the overall RMSE);
  the report says how many were unmatched.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List

import numpy as np
import torch

from .._errors import ValidationError
from .iou import mask_iou

__all__ = ["matched_iou", "iou_matrix", "direction_cosines", "signal_value_rmse", "RecoveryReport",
           "score_pairs", "unit_encoder_pairs"]


def _np(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except Exception:  # noqa: BLE001
        raise ValidationError(f"{name} must be an array or tensor, got {type(a).__name__}.") from None


def iou_matrix(detected, concept, n_concepts: int) -> np.ndarray:
    """IoU of each detector's positive patches with each concept's patches.

    Parameters
    ----------
    detected : (P, I_hat) bool array/tensor
        ``detected[p, k]`` is True where detector k fires on patch p.
    concept : (P,) int array/tensor
        The true concept of each patch, in ``0 .. n_concepts-1``.
    n_concepts : int
        Number of true concepts I.

    Returns
    -------
    (I_hat, I) float64 array. A pair whose union is empty has IoU 0.

    Examples
    --------
    >>> import numpy as np
    >>> iou_matrix(np.array([[1, 0], [0, 1]], bool), np.array([0, 1]), 2)
    array([[1., 0.],
           [0., 1.]])
    """
    det = _np(detected, "detected")
    con = _np(concept, "concept")
    if det.ndim != 2:
        raise ValidationError(f"detected must be (P, I_hat) booleans, got shape {det.shape}.")
    if con.ndim != 1 or con.shape[0] != det.shape[0]:
        raise ValidationError(f"concept must be (P,) with P = {det.shape[0]} (rows of detected), got shape "
                              f"{con.shape}.")
    if isinstance(n_concepts, bool) or not isinstance(n_concepts, (int, np.integer)) or n_concepts < 1:
        raise ValidationError(f"n_concepts must be an integer >= 1, got {n_concepts!r}.")
    if con.size and (con.min() < 0 or con.max() >= n_concepts):
        raise ValidationError(f"concept labels must lie in 0..{n_concepts - 1}, got range "
                              f"{int(con.min())}..{int(con.max())}.")
    truth = con[:, None] == np.arange(n_concepts)[None, :]  # (P, I)
    return mask_iou(torch.from_numpy(det.astype(bool)), torch.from_numpy(truth)).numpy()


def matched_iou(detected, concept, n_concepts: int) -> Dict[str, np.ndarray]:
    """Match detectors to concepts (Hungarian, maximising IoU) and report the matched IoUs.

    Parameters
    ----------
    detected : (P, I_hat) bool
        Detector firing per patch.
    concept : (P,) int
        True concept per patch.
    n_concepts : int
        Number of true concepts I.

    Returns
    -------
    dict with
        ``iou`` : (I_hat, I) IoU matrix;
        ``assignment`` : (I,) int, detector matched to each true concept (-1 if none);
        ``matched`` : (I,) IoU of each true concept with its detector (0 if unmatched);
        ``off_diagonal`` : float, mean IoU of every matched detector with the concepts it was *not*
        matched to (0 for perfectly exclusive detectors; NaN when I = 1).

    Examples
    --------
    >>> import numpy as np
    >>> det = np.array([[0, 1], [1, 0], [1, 0]], bool)   # detectors in swapped order
    >>> r = matched_iou(det, np.array([0, 1, 1]), 2)
    >>> r["assignment"].tolist(), r["matched"].tolist()
    ([1, 0], [1.0, 1.0])
    """
    from scipy.optimize import linear_sum_assignment

    iou = iou_matrix(detected, concept, n_concepts)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    assignment = np.full(n_concepts, -1, dtype=np.int64)
    assignment[cols] = rows
    matched = np.array([iou[k, i] if k >= 0 else 0.0 for i, k in enumerate(assignment)])
    off = [iou[k, j] for i, k in enumerate(assignment) if k >= 0 for j in range(n_concepts) if j != i]
    off_diagonal = float(np.mean(off)) if off else float("nan")
    return {"iou": iou, "assignment": assignment, "matched": matched, "off_diagonal": off_diagonal}


def direction_cosines(est, truth, assignment) -> np.ndarray:
    """Absolute cosine between each true direction and its matched estimate.

    Parameters
    ----------
    est : (I_hat, D)
        Estimated directions (rows).
    truth : (I, D)
        True directions (rows).
    assignment : (I,) int
        Estimate matched to each true direction (-1: unmatched, cosine 0).

    Returns
    -------
    (I,) float64 array of ``|cos(est[assignment[i]], truth[i])|``. A zero estimate has cosine 0.

    Notes
    -----
    The absolute value is used for every method, because decomposition baselines have an arbitrary
    sign per component.

    Examples
    --------
    >>> import numpy as np
    >>> direction_cosines(np.array([[0., -2.]]), np.array([[0., 1.]]), np.array([0])).tolist()
    [1.0]
    """
    E = _np(est, "est").astype(np.float64)
    T = _np(truth, "truth").astype(np.float64)
    a = _np(assignment, "assignment").astype(np.int64)
    if E.ndim != 2 or T.ndim != 2 or E.shape[1] != T.shape[1]:
        raise ValidationError(f"est must be (I_hat, D) and truth (I, D) with the same D; got {E.shape} and "
                              f"{T.shape}.")
    if a.shape != (T.shape[0],) or (a >= E.shape[0]).any() or (a < -1).any():
        raise ValidationError(f"assignment must be ({T.shape[0]},) ints in -1..{E.shape[0] - 1}, got "
                              f"{a.tolist()}.")
    out = np.zeros(T.shape[0])
    for i, k in enumerate(a):
        if k < 0:
            continue
        ne, nt = np.linalg.norm(E[k]), np.linalg.norm(T[i])
        if ne > 0 and nt > 0:
            out[i] = min(1.0, abs(float(E[k] @ T[i]) / (ne * nt)))
    return out


def signal_value_rmse(est_values, true_centered, assignment) -> Dict[str, object]:
    """RMSE between estimated and true mean-centred signal values (method.md §3).

    Parameters
    ----------
    est_values : (N, I_hat, H, W)
        Estimated signal values (e.g. ``DirectionPairs.signal_values(X)``).
    true_centered : (N, I, H, W)
        True latent factors minus their data mean (``SyntheticData.true_signal_values()``).
    assignment : (I,) int
        Estimate matched to each true concept (-1: unmatched, RMSE NaN).

    Returns
    -------
    dict with ``per_concept`` (I,) RMSE per true concept over all positions, and ``overall``, the
    RMSE over all positions of all matched concepts (NaN if none is matched).

    Examples
    --------
    >>> import numpy as np
    >>> t = np.zeros((4, 1, 1, 2)); e = t + 0.5
    >>> signal_value_rmse(e, t, np.array([0]))["overall"]
    0.5
    """
    E = _np(est_values, "est_values").astype(np.float64)
    T = _np(true_centered, "true_centered").astype(np.float64)
    a = _np(assignment, "assignment").astype(np.int64)
    if E.ndim != 4 or T.ndim != 4 or E.shape[0] != T.shape[0] or E.shape[2:] != T.shape[2:]:
        raise ValidationError(f"est_values must be (N, I_hat, H, W) and true_centered (N, I, H, W) with the same "
                              f"N, H, W; got {E.shape} and {T.shape}.")
    if a.shape != (T.shape[1],) or (a >= E.shape[1]).any() or (a < -1).any():
        raise ValidationError(f"assignment must be ({T.shape[1]},) ints in -1..{E.shape[1] - 1}, got "
                              f"{a.tolist()}.")
    per = np.full(T.shape[1], np.nan)
    sq = []
    for i, k in enumerate(a):
        if k < 0:
            continue
        d = (E[:, k] - T[:, i]) ** 2
        per[i] = float(np.sqrt(d.mean()))
        sq.append(d.ravel())
    overall = float(np.sqrt(np.concatenate(sq).mean())) if sq else float("nan")
    return {"per_concept": per, "overall": overall}


@dataclass
class RecoveryReport:
    """How well a set of direction pairs recovers a synthetic data set's planted truth.

    All per-concept lists are in the order of the *true* concepts; ``assignment[i]`` is the
    estimated concept matched to true concept i (-1: unmatched).
    """

    matched_iou: List[float]
    off_diagonal_iou: float
    assignment: List[int]
    iou_matrix: List[List[float]]
    encoder_cosine: List[float]
    decoder_cosine: List[float]
    rmse: List[float]
    rmse_overall: float
    rmse_raw_overall: float
    n_unmatched: int = 0
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.matched_iou))

    @property
    def mean_encoder_cosine(self) -> float:
        return float(np.mean(self.encoder_cosine))

    @property
    def mean_decoder_cosine(self) -> float:
        return float(np.mean(self.decoder_cosine))

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (NaN becomes ``None``), with the summary means added."""
        def clean(v):
            if isinstance(v, float) and not np.isfinite(v):
                return None
            if isinstance(v, list):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        d = asdict(self)
        d.update(mean_iou=self.mean_iou, mean_encoder_cosine=self.mean_encoder_cosine,
                 mean_decoder_cosine=self.mean_decoder_cosine)
        return clean(d)


def _matched_subset(detected, concept, n_concepts: int, sel) -> Dict[str, np.ndarray]:
    """:func:`matched_iou` restricted to the true concepts ``sel`` (the others are negatives)."""
    from scipy.optimize import linear_sum_assignment

    iou = iou_matrix(detected, concept, n_concepts)[:, sel]
    rows, cols = linear_sum_assignment(iou, maximize=True)
    assignment = np.full(len(sel), -1, dtype=np.int64)
    assignment[cols] = rows
    matched = np.array([iou[k, i] if k >= 0 else 0.0 for i, k in enumerate(assignment)])
    off = [iou[k, j] for i, k in enumerate(assignment) if k >= 0 for j in range(len(sel)) if j != i]
    return {"iou": iou, "assignment": assignment, "matched": matched,
            "off_diagonal": float(np.mean(off)) if off else float("nan")}


def unit_encoder_pairs(pairs):
    """A copy of ``pairs`` whose encoders are scaled to unit norm (same detectors, same directions).

    Signal values ``wᵀ(x − E[x]) / (wᵀŝ)`` are coordinates along ``ŝ``; the planted latent factors
    are coordinates along *unit* directions, so a fair comparison reads them along unit encoders.
    This makes the RMSE independent of each method's scale convention. The detector (and its
    detection rule, e.g. nearest-centroid detection) is kept: only ``encoders`` is replaced.
    """
    norms = pairs.encoders.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return pairs.replace(encoders=pairs.encoders / norms)


def _patches_first(t: torch.Tensor) -> torch.Tensor:
    """(N, I, H, W) -> (N·H·W, I) in the order of ``X.permute(0, 2, 3, 1).reshape(-1, D)``."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def score_pairs(pairs, data, concepts=None) -> RecoveryReport:
    """Score direction pairs against the planted truth of a synthetic data set.

    Parameters
    ----------
    pairs : DirectionPairs
        Any method's result (EDDP or a baseline from :mod:`unveil.directions.baselines`). Its
        ``detect`` method decides detection (a subclass may override it, e.g. nearest centroid).
    data : SyntheticData
        Maps ``X`` with their truth (``concept``, ``alpha``, ``S``, ``Dist``).
    concepts : sequence of int, optional
        Score only these true concepts (e.g. the ones the class rules use): detectors are matched
        to them alone, every other patch counts as a negative, and the ideal filters are still the
        rows of pinv([S | Dist]) over *all* planted concepts. Per-concept lists follow this order.

    Returns
    -------
    RecoveryReport
        - detection: ``pairs.detect(data.X) > 0.5`` per patch; IoU with each concept's patches,
          Hungarian matching (:func:`matched_iou`);
        - encoder cosine: ``|cos|`` of each matched encoder with the true ``S`` row;
        - decoder cosine: ``|cos|`` of each matched decoder with the ideal filter
          (``data.ideal_filters()``, rows of pinv([S | Dist]));
        - RMSE: of the signal values read along *unit-norm* encoders (see
          :func:`unit_encoder_pairs`) against the true mean-centred latent factors;
          ``rmse_raw_overall`` is the same with the encoders exactly as given.

    Examples
    --------
    >>> from unveil.data.synthetic import make_synthetic
    >>> from unveil.directions import DirectionPairs
    >>> data = make_synthetic(n_per_class=50)
    >>> F = data.ideal_filters()          # reads α exactly; the recipe adds 10 to every component
    >>> ideal = DirectionPairs(F, 2.5 + 10 * F.sum(1), data.S, mean=data.X.mean(dim=(0, 2, 3)))
    >>> report = score_pairs(ideal, data)
    >>> [round(v, 3) for v in report.matched_iou], round(report.rmse_overall, 3)
    ([1.0, 1.0, 1.0], 0.0)
    """
    from ..directions.pairs import DirectionPairs

    if not isinstance(pairs, DirectionPairs):
        raise ValidationError(f"pairs must be a DirectionPairs, got {type(pairs).__name__}.")
    X = data.X
    if pairs.n_features != X.shape[1]:
        raise ValidationError(f"pairs have {pairs.n_features} features but the data has {X.shape[1]}; score "
                              f"pairs fitted on this data set.")
    I = data.n_concepts
    if concepts is None:
        sel = list(range(I))
    else:
        sel = [int(c) for c in concepts]
        if not sel or len(set(sel)) != len(sel) or min(sel) < 0 or max(sel) >= I:
            raise ValidationError(f"concepts must be distinct indices in 0..{I - 1}; got {list(concepts)!r}.")
    with torch.no_grad():
        det = _patches_first(pairs.detect(X) > 0.5)
        if concepts is None:
            m = matched_iou(det, data.patch_concepts(), I)
        else:
            m = _matched_subset(det, data.patch_concepts(), I, sel)
        a = m["assignment"]
        enc = direction_cosines(pairs.encoders, data.S[sel], a)
        dec = direction_cosines(pairs.decoders, data.ideal_filters()[sel], a)
        truth = data.true_signal_values()[:, sel]
        try:
            r = signal_value_rmse(unit_encoder_pairs(pairs).signal_values(X), truth, a)
            raw = signal_value_rmse(pairs.signal_values(X), truth, a)["overall"]
            notes = {}
        except ValidationError as exc:  # wᵀŝ = 0 for some concept: values undefined
            r = {"per_concept": np.full(len(sel), np.nan), "overall": float("nan")}
            raw = float("nan")
            notes = {"rmse": str(exc)}
    return RecoveryReport(
        matched_iou=[float(v) for v in m["matched"]], off_diagonal_iou=float(m["off_diagonal"]),
        assignment=[int(v) for v in a], iou_matrix=m["iou"].tolist(),
        encoder_cosine=[float(v) for v in enc], decoder_cosine=[float(v) for v in dec],
        rmse=[float(v) for v in r["per_concept"]], rmse_overall=float(r["overall"]),
        rmse_raw_overall=float(raw), n_unmatched=int((a < 0).sum()), notes=notes)
