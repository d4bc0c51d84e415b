"""The clustering initialisation: k-means on soft-whitened patches, max-margin detectors, Ward levels,
and the gain calibration that tempers the detectors before the refinement."""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..._device import limit_threads
from ..._errors import ValidationError
from .refinement import _activation_terms
from .statistics import _Stats

logger = logging.getLogger("unveil")


def _kmeans(Z: torch.Tensor, k: int, n_init: int, seed: int,
            start: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, float]:
    """k-means (scikit-learn Lloyd) on the rows of ``Z``: labels as a tensor and the inertia.

    Without ``start``: k-means++ seeding from ``seed``, the best of ``n_init`` runs by inertia.
    With ``start`` (labels of a first partition, every cluster non-empty): one run from its centroids.
    """
    from sklearn.cluster import KMeans

    from threadpoolctl import threadpool_limits

    Zn = Z.detach().cpu().numpy().astype(np.float32)
    if start is not None:
        onehot = nn.functional.one_hot(start.cpu(), k).double()
        centres = (onehot.T @ Z.detach().cpu().double()) / onehot.sum(0)[:, None]
        km = KMeans(n_clusters=k, init=centres.numpy().astype(np.float32), n_init=1, max_iter=100, random_state=seed)
    else:
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed, max_iter=100)
    # one thread: scikit-learn's k-means gives other clusters under other thread counts (measured),
    # and results must not depend on them (torchrun runs one thread per process)
    with threadpool_limits(limits=1, user_api="openmp"):
        labels = km.fit_predict(Zn)
    return torch.as_tensor(labels, dtype=torch.long, device=Z.device), float(km.inertia_)


def _skew_ica_labels(Z: torch.Tensor, k: int, gen: torch.Generator, max_iter: int = 200,
                     tol: float = 1e-12) -> Optional[torch.Tensor]:
    """A first partition from the ``k`` most skewed directions of ``Z`` (n, d): skewness FastICA.

    A concept that is present in few patches and absent (or weak) in the rest makes the patches'
    projection on its direction strongly skewed; noise, and a factor spread evenly over the
    patches, are not. On the whitened patches the fixed point ``w ← E[z (wᵀz)²]`` with symmetric
    decorrelation (FastICA with the contrast u³) finds such directions all at once. Each patch is
    labelled by the direction it lies furthest along (projections oriented to positive skew).

    Why: k-means++ seeds land in local optima when there are many clusters in many noisy
    dimensions (the ``scale`` setting, D = 512, 64 concepts, 200k patches: k-means++ 0.295 matched
    IoU against a supervised ceiling of 0.634; k-means started from this partition 0.592). The
    iteration runs until 1 − |cos| between successive directions is below ``tol`` = 1e-12 (about
    1.4e-6 rad), not 1e-6: where it stops should not hang on the input's last bits (D = 512, 64
    concepts, 100k patches, the whitening on all threads: with 1e-6, one and two threads labelled 2
    of 64000 patches differently; with 1e-12, none). Returns
    None when the data have fewer than ``k`` non-degenerate dimensions, or when a direction labels
    no patch (then k-means++ seeds instead).
    """
    Z = Z.double()
    Z = Z - Z.mean(0)
    ev, U = torch.linalg.eigh(Z.T @ Z / max(1, Z.shape[0] - 1))
    keep = ev > 1e-9 * ev.max().clamp_min(1e-300)
    if int(keep.sum()) < k:
        return None
    Zw = Z @ (U[:, keep] / ev[keep].sqrt()[None, :])  # exactly white
    W = torch.linalg.qr(torch.randn(Zw.shape[1], k, generator=gen, dtype=torch.float64).to(Z.device))[0].T
    for _ in range(max_iter):
        P = Zw @ W.T
        Wn = (P * P).T @ Zw / Zw.shape[0]
        s, V = torch.linalg.eigh(Wn @ Wn.T)  # symmetric decorrelation: (W Wᵀ)^(-1/2) W
        Wn = (V * s.clamp_min(1e-300).rsqrt()[None, :]) @ V.T @ Wn
        change = float(1 - (Wn * W).sum(1).abs().min())
        W = Wn
        if change < tol:
            break
    else:
        logger.info("EDDP init: ICA stopped at %d iterations (1 - |cos| %.1e, above %.0e)", max_iter, change, tol)
    P = Zw @ W.T
    sgn = torch.sign((P ** 3).mean(0))
    P = P * torch.where(sgn == 0, torch.ones_like(sgn), sgn)[None, :]
    labels = P.argmax(1)
    return labels if bool((torch.bincount(labels, minlength=k) > 0).all()) else None


