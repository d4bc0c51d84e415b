"""Which direction to edit with, measured on planted truth (method.md §1, §3, §8).

An edit removes or inserts concept i along a direction v at the positions its detector marks
(:func:`unveil.edit.edit_maps`). On synthetic data (:mod:`unveil.data.synthetic`) the truth is known:
the latent factors ``α`` are read exactly by ``L = pinv([S | Dist])`` and the planted encoding
direction ``s_i`` says how the concept is written. For each concept i (its matched detector
``(w, b)``) and each candidate direction v (unit length):

Removal (the edit of ``unveil correct``, strength read by the detector, no tuning)
    ``x'_p = x_p − m_p·k_p·v`` with ``m_p = σ(wᵀx_p − b)`` and ``k_p = (wᵀx_p − wᵀμ)/(wᵀv)``, i.e.
    :func:`~unveil.edit.edit_maps` with ``strength=None`` (no ReLU clamp). The *ideal* removal uses the
    same masks, the true direction and the true amount: ``x*_p = x_p − m_p·(α_{p,i} − ᾱ_i)·s_i``.
Insertion (at the positions where the concept is absent)
    ``x'_p = x_p + k·v`` with ``k = δ/(wᵀv)``, δ the detector's own gap (mean of ``wᵀx`` where it fires
    minus where it does not): the strength a user sets from the detector. Ideal: ``x_p + δ*·s_i``,
    δ* the true gap of ``α_i`` between the concept's patches and the others.

Scores per concept (Δα = L·(x' − x) per patch, Δα* the ideal's):

- ``encoder_cosine``: ``cos(v, s_i)`` (signed; the directions' sign convention is "concept present").
- ``removed`` / ``inserted``: ``⟨Δα_i, Δα*_i⟩ / ‖Δα*_i‖²`` — the share of the intended change of the
  concept's own latent factor that the edit makes (1 is exact).
- ``leak_remove`` / ``leak_insert``: ``‖Δα_j, j≠i‖ / ‖Δα*_i‖`` — how much the *other concepts* move per
  unit of intended change (0 is clean).
- ``logit_r2_remove`` / ``logit_r2_insert``: ``1 − Σ‖ΔL − ΔL*‖² / Σ‖ΔL*‖²`` over images, ΔL the change
  of the head's logits centred over classes (softmax ignores a common shift): the fraction of the
  concept's effect on the prediction that the edit reproduces (1 is exact, ≤ 0 is no better than
  doing nothing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .._errors import ValidationError

__all__ = ["EditScores", "EditingReport", "score_edit_directions", "METRICS"]

#: the per-concept scores of :class:`EditScores`, in table order
METRICS = ("encoder_cosine", "removed", "leak_remove", "logit_r2_remove", "inserted", "leak_insert",
           "logit_r2_insert")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class EditScores:
    """Scores of one edit direction, one value per true concept (see the module docstring)."""

    encoder_cosine: List[float]
    removed: List[float]
    leak_remove: List[float]
    logit_r2_remove: List[float]
    inserted: List[float]
    leak_insert: List[float]
    logit_r2_insert: List[float]

    def mean(self, metric: str) -> float:
        if metric not in METRICS:
            raise ValidationError(f"metric must be one of {METRICS}, got {metric!r}.")
        return float(np.mean(getattr(self, metric)))

    def to_dict(self) -> dict:
        return {m: [float(v) for v in getattr(self, m)] for m in METRICS}

    @classmethod
    def from_dict(cls, doc: Mapping) -> "EditScores":
        try:
            return cls(**{m: [float(v) for v in doc[m]] for m in METRICS})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"edit scores must hold a list of numbers for each of {METRICS} ({exc}).") from None


@dataclass(frozen=True)
class EditingReport:
    """:func:`score_edit_directions`'s result: scores per direction name, the matched detectors."""

    scores: Dict[str, EditScores]
    assignment: List[int]
    n_concepts: int
    info: dict = field(default_factory=dict)

    def table(self) -> Dict[str, Dict[str, float]]:
        """Mean over concepts of every metric, per direction."""
        return {name: {m: s.mean(m) for m in METRICS} for name, s in self.scores.items()}

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "scores": {k: v.to_dict() for k, v in self.scores.items()},
                "assignment": list(self.assignment), "n_concepts": self.n_concepts, "info": dict(self.info)}

    @classmethod
    def from_dict(cls, doc: Mapping) -> "EditingReport":
        if not isinstance(doc, Mapping) or doc.get("schema_version") != SCHEMA_VERSION:
            raise ValidationError(f"not an editing report of schema version {SCHEMA_VERSION}.")
        scores = doc.get("scores")
        if not isinstance(scores, Mapping):
            raise ValidationError("editing report: 'scores' must be a mapping of direction name to scores.")
        return cls({str(k): EditScores.from_dict(v) for k, v in scores.items()},
                   [int(a) for a in doc.get("assignment", [])], int(doc.get("n_concepts", 0)),
                   dict(doc.get("info") or {}))


def _centred(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.mean(dim=1, keepdim=True)


def _r2(d: torch.Tensor, d_star: torch.Tensor) -> float:
    den = float((d_star ** 2).sum())
    if den <= 0:
        return float("nan")
    return 1.0 - float(((d - d_star) ** 2).sum()) / den


@torch.no_grad()
def score_edit_directions(data, head, pairs, directions: Mapping[str, Union[str, torch.Tensor]], *,
                          assignment: Optional[Sequence[int]] = None, batch_size: int = 512) -> EditingReport:
    """Score edit directions against the planted truth of a synthetic data set.

    Parameters
    ----------
    data : SyntheticData
        Maps with their truth (:func:`unveil.data.synthetic.make_synthetic`).
    head : nn.Module
        The network above the layer (maps -> logits), e.g. from :func:`~unveil.data.synthetic.train_head`.
    pairs : DirectionPairs
        Fitted on ``data.X``; their detectors give the masks and the strengths of every edit.
    directions : mapping of name -> ``"signal"``, ``"filter"``, ``"mean-difference"`` or tensor (I, D)
        The candidates. A tensor has one row per *true* concept (in the order of ``data.S``);
        strings are resolved for the matched detectors (``"mean-difference"`` on ``data.X``).
    assignment : sequence of int, optional
        The detector of each true concept (default: Hungarian matching on IoU, as the synthetic
        benchmark scores detection).

    Returns
    -------
    EditingReport

    Examples
    --------
    >>> from unveil.data.synthetic import make_synthetic, train_head
    >>> from unveil import DirectionPairs
    >>> data = make_synthetic(n_per_class=100)
    >>> head, _ = train_head(data, epochs=50)
    >>> F = data.ideal_filters()
    >>> ideal = DirectionPairs(F * 20, 20 * (2.5 + 10 * F.sum(1)), data.S, mean=data.X.mean(dim=(0, 2, 3)))
    >>> rep = score_edit_directions(data, head, ideal, {"true": data.S})
    >>> round(rep.table()["true"]["logit_r2_remove"], 3)
    1.0
    """
    X, assignment = _checked_assignment(data, pairs, assignment)
    N, D = X.shape[:2]
    I = data.n_concepts
    resolved = _resolved_directions(directions, pairs, assignment, X, I, D)
    truth = _Truth(data, head, X, batch_size)
    out: Dict[str, Dict[str, List[float]]] = {n: {m: [] for m in METRICS} for n in resolved}
    for i in range(I):
        _score_concept(i, assignment[i], truth, pairs, resolved, out)
    scores = {n: EditScores(**o) for n, o in out.items()}
    return EditingReport(scores, assignment, I, {"n_images": N, "n_features": D})


def _checked_assignment(data, pairs, assignment):
    """The maps (float) and the detector of each true concept (Hungarian matching on IoU by default)."""
    from ..directions.pairs import DirectionPairs
    from ..evaluate.recovery import _patches_first, matched_iou
    if not isinstance(pairs, DirectionPairs):
        raise ValidationError(f"pairs must be a DirectionPairs, got {type(pairs).__name__}.")
    X = data.X.float()
    D = X.shape[1]
    if pairs.n_features != D:
        raise ValidationError(f"pairs have {pairs.n_features} features but the data has {D}; score pairs fitted "
                              f"on this data set.")
    I = data.n_concepts
    if assignment is None:
        det = _patches_first(pairs.detect(X) > 0.5)
        assignment = matched_iou(det, data.patch_concepts(), I)["assignment"].tolist()
    assignment = [int(a) for a in assignment]
    if len(assignment) != I or any(a < 0 or a >= pairs.n_concepts for a in assignment):
        raise ValidationError(f"assignment must give a detector (0..{pairs.n_concepts - 1}) for each of the {I} "
                              f"true concepts, got {assignment}.")
    return X, assignment


def _resolved_directions(directions, pairs, assignment, X, I: int, D: int) -> Dict[str, torch.Tensor]:
    """Every candidate as unit rows (I, D), one per true concept."""
    from ..edit.intervention import resolve_directions
    resolved: Dict[str, torch.Tensor] = {}
    for name, d in directions.items():
        if isinstance(d, str):
            V = resolve_directions(pairs, assignment, d, maps=X)
        else:
            V = torch.as_tensor(d, dtype=torch.float32)
            if V.shape != (I, D):
                raise ValidationError(f"direction {name!r} must be a ({I}, {D}) tensor (one row per true concept), got "
                                      f"{tuple(V.shape)}.")
        if not torch.isfinite(V).all():
            raise ValidationError(f"direction {name!r} is not finite (a detector fires nowhere or everywhere).")
        resolved[str(name)] = V / V.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return resolved


class _Truth:
    """What the planted truth says of an edit: its latent factors (read exactly by pinv) and the head's
    centred logits relative to the unedited maps."""

    def __init__(self, data, head, X: torch.Tensor, batch_size: int):
        N, _, H, W_ = X.shape
        I = data.n_concepts
        self.X, self.head, self.batch_size, self.I = X, head, batch_size, I
        self.S = data.S.double()
        self.L = torch.linalg.pinv(torch.cat([data.S, data.Dist], 0).T.double())[:I]  # (I, D): reads α exactly
        self.alpha = data.alpha.double()  # (N, I, H, W)
        self.concept = data.concept.reshape(N, 1, H, W_)  # (N, 1, 1, P) -> per position
        self.others = [[j for j in range(I) if j != i] for i in range(I)]
        self.base = _centred(self.logits(X))

    def latent(self, dX: torch.Tensor) -> torch.Tensor:  # (N, D, H, W) -> (N, I, H, W)
        return torch.einsum("id,ndhw->nihw", self.L, dX.double())

    def logits(self, Y: torch.Tensor) -> torch.Tensor:
        N, b = Y.shape[0], self.batch_size
        return torch.cat([self.head(Y[s:s + b]).double() for s in range(0, N, b)])

    def logit_change(self, dX: torch.Tensor) -> torch.Tensor:
        return _centred(self.logits((self.X.double() + dX).float())) - self.base


def _score_concept(i: int, k: int, truth: _Truth, pairs, resolved: Dict[str, torch.Tensor],
                   out: Dict[str, Dict[str, List[float]]]) -> None:
    """Remove and insert true concept ``i`` (detector ``k``) along every candidate; append the scores to ``out``."""
    from ..edit.intervention import edit_maps
    X, S, alpha, concept = truth.X, truth.S, truth.alpha, truth.concept
    w = pairs.decoders.double()[k]
    m = pairs.detect(X)[:, k:k + 1].double()  # (N, 1, H, W)
    # ideal removal: same masks, true direction, true amount
    a_true = alpha[:, i:i + 1] - alpha[:, i].mean()
    d_star = -(m * a_true) * S[i][None, :, None, None]
    da_star = truth.latent(d_star)
    L_star = truth.logit_change(d_star)
    # insertion: where the concept is absent, the detector's own gap vs the true gap
    absent = (concept != i).double()
    z = torch.einsum("d,ndhw->nhw", w, X.double())[:, None]
    fired = m > 0.5
    if not fired.any() or fired.all():
        raise ValidationError(f"detector {k} (matched to concept {i}) fires at no position or at every one; "
                              f"its insertion strength is undefined.")
    gap = float(z[fired].mean() - z[~fired].mean())
    on = concept == i
    gap_true = float(alpha[:, i:i + 1][on].mean() - alpha[:, i:i + 1][~on].mean())
    i_star = absent * gap_true * S[i][None, :, None, None]
    di_star = truth.latent(i_star)
    I_star = truth.logit_change(i_star)
    others = truth.others[i]
    for name, V in resolved.items():
        v = V[i].double()
        Xr = edit_maps(X, pairs, [k], strength=None, direction=V[i:i + 1], nonneg=False).double()
        dr = truth.latent(Xr - X.double())
        Lr = _centred(truth.logits(Xr.float())) - truth.base
        dX_ins = absent * (gap / float(w @ v)) * v[None, :, None, None]
        di = truth.latent(dX_ins)
        Li = truth.logit_change(dX_ins)
        o = out[name]
        o["encoder_cosine"].append(float(v @ S[i]))
        ns = float((da_star[:, i] ** 2).sum())
        o["removed"].append(float((dr[:, i] * da_star[:, i]).sum()) / ns)
        o["leak_remove"].append(float((dr[:, others] ** 2).sum().sqrt()) / ns ** 0.5)
        o["logit_r2_remove"].append(_r2(Lr, L_star))
        ni = float((di_star[:, i] ** 2).sum())
        o["inserted"].append(float((di[:, i] * di_star[:, i]).sum()) / ni)
        o["leak_insert"].append(float((di[:, others] ** 2).sum().sqrt()) / ni ** 0.5)
        o["logit_r2_insert"].append(_r2(Li, I_star))