def _iou_thresholds(scores: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per column ``j`` of ``scores`` (n, k), the threshold ``t_j`` whose positive set ``{scores_j > t_j}``
    has the largest IoU with ``{labels == j}`` (the midpoint between two consecutive scores), and that
    IoU: ``(t, iou)``, both (k,) float64.

    Computed for all columns at once from one sort: walking down the sorted scores, the IoU of the
    top ``m`` with the group is ``tp / (m + |group| − tp)``.
    """
    n, k = scores.shape
    s, order = scores.double().sort(dim=0, descending=True)
    hit = (labels[order] == torch.arange(k, device=labels.device)[None, :]).double()  # (n, k)
    tp = hit.cumsum(0)
    m = torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)[:, None]
    iou = tp / (m + hit.sum(0)[None, :] - tp)
    best = iou.argmax(0)
    below = s.gather(0, (best + 1).clamp_max(n - 1)[None, :])[0]
    top = s.gather(0, best[None, :])[0]
    return torch.where(best + 1 < n, (top + below) / 2, top - 1.0), iou.gather(0, best[None, :])[0]


def _fit_margin_classifiers(Z: torch.Tensor, labels: torch.Tensor, k: int, steps: int = 60,
                            l2: float = 1e-8, start=None, threshold: str = "iou", return_iou: bool = False):
    """One-vs-rest logistic regressions (all k at once) in the whitened space: weights (k, d), bias (k,).

    Classes are balanced by weighting, so a small concept is separated as carefully as a large one.
    Solved in float64: on nearly separable clusters the weakly regularised optimum is flat, and
    float32 rounding (which depends on the thread count) would move it.

    ``threshold="iou"`` (default) then moves each bias along its fixed direction to where the
    detector's positive set best matches its group (largest IoU, :func:`_iou_thresholds`); the
    balanced weighting puts the boundary where a positive and a negative weigh alike, so a group
    holding 1/I of the patches gets about as many false positives as true ones (scale setting,
    D = 512, I = 32, from the same directions: matched IoU 0.67 with the balanced bias, 0.91 with
    this one). ``"balanced"`` keeps the logistic regression's own bias.

    Returns ``(W, b)``, or with ``return_iou=True`` (and the IoU threshold) ``(W, b, iou)``: each
    detector's IoU with its group at that threshold.
    """
    out_dtype = Z.dtype
    Z = Z.double()
    if start is not None:
        start = (start[0].double(), start[1].double())
    Y = nn.functional.one_hot(labels, k).to(Z.dtype)  # (n, k)
    pos = Y.sum(0).clamp_min(1)
    neg = (Y.shape[0] - Y.sum(0)).clamp_min(1)
    weight = Y / pos + (1 - Y) / neg  # each side of each problem sums to 1
    if start is not None:  # warm start (re-clustering rounds)
        W, b = start[0].clone(), start[1].clone()
    else:  # start from the difference of means (a good direction)
        with torch.no_grad():
            mu_pos = (Y.T @ Z) / pos[:, None]
            mu_neg = ((1 - Y).T @ Z) / neg[:, None]
            W = mu_pos - mu_neg
            b = ((mu_pos + mu_neg) / 2 * W).sum(1)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, max_eval=int(steps * 1.5), history_size=20,
                            line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    sign = 2 * Y - 1

    def closure():
        opt.zero_grad()
        margin = sign * (Z @ W.T - b)
        loss = (nn.functional.softplus(-margin) * weight).sum() / k + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    W, b = W.detach(), b.detach()
    iou = None
    if threshold == "iou":
        b, iou = _iou_thresholds(Z @ W.T, labels)
    elif threshold != "balanced":
        raise ValidationError(f"threshold must be 'iou' or 'balanced', got {threshold!r}.")
    if return_iou:
        if iou is None:
            raise ValidationError("return_iou needs threshold='iou'.")
        return W.to(out_dtype), b.to(out_dtype), iou
    return W.to(out_dtype), b.to(out_dtype)


def _ward_partitions(centroids: torch.Tensor, counts: torch.Tensor, sizes) -> Dict[int, list]:
    """Agglomerate weighted points by Ward's criterion; the group of every point at each size.

    ``centroids`` (n, D), ``counts`` (n,) weights; returns ``{size: [group of point 0, …]}`` with
    groups numbered 0..size-1 in order of their first point.
    """
    C = centroids.double().clone()
    w = counts.double().clamp_min(1e-12).clone()
    members = [[i] for i in range(C.shape[0])]
    alive = list(range(C.shape[0]))
    out: Dict[int, list] = {}
    want = sorted(set(int(v) for v in sizes), reverse=True)

    def record(size):
        g = [0] * C.shape[0]
        order = sorted(alive, key=lambda a: min(members[a]))
        for k, a in enumerate(order):
            for i in members[a]:
                g[i] = k
        out[size] = g
    while want and len(alive) >= want[-1]:
        if len(alive) == want[0]:
            record(want.pop(0))
            continue
        A = torch.as_tensor(alive)
        d = torch.cdist(C[A], C[A]) ** 2
        ww = w[A]
        cost = d * (ww[:, None] * ww[None, :]) / (ww[:, None] + ww[None, :])
        cost.fill_diagonal_(math.inf)
        flat = int(cost.argmin())
        a, b = alive[flat // len(alive)], alive[flat % len(alive)]
        C[a] = (C[a] * w[a] + C[b] * w[b]) / (w[a] + w[b])
        w[a] = w[a] + w[b]
        members[a] += members[b]
        alive.remove(b)
    return out


# ---------------------------------------------------------------------------------- loss kernels
def _calibrate_gains(Wt: torch.Tensor, bt: torch.Tensor, x: torch.Tensor, how, w, tau, rho, gamma,
                     steps: int = 300, sb_claimed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rescale each detector (gain g_i and threshold b_i together: the hyperplane does not move).

    The margin detectors of the initialisation separate the clusters with a nearly hard boundary
    (gains of order 10²), so every sigmoid saturates and the y-based losses see almost no gradient.
    The gain is a free scale of such a detector; ``how`` chooses it:

    - a number c: the detector's pre-activation ``g w̄ᵀx − b`` gets standard deviation c over ``x``;
    - ``"auto"``: the gains that minimise the phase's detector losses (weights ``w``; L_mm against
      L_ma, L_s, …) with the hyperplanes held fixed (Adam on log g, ``steps`` steps); ``sb_claimed``:
      the L_sb the refinement uses (see :func:`unveil.directions.losses.sparsity_bound_loss`).
    """
    g0 = Wt.norm(dim=1).clamp_min(1e-12)
    wbar, t = Wt / g0[:, None], bt / g0
    dist = x.double() @ wbar.double().T - t.double()  # (n, I) signed distance to each hyperplane
    if how == "auto":
        P = dist.float()
        log_g = (1.0 / dist.std(0).clamp_min(1e-12)).log().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([log_g], lr=0.05)
        for _ in range(steps):
            g = log_g.exp()
            terms = _activation_terms(torch.sigmoid(P * g[None, :]), g, w, tau, rho, gamma, sb_claimed)
            total = sum(w.get(k, 0.0) * v for k, v in terms.items())
            opt.zero_grad()
            total.backward()
            opt.step()
        g = log_g.detach().exp().double().to(Wt.device)
    else:
        g = float(how) / dist.std(0).clamp_min(1e-12)
    return wbar * g[:, None], t * g



def noise_bulk(ev: torch.Tensor, width: float = 1.5, share: float = 0.4):
    """The level of a flat noise bulk in a covariance spectrum ``ev``, or None when there is none.

    Isotropic noise in many components shows up as a block of nearly equal eigenvalues around the
    median (the Marchenko–Pastur bulk); a layer's own spectrum decays over orders of magnitude and
    has none. A bulk is declared when at least ``share`` of the eigenvalues lie within a factor
    ``width`` of the median; its level is the median.
    """
    ev = ev.clamp_min(0)
    med = ev.median()
    if ev.numel() < 8 or float(med) <= 0:
        return None
    inside = ((ev <= width * med) & (ev >= med / width)).double().mean()
    return med if float(inside) >= share else None


def _candidate_partitions(Zk: torch.Tensor, I: int, n_init: int, gen: torch.Generator,
                          seeding: str) -> Dict[str, torch.Tensor]:
    """The first partitions of the rows of ``Zk`` a seeding rule proposes (see :func:`cluster_init`):
    ``{"kmeans++": labels}`` and/or ``{"ica": labels}``."""
    if seeding not in ("best", "ica", "kmeans++"):
        raise ValidationError(f"seeding must be 'best', 'ica' or 'kmeans++', got {seeding!r}.")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    out: Dict[str, torch.Tensor] = {}
    if seeding != "kmeans++":
        # ICA's cost grows with the dimension: at most max(8I, 256) components, the largest of the layer
        # (a skewed concept need not carry much variance: a smaller cap missed concepts in measured data)
        # the fixed point amplifies rounding, which depends on the thread count: it runs on one thread, on the
        # patches rounded to float32 (as k-means sees them), so the last bits of the whitening do not reach it
        with limit_threads(1, blas=False):
            ica = _skew_ica_labels(Zk[:, -min(Zk.shape[1], max(8 * I, 256)):].float().cpu(), I,
                                   torch.Generator().manual_seed(seed + 1))  # on the CPU: the same start as there
        if ica is None:
            logger.info("EDDP init: ICA cannot seed %d clusters here (too few dimensions, or a direction that "
                        "labels no patch); k-means++ seeds", I)
        else:
            # the ICA components come in an arbitrary order (it moves with the rounding of the input): groups
            # are numbered by their first sample, so the same partition gives the same labels whatever the
            # thread count. No Lloyd run after it: k-means moves the patches of a rare concept into its
            # neighbours' clusters (scale setting, D = 512, I = 64, seed 0, with class-balanced thresholds:
            # matched IoU 0.72 without, 0.63 with)
            out["ica"] = _first_seen_order(ica.to(Zk.device), I)
    if seeding != "ica" or not out:
        out["kmeans++"] = _kmeans(Zk, I, n_init, seed)[0]
    return out


def _first_seen_order(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber clusters 0..k-1 in the order of their first member."""
    first = torch.full((k,), labels.numel(), dtype=torch.long, device=labels.device)
    first.scatter_reduce_(0, labels, torch.arange(labels.numel(), device=labels.device), reduce="amin")
    rank = torch.empty(k, dtype=torch.long, device=labels.device)
    rank[torch.argsort(first)] = torch.arange(k, device=labels.device)
    return rank[labels]


def cluster_init(stats: _Stats, I: int, *, whiten_eps: float, n_init: int, init_rounds: int, gen,
                 labeler=None, noise_floor: Optional[float] = 30.0,
                 seeding: str = "best") -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """k-means on soft-whitened patches, then one-vs-rest max-margin detectors.

    ``seeding``: ``"kmeans++"``: the best of ``n_init`` k-means++ runs; ``"ica"``: the partition of
    :func:`_skew_ica_labels`; ``"best"``: both, and the one whose groups the fitted detectors
    reproduce best (mean IoU of each detector's positives with its group) wins. ICA falls back to
    k-means++ when the space has fewer than ``I`` dimensions.

    ``noise_floor``: when the spectrum has a flat noise bulk (:func:`noise_bulk`), the whitening
    floor is raised to this multiple of the bulk's level (None: never).

    ``labeler``, optional: a function patches -> group labels that replaces k-means (the coarse
    levels of a hierarchy start from the finest level's Ward groups). Returns decoders with
    magnitude and thresholds in the scaled space ``(x − μ)/σ``, and the space they were fitted in:
    ``{"proj": (D, k), "Wz": (I, k), "bz": (I,), "sample": (n, k), "labels": (n,)}`` with ``z = (x − μ) @ proj``
    (for :func:`~unveil.directions.eddp.discriminant.discriminant_passes`).
    """
    mu, cov = stats.mean, stats.cov
    sigma = math.sqrt(max(float(torch.trace(cov)) / cov.shape[0], 1e-30))
    # the whitening and the whitened sample feed ICA's fixed point, which amplifies rounding: both are computed
    # on one thread, so their last bits do not depend on the thread count (D = 512, 64 concepts: on two threads
    # the whitening differed by 2e-13, enough to round some float32 inputs of ICA the other way)
    # (one thread costs little here: 0.5 s for the 64000 × 512 sample of 64 concepts)
    with limit_threads(1):
        ev, U = torch.linalg.eigh(cov)
        ev = ev.clamp_min(0)
        floor = whiten_eps * ev.mean().clamp_min(1e-30)
        n_keep = ev.numel()
        bulk = noise_bulk(ev)
        if bulk is not None and noise_floor is not None:
            # a flat noise bulk: shrink it (whitened variance ≈ 1/noise_floor per component) instead of
            # blowing it up to unit variance, where its many components would swamp every distance;
            # k-means sees only the components above the bulk (its cost then scales with the signal's rank)
            floor = torch.maximum(floor, noise_floor * bulk)
            n_keep = max(int((ev > 2 * bulk).sum()), min(I, ev.numel()))
            logger.info("EDDP init: a noise bulk at eigenvalue %.3g (%d of %d components above it)",
                        float(bulk), n_keep, ev.numel())
        white = U / torch.sqrt(ev + floor)[None, :]  # (D, D): z = (x−μ) @ white
        Z = (stats.sample - mu) @ white
    if labeler is not None:
        labels = labeler(stats.sample).to(Z.device).long()
        if (torch.bincount(labels, minlength=I) < 2).any():
            logger.warning("a merged group holds fewer than 2 sampled patches; this level starts from k-means")
            labeler = None
    # the detectors live where the clustering looked: with a noise bulk, its components carry no concept and a
    # weakly regularised classifier fitted on them learns the sample's noise (scale setting, D = 512, I = 32:
    # matched IoU 0.83 with all 512 components, 0.91 with the 48 above the bulk, same labels)
    Zf = Z[:, -n_keep:].float()  # eigh sorts ascending
    candidates = {"given": labels} if labeler is not None else _candidate_partitions(Z[:, -n_keep:], I, n_init,
                                                                                   gen, seeding)
    fits, empty = {}, 0
    for name, lab in candidates.items():
        counts = torch.bincount(lab, minlength=I)
        if (counts == 0).any():  # a partition with an empty group cannot seed I detectors
            empty = int((counts == 0).sum())
            continue
        W_, b_, iou = _fit_margin_classifiers(Zf, lab, I, return_iou=True)
        fits[name] = (lab, W_, b_, float(iou.mean()))
    if not fits:
        raise ValidationError(f"the activations hold fewer than {I} distinct patterns (k-means left {empty} "
                              f"clusters empty); ask for fewer concepts.")
    # the partition the detectors reproduce best wins: a concept is a half-space of the patches, a group
    # of a poor partition (a rare concept split among neighbours, a cluster cut along a distractor) is not.
    # k-means' inertia does not see it: a Lloyd run, which lowers it, moves a rare concept's patches into
    # its neighbours' clusters
    if len(fits) > 1:
        logger.info("EDDP init: detector-group IoU %s (the higher wins)",
                    ", ".join(f"{k} {v[3]:.4f}" for k, v in fits.items()))
    name = max(fits, key=lambda k: (fits[k][3] - (1e-6 if k == "ica" else 0.0), k != "ica"))
    labels, Wz, bz, _ = fits[name]
    replaced = []
    if labeler is None:  # given groups (a coarse level) are kept as they are
        Wz, bz, labels, replaced = replace_redundant(Zf, labels, Wz, bz, I, gen)
    Wz, bz, labels = recluster_rounds(Zf, labels, Wz, bz, I, init_rounds - 1)
    space = {"proj": white[:, -n_keep:], "Wz": Wz, "bz": bz, "sample": Zf, "labels": labels, "replaced": replaced}
    return to_scaled(Wz, bz, space["proj"], sigma) + (space,)


def _exclusive_share(pos: torch.Tensor) -> torch.Tensor:
    """Per detector (column of the boolean ``pos``, (n, I)): the share of its positives that no other
    detector claims."""
    only = pos & (pos.sum(1) == 1)[:, None]
    return only.sum(0).double() / pos.sum(0).clamp_min(1).double()


def _set_iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Column-wise IoU of two boolean (n, k) tensors."""
    inter = (pred & truth).sum(0).double()
    return inter / ((pred | truth).sum(0).double()).clamp_min(1)


def replace_redundant(Zf: torch.Tensor, labels: torch.Tensor, Wz: torch.Tensor, bz: torch.Tensor, I: int,
                      gen: torch.Generator, min_share: float = 0.5, max_rounds: Optional[int] = None):
    """Give a redundant detector to a concept no detector found (a split-and-merge step on the sample).

    A partition can miss a rare concept: its patches are then claimed by no detector, while some
    other detector fires on a mix of patches that other detectors claim too (scale setting, D = 512,
    64 concepts, 500k patches, seed 0: one concept holding 0.4% of the patches, matched IoU 0.03;
    the detector matched to it shares 86% of its positives). A detector is **redundant** when less
    than ``min_share`` of its positives are its own (no other detector fires there). For the most
    redundant one (of those, the one whose positives match its own group worst), the patches no
    detector claims are clustered (k-means with 1, 2, 4, … up to ``I // 2`` clusters: one missed concept
    alone, or hidden among the borders of every other) and a detector is fitted for every cluster
    against all other patches, on one half of the sample; on
    the other half, each candidate scores its IoU with its cluster times the share of its positives
    that no detector claims yet. The redundant detector, scored alike (IoU with its group times its
    own share), is replaced by the best candidate when that scores higher, and the detectors are
    refitted on the new groups. Repeated while a replacement is made (at most ``max_rounds``, default
    ``I``). Nothing is drawn from ``gen`` unless a detector is redundant, so fits without one are
    unchanged. Returns ``(Wz, bz, labels, replaced)``, ``replaced`` a list of dicts.
    """
    n = Zf.shape[0]
    ks = [1] + [2 ** m for m in range(1, max(1, I // 2).bit_length())]  # 1, 2, 4, … up to I // 2
    fit_half = torch.arange(n, device=Zf.device) % 2 == 0
    held = ~fit_half
    replaced = []
    for _ in range(I if max_rounds is None else max_rounds):
        scores = Zf @ Wz.T - bz
        pos = scores > 0
        share = _exclusive_share(pos)
        redundant = share < min_share
        if not bool(redundant.any()):
            break
        # of the redundant detectors, the one that reproduces its own group worst
        own_iou = _set_iou(pos, labels[:, None] == torch.arange(I, device=Zf.device)[None, :])
        j = int(torch.where(redundant, own_iou, torch.full_like(own_iou, float("inf"))).argmin())
        unclaimed = ~pos.any(1)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        best = None  # (score, candidate detector, its members)
        for k in ks:
            if int(unclaimed.sum()) < 4 * k:
                break
            clusters = (torch.zeros(int(unclaimed.sum()), dtype=torch.long, device=Zf.device) if k == 1
                        else _kmeans(Zf[unclaimed], k, 4, seed + k)[0])
            cand = torch.full((n,), k, dtype=torch.long, device=Zf.device)  # k: every claimed patch
            cand[unclaimed] = clusters
            if bool((torch.bincount(cand[fit_half], minlength=k + 1) < 2).any()):
                continue
            Wc, bc = _fit_margin_classifiers(Zf[fit_half], cand[fit_half], k + 1)
            pc = (Zf[held] @ Wc[:k].T - bc[:k]) > 0
            member = cand[held][:, None] == torch.arange(k, device=Zf.device)[None, :]
            fresh = (pc & unclaimed[held][:, None]).sum(0).double() / pc.sum(0).clamp_min(1).double()
            cand_score = _set_iou(pc, member) * fresh
            c = int(cand_score.argmax())
            if best is None or float(cand_score[c]) > best[0]:
                members = torch.zeros(n, dtype=torch.bool, device=Zf.device)
                members[unclaimed] = clusters == c
                best = (float(cand_score[c]), Wc[c], bc[c], members)
        own = float(own_iou[j] * share[j])
        if best is None or best[0] <= own:
            break
        members = best[3]
        new = labels.clone()
        depth = scores / Wz.norm(dim=1).clamp_min(1e-12)
        depth[:, j] = -float("inf")
        moved = labels == j
        new[moved] = depth[moved].argmax(1)  # the redundant detector's patches go to their deepest other detector
        new[members] = j
        if bool((torch.bincount(new, minlength=I) < 2).any()):
            break
        W0, b0 = Wz.clone(), bz.clone()
        W0[j], b0[j] = best[1].to(W0.dtype), best[2].to(b0.dtype)
        Wz, bz = _fit_margin_classifiers(Zf, new, I, start=(W0, b0))
        labels = new
        replaced.append({"detector": j, "own_share": float(share[j]), "score_before": own,
                         "score_new": best[0], "patches": int(members.sum())})
        logger.info("EDDP init: detector %d shared %.0f%% of its positives; given to a cluster of %d patches no "
                    "detector claimed (score %.3f against %.3f)", j, 100 * (1 - float(share[j])),
                    int(members.sum()), best[0], own)
    return Wz, bz, labels, replaced


def recluster_rounds(Zf: torch.Tensor, labels: torch.Tensor, Wz: torch.Tensor, bz: torch.Tensor, I: int,
                     rounds: int):
    """Up to ``rounds`` rounds of discriminative re-clustering of the sample ``Zf``: each patch goes to the
    detector it is deepest inside (signed distance to the hyperplane), then the detectors are refitted.
    Stops when the groups no longer change or one would hold fewer than 2 patches. Returns ``(Wz, bz, labels)``."""
    for _ in range(rounds):
        new = ((Zf @ Wz.T - bz) / Wz.norm(dim=1).clamp_min(1e-12)).argmax(1)
        if torch.equal(new, labels) or (torch.bincount(new, minlength=I) < 2).any():
            break
        labels = new
        Wz, bz = _fit_margin_classifiers(Zf, labels, I, steps=30, start=(Wz, bz))
    return Wz, bz, labels


def to_scaled(Wz: torch.Tensor, bz: torch.Tensor, proj: torch.Tensor, sigma: float):
    """z-space detectors ``Wz·((x−μ) @ proj) − bz`` in the scaled space ``x̃ = (x−μ)/σ``: ``(Wt, bt)``."""
    return (proj @ Wz.double().T).T * sigma, bz.double()
