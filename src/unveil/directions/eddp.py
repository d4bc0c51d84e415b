"""`EDDP`: learn encoding–decoding direction pairs from a layer's activations (method.md §2–§5).

How a fit runs (the defaults, and why)
--------------------------------------
The paper optimises its losses for 800 + 2000 + 2000 epochs from a random start. We reach the same
quality in seconds by starting close to the answer and keeping the paper's losses for the refinement:

1. **Statistics** (one streamed pass): the data mean μ, covariance Σ, and a random sample of patches.
2. **Clustering initialisation**: k-means with ``n_concepts`` clusters on *soft-whitened* patches
   ``Λ^{-1/2}`` with ``Λ = eig(Σ) + ε·mean(eig)``. Whitening stops the high-variance distractors from
   dominating the clusters (isotropic scaling fails there); the ε floor stops noise-free or pure-noise
   components from being blown up (per-component standardisation fails there; method.md §6).
3. **Max-margin detectors**: each cluster is separated from the rest by a linear classifier (logistic
   loss, weak L2) in the whitened space. Separating clusters by their *sharpest boundary* — not by
   their means (LDA), which would leak the other concepts into every filter — is what makes the
   filters read one concept and be blind to the others and to the distractors.
4. **Signal vectors** by the positive-only pattern estimator (method.md §3).
5. **EDDP refinement** with the paper's losses: step (b) (L_s, L_sb, L_ma, L_mm, L_ic, L_eac, L_uur)
   then step (d) (adds free signal vectors, L_cur and L_fso), with the paper's weights, Adam and
   ReduceLROnPlateau, for a few hundred steps with early stopping. Step (a) (the UIBE/CBE form: an
   orthogonal filter basis on *soft-standardised* features ``(x − μ)/sqrt(var_k + ε·mean var)``,
   random unit filters to start) runs only with ``init="random"``, where it replaces the clustering
   start. The ε floor matters: on the paper's recipe, step (a) reached matched IoU 0.82–0.87 with it,
   0.12–0.77 with plain per-component standardisation and 0.23–0.30 on isotropically scaled
   features (seed 0, 600 steps, no head).
   The max-margin detectors have nearly hard boundaries (gains of order 10² per σ), so the y-based
   losses see little gradient and the refinement moves them little; ``init_gain`` tempers them.
   On the synthetic recipes the paper's losses, once they do see gradient, move the detectors
   *away* from the planted truth (their minimum at the gains they prefer is not the truth); the
   numbers are in ``benchmarks/results/eddp_ablation.md``.
6. The final signal vectors are re-estimated with the positive-only estimator for the final filters,
   and normalised to unit length (so that signal values come out in the units of the latent factors).

Concepts at several granularities (``levels``)
----------------------------------------------
Within one fit the detectors compete for the patches (L_s, L_ma): with many detectors a large
concept (sky, road, a glyph seen at several offsets) is cut into fragments, each precise but
covering a small part of the concept. Real layers hold concepts at several scales at once (a region
and its parts), so ``levels=[4, 8, 16, 36]`` (or ``"auto"``) builds a hierarchy:

1. the finest level (the last size) is fitted as above;
2. its concepts are merged bottom-up by Ward's criterion on their centroids (mean activation of
   the patches each concept holds most strongly, in the layer's own space — centroids average the
   distractors out, and whitening, which makes equally frequent clusters equidistant, would erase
   which concepts are close);
3. each coarser level starts from that tree cut at its size: every patch is labelled with the
   group of its finest concept and the max-margin detectors are fitted to these groups; then the
   level is refined with the paper's losses like any fit (competition only within the level).

The pairs are concatenated, coarsest first (``pairs_.meta["levels"]``, ``["level_of_concept"]``,
``["parent_groups"]``). Detectors of different levels overlap, as a region and its parts do.

Steps (b) and (d) compute their losses in an isotropically rescaled space ``(x − μ)/σ`` (a
similarity transform, so directions are unchanged), step (a) in the soft-standardised one; the
saved pairs act on the original activations.

Without a head, the URA terms are dropped and the fit relies on the detector losses alone: the
directions are then found from the activations' own structure, not from what the network above the
layer reads out of them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .._errors import HeadError, NotFittedError, ValidationError
from .._progress import progress
from .._validation import check_in_range, check_maps, check_positive_int, make_generator
from . import losses as L
from .pairs import DirectionPairs

logger = logging.getLogger("unveil")

# the paper's loss weights (method.md §5), per step
PAPER_WEIGHTS: Dict[str, Dict[str, float]] = {
    "a": {"s": 2.6, "ma": 2.8, "mm": 0.6, "ic": 5.0, "uur": 0.25},
    "b": {"s": 0.85, "sb": 2.6, "ma": 2.8, "mm": 0.6, "ic": 15.0, "uur": 0.25, "eac": 15.0},
    "d": {"s": 0.85, "sb": 2.6, "ma": 2.8, "mm": 0.6, "ic": 15.0, "cur": 0.25, "eac": 15.0, "fso": 1.0},
}
# the constrained form (method.md §5): minimise L_s (+L_sb) + L_ura subject to these upper bounds
PAPER_CONSTRAINTS: Dict[str, float] = {"ma": 0.8, "mm": 8.0, "ic": 0.1, "eac": 0.1, "fso": 0.1}


# ---------------------------------------------------------------------------------- data sources
class _TensorSource:
    """Feature maps held in memory, served in mini-batches like an ActivationStore."""

    def __init__(self, X: torch.Tensor):
        self.X = X

    def __len__(self) -> int:
        return self.X.shape[0]

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    @property
    def map_shape(self) -> Tuple[int, int]:
        return tuple(self.X.shape[2:])

    def iter_maps(self, batch_size: int, shuffle: bool = False, generator=None) -> Iterator[torch.Tensor]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            yield self.X[order[i:i + batch_size].to(self.X.device)]


def _as_source(X):
    if hasattr(X, "iter_maps") and hasattr(X, "n_features"):
        if len(X) == 0:
            raise ValidationError("the activation store is empty; extract activations from at least one image.")
        return X, None
    t = check_maps(X, "X")
    if t.dim() == 2:
        t = t[:, :, None, None]
    return _TensorSource(t), t.device


@dataclass
class _Stats:
    mean: torch.Tensor  # (D,) float64
    cov: torch.Tensor  # (D, D) float64
    sample: torch.Tensor  # (n, D) float64, a uniform random sample of patches
    n_patches: int


def _patches(maps: torch.Tensor) -> torch.Tensor:
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _stream_stats(source, batch_maps: int, max_sample: int, gen: torch.Generator, device) -> _Stats:
    """One pass: mean and covariance (float64, shifted by the first batch for stability) and a
    reservoir-style uniform sample of at most ``max_sample`` patches."""
    D = source.n_features
    n, s1, s2, shift = 0, None, None, None
    keys, sample = None, None
    for maps in source.iter_maps(batch_maps, shuffle=False):
        if not torch.isfinite(maps).all():
            raise ValidationError("the activations contain NaN or infinite values; expected finite "
                                  "activations. Check the model's numerics or drop those images.")
        x = _patches(maps.to(device)).double()
        if shift is None:
            shift = x.mean(0)
            s1 = torch.zeros(D, dtype=torch.float64, device=device)
            s2 = torch.zeros(D, D, dtype=torch.float64, device=device)
        xc = x - shift
        s1 += xc.sum(0)
        s2 += xc.T @ xc
        n += x.shape[0]
        # bottom-k of i.i.d. uniform keys == a uniform sample without replacement
        k = torch.rand(x.shape[0], generator=gen).to(device)
        keys = k if keys is None else torch.cat([keys, k])
        sample = x if sample is None else torch.cat([sample, x])
        if keys.numel() > max_sample:
            top = torch.topk(keys, max_sample, largest=False).indices
            keys, sample = keys[top], sample[top]
    m = s1 / n
    cov = s2 / n - torch.outer(m, m)
    return _Stats(mean=m + shift, cov=(cov + cov.T) / 2, sample=sample, n_patches=n)


def _kmeans(Z: torch.Tensor, k: int, n_init: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ / Lloyd (scikit-learn), the best of ``n_init`` runs by inertia; labels as a tensor.

    The seed is drawn from ``gen`` so the result is reproducible from ``random_state``."""
    from sklearn.cluster import KMeans

    from threadpoolctl import threadpool_limits

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed, max_iter=100)
    # one thread: scikit-learn's k-means gives other clusters under other thread counts (measured),
    # and results must not depend on them (torchrun runs one thread per process)
    with threadpool_limits(limits=1, user_api="openmp"):
        labels = km.fit_predict(Z.detach().cpu().numpy().astype(np.float32))
    return torch.as_tensor(labels, dtype=torch.long, device=Z.device)


def _fit_margin_classifiers(Z: torch.Tensor, labels: torch.Tensor, k: int, steps: int = 60,
                            l2: float = 1e-8, start=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic regressions (all k at once) in the whitened space: weights (k, d), bias (k,).

    Classes are balanced by weighting, so a small concept is separated as carefully as a large one.
    Solved in float64: on nearly separable clusters the weakly regularised optimum is flat, and
    float32 rounding (which depends on the thread count) would move it.
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
    return W.detach().to(out_dtype), b.detach().to(out_dtype)


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
def _filters(params, orthogonal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit filter directions w̄ (I, D) and gains g (I,) from the parameters ``v`` and ``log_g``.

    ``orthogonal``: the UIBE/CBE form of step (a), an orthonormal filter basis (QR of ``v``)."""
    v = params["v"]
    if orthogonal:
        q, r = torch.linalg.qr(v.T)
        wbar = (q * torch.sign(torch.diagonal(r))[None, :]).T
    else:
        wbar = v / v.norm(dim=1, keepdim=True)
    return wbar, params["log_g"].exp()


def _detector_terms(x, wbar, g, b, S, w, tau, rho, gamma) -> Dict[str, torch.Tensor]:
    """The detector losses of one mini-batch of patches ``x`` (P, D): L_s, L_ma, L_mm, L_ic, and
    L_sb / L_eac / L_fso when the phase's weights ``w`` name them (L_fso needs signal vectors ``S``)."""
    terms = _activation_terms(torch.sigmoid(x @ (wbar * g[:, None]).T - b), g, w, tau, rho, gamma)
    if "fso" in w and S is not None:
        terms["fso"] = L.fso_loss(wbar, S)
    return terms


def _activation_terms(y, g, w, tau, rho, gamma) -> Dict[str, torch.Tensor]:
    """The losses of detector activations ``y`` (P, I) and gains ``g``: L_s, L_ma, L_mm, L_ic, and
    L_sb / L_eac when the weights ``w`` name them."""
    terms = {"s": L.sparsity_loss(y), "ma": L.max_activation_loss(y), "mm": L.max_margin_loss(g),
             "ic": L.inactive_loss(y, tau, gamma)}
    if "sb" in w:
        terms["sb"] = L.sparsity_bound_loss(y)
    if "eac" in w:
        terms["eac"] = L.excessive_loss(y, rho, gamma)
    return terms


def _calibrate_gains(Wt: torch.Tensor, bt: torch.Tensor, x: torch.Tensor, how, w, tau, rho, gamma,
                     steps: int = 300) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rescale each detector (gain g_i and threshold b_i together: the hyperplane does not move).

    The margin detectors of the initialisation separate the clusters with a nearly hard boundary
    (gains of order 10²), so every sigmoid saturates and the y-based losses see almost no gradient.
    The gain is a free scale of such a detector; ``how`` chooses it:

    - a number c: the detector's pre-activation ``g w̄ᵀx − b`` gets standard deviation c over ``x``;
    - ``"auto"``: the gains that minimise the phase's detector losses (weights ``w``; L_mm against
      L_ma, L_s, …) with the hyperplanes held fixed (Adam on log g, ``steps`` steps).
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
            terms = _activation_terms(torch.sigmoid(P * g[None, :]), g, w, tau, rho, gamma)
            total = sum(w.get(k, 0.0) * v for k, v in terms.items())
            opt.zero_grad()
            total.backward()
            opt.step()
        g = log_g.detach().exp().double().to(Wt.device)
    else:
        g = float(how) / dist.std(0).clamp_min(1e-12)
    return wbar * g[:, None], t * g


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _head_on_device(head, device: torch.device):
    """The head on ``device``: the user's module itself when its tensors are there already, else a
    deep copy moved there (the user's module is never moved or modified)."""
    if not isinstance(head, nn.Module):
        return head
    tensors = list(head.parameters()) + list(head.buffers())
    if not tensors or all(_same_device(t.device, device) for t in tensors):
        return head
    import copy

    logger.info("the head lives on %s and the fit on %s: using a copy of the head on %s",
                tensors[0].device, device, device)
    return copy.deepcopy(head).to(device)


def _soft_standard_scale(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-component factors r (D,) that turn the isotropically scaled patches x̃ = (x−μ)/σ into
    soft-standardised ones x̃ ⊙ r = (x−μ)/sqrt(var_k + ε·mean var): each component to unit variance,
    with a floor so that (nearly) noise-free components are not blown up (method.md §6)."""
    var = torch.diagonal(cov).clamp_min(0)
    sigma = torch.sqrt(var.mean().clamp_min(1e-30))
    return sigma / torch.sqrt(var + eps * var.mean().clamp_min(1e-30))


# ---------------------------------------------------------------------------------- the estimator
class EDDP:
    """Learn concept detectors (decoding directions) and signal vectors (encoding directions).

    Parameters
    ----------
    n_concepts : int
        Number of concepts (direction pairs) I to learn.
    init : {"cluster", "random"}
        ``"cluster"`` (default): k-means on soft-whitened patches + max-margin detectors (see the
        module docstring). ``"random"``: random unit filters, then step (a) of the paper's schedule.
    steps : dict, optional
        Optimisation steps per schedule step, keys ``"a"``, ``"b"``, ``"d"``. Default
        ``{"a": 0, "b": 100, "d": 150}`` (``"a": 600`` with ``init="random"``). One step is one
        mini-batch.
    weights : dict, optional
        Loss weights per step (``{"b": {"s": 0.85, ...}}``), merged over :data:`PAPER_WEIGHTS`.
    mode : {"weighted", "constrained"}
        ``"weighted"``: a weighted sum of the losses (the paper's). ``"constrained"``: minimise
        L_s (+ L_sb) + L_ura subject to L_ma < 0.8, L_mm < 8, L_ic < 0.1, L_eac < 0.1, L_fso < 0.1
        with an augmented Lagrangian (more stable on small problems). Early stopping watches the
        objective plus the total constraint violation; whether every constraint holds at the end
        is recorded (``constraints_hold_``, ``history_["constraints"]``, ``pairs_.meta``). From the
        margin detectors' gains (``init_gain=None``) L_mm < 8 is out of reach of a few hundred Adam
        steps; pass ``init_gain="auto"`` to start inside the bound.
    lr : dict, optional
        Adam learning rates per step; default the paper's ``{"a": 1e-3, "b": 1e-4, "d": 5e-4}``
        scaled by ``lr_scale``.
    lr_scale : float
        Multiplies every default learning rate (default 1.0: the paper's rates).
    gamma : float
        Sharpening exponent γ in L_ic and L_eac (default 1.1, the paper's synthetic run).
    tau : dict
        τ per step (ν = τ/I); default ``{"a": 0.9, "b": 0.9, "d": 0.2}``.
    rho : dict
        ρ per step as a multiple of τ/I: default ``{"b": 12, "d": 70}`` (the paper's); ρ is capped
        at 0.95.
    kappa : tuple
        Range of the URA step κ ~ U[κ₀, κ₁].
    whiten_eps : float
        The ε floor of the soft whitening, relative to the mean eigenvalue.
    n_init : int
        k-means restarts.
    init_rounds : int
        Rounds of discriminative re-clustering after k-means: every patch is reassigned to the
        detector it lies deepest inside, and the detectors are refitted (1 = k-means labels only).
    batch_patches : int
        Patches per mini-batch (whole maps are drawn until at least this many patches).
    max_init_patches : int
        Size of the random patch sample used for the initialisation.
    patience : int
        Early stopping: a schedule step ends when its smoothed criterion (the weighted total, or in
        the constrained mode the objective plus the total constraint violation) has not improved for
        ``patience`` steps; the best parameters are restored.
    init_gain : None, float or "auto"
        The gain (1/margin) the refinement starts from; the hyperplanes of the initialisation are
        kept, only the scale of each detector changes. ``None`` (default): the gains of the
        max-margin detectors as fitted (nearly hard boundaries, so the y-based losses see little
        gradient). A number c: each detector's pre-activation gets standard deviation c over the
        patches. ``"auto"``: the gains that minimise the first step's detector losses. See
        ``benchmarks/eddp_ablation.py`` for what each choice does to recovery.
    levels : None, "auto" or sequence of int
        Fit the concepts as a hierarchy of levels of granularity (see the module docstring): the
        finest level (the last size) is fitted first and the coarser ones start from its Ward tree;
        the sizes must sum to ``n_concepts``; needs ``init="cluster"``. ``None`` (default): one level, the paper's setting.
        ``"auto"``: 2, 4, 8, … (doubling while the next two levels still fit), the finest level
        taking the rest; fewer than 6 concepts stay one level. Every coarser level must be smaller
        than the finest (the last) one.
    device : str or torch.device, optional
        Where to compute; ``None`` = where the data is (CPU for a store).
    random_state : int, Generator or None
        Seed for every random choice (a local generator; global seeds are never touched).
    progress : bool
        Show a progress bar.

    Attributes
    ----------
    pairs_ : DirectionPairs
    init_pairs_ : DirectionPairs
        The pairs after the initialisation, before the loss refinement.
    history_ : dict
        Every loss per step (``history_["b"]["s"]`` is a list; ``"criterion"`` is what early
        stopping watched, ``"best_step"`` the step restored), ``"gains"`` (the detectors' gains
        from the initialisation and at the start of the refinement) and ``"seconds"``; with several
        levels, ``history_["levels"]`` holds one such dict per level.
    constraints_hold_ : bool
        Constrained mode only: whether every constraint held at the end of every schedule step.
    levels_ : list of int
        The level sizes fitted (``[n_concepts]`` for one level); ``pairs_.meta["levels"]`` too.
    n_features_in_ : int

    Examples
    --------
    >>> from unveil import EDDP
    >>> from unveil.data.synthetic import make_synthetic, train_head
    >>> data = make_synthetic(n_per_class=200)
    >>> head, _ = train_head(data, epochs=200)
    >>> est = EDDP(n_concepts=3, random_state=0).fit(data.X, head=head)
    >>> est.pairs_.detect(data.X).shape
    torch.Size([600, 3, 1, 2])
    """

    def __init__(self, n_concepts: int = 32, *, init: str = "cluster", steps: Optional[dict] = None,
                 weights: Optional[dict] = None, mode: str = "weighted", lr: Optional[dict] = None,
                 lr_scale: float = 1.0, gamma: float = 1.1, tau: Optional[dict] = None,
                 rho: Optional[dict] = None, kappa: Tuple[float, float] = (0.5, 0.9),
                 whiten_eps: float = 1e-2, n_init: int = 8, init_rounds: int = 5, batch_patches: int = 2048,
                 max_init_patches: int = 20_000, patience: int = 60, init_gain=None, levels=None,
                 device=None, random_state=None, progress: bool = False):
        self.n_concepts = n_concepts
        self.init = init
        self.steps = steps
        self.weights = weights
        self.mode = mode
        self.lr = lr
        self.lr_scale = lr_scale
        self.gamma = gamma
        self.tau = tau
        self.rho = rho
        self.kappa = kappa
        self.whiten_eps = whiten_eps
        self.n_init = n_init
        self.init_rounds = init_rounds
        self.batch_patches = batch_patches
        self.max_init_patches = max_init_patches
        self.patience = patience
        self.init_gain = init_gain
        self.levels = levels
        self.device = device
        self.random_state = random_state
        self.progress = progress

    # ------------------------------------------------------------------ params
    def _resolved(self):
        I = check_positive_int(self.n_concepts, "n_concepts")
        if self.init not in ("cluster", "random"):
            raise ValidationError(f"init must be 'cluster' or 'random', got {self.init!r}.")
        if self.mode not in ("weighted", "constrained"):
            raise ValidationError(f"mode must be 'weighted' or 'constrained', got {self.mode!r}.")
        steps = {"a": 600 if self.init == "random" else 0, "b": 100, "d": 150}
        steps.update(self.steps or {})
        for k, v in steps.items():
            if k not in "abd":
                raise ValidationError(f"steps keys must be 'a', 'b' or 'd'; got {k!r}.")
            check_positive_int(v, f"steps[{k!r}]", minimum=0)
        weights = {k: dict(v) for k, v in PAPER_WEIGHTS.items()}
        for k, v in (self.weights or {}).items():
            if k not in weights:
                raise ValidationError(f"weights keys must be 'a', 'b' or 'd'; got {k!r}.")
            weights[k].update(v)
        lr = {"a": 1e-3, "b": 1e-4, "d": 5e-4}
        lr = {k: v * check_in_range(self.lr_scale, "lr_scale", 0, None, low_inclusive=False) for k, v in lr.items()}
        lr.update(self.lr or {})
        tau = {"a": 0.9, "b": 0.9, "d": 0.2}
        tau.update(self.tau or {})
        rho = {"a": 12.0, "b": 12.0, "d": 70.0}
        rho.update(self.rho or {})
        check_in_range(self.gamma, "gamma", 0, None, low_inclusive=False)
        if not (self.init_gain is None or self.init_gain == "auto"):
            if isinstance(self.init_gain, str):
                raise ValidationError(f"init_gain must be None, 'auto' or a positive number; got {self.init_gain!r}.")
            check_in_range(self.init_gain, "init_gain", 0, None, low_inclusive=False)
        k0, k1 = self.kappa
        check_in_range(k0, "kappa[0]", 0, 1)
        check_in_range(k1, "kappa[1]", k0, 1)
        return I, steps, weights, lr, tau, rho

    def resolved_levels(self) -> list:
        """The level sizes ``fit`` will use (see ``levels``)."""
        I = check_positive_int(self.n_concepts, "n_concepts")
        lv = self.levels
        if lv is None:
            return [I]
        if isinstance(lv, str):
            if lv != "auto":
                raise ValidationError(f"levels must be None, 'auto' or a list of level sizes; got {lv!r}.")
            sizes, s = [], 2
            while sum(sizes) + 3 * s <= I:  # this level and a finer one of twice its size still fit
                sizes.append(s)
                s *= 2
            sizes = sizes + [I - sum(sizes)]
            if len(sizes) > 1 and self.init != "cluster":
                raise ValidationError("levels='auto' needs init='cluster' (the coarse levels start from the finest "
                                      f"level's clusters); got init={self.init!r}.")
            return sizes
        try:
            sizes = [check_positive_int(v, "levels[i]") for v in lv]
        except TypeError:
            raise ValidationError(f"levels must be None, 'auto' or a list of level sizes; got {lv!r}.") from None
        if not sizes or sum(sizes) != I:
            raise ValidationError(f"the level sizes {sizes} must sum to n_concepts = {I}; adjust one of them "
                                  f"(or pass levels='auto').")
        if len(sizes) > 1 and self.init != "cluster":
            raise ValidationError(f"levels {sizes} need init='cluster' (the coarse levels start from the finest "
                                  f"level's clusters); got init={self.init!r}.")
        if len(sizes) > 1 and max(sizes[:-1]) >= sizes[-1]:
            raise ValidationError(f"levels {sizes}: the last (finest) level must be larger than every other, "
                                  f"which are built by merging its concepts; reorder or resize them.")
        return sizes

    def resolved_steps(self) -> Dict[str, int]:
        """The optimisation steps per schedule step that ``fit`` will run (defaults merged with ``steps``)."""
        return dict(self._resolved()[1])

    def _check_fitted(self):
        if not hasattr(self, "pairs_"):
            raise NotFittedError("this EDDP instance is not fitted yet; call fit(X, head=...) first.")

    # --------------------------------------------------------------------- fit
    def fit(self, X, head: Optional[nn.Module] = None, y=None) -> "EDDP":
        """Learn the direction pairs.

        Parameters
        ----------
        X : tensor (N, D, H, W) or an ActivationStore
            Feature maps of the studied layer (a store is streamed; memory does not grow with it).
            (P, D) patch vectors are accepted too (treated as 1×1 maps).
        head : nn.Module, optional
            The frozen rest of the network f⁺: maps (N, D, H, W) -> logits (N, K). Enables the URA
            terms. Never trained, moved or switched to eval mode here; its gradients are not touched.
        y : ignored
            Present for scikit-learn compatibility.

        Returns
        -------
        self
        """
        I, steps, weights, lr, tau, rho = self._resolved()
        levels = self.resolved_levels()
        if len(levels) > 1:
            return self._fit_levels(X, head, levels)
        self.levels_ = levels
        t_start = time.perf_counter()
        source, data_device = _as_source(X)
        device = torch.device(self.device) if self.device is not None else (data_device or torch.device("cpu"))
        gen = make_generator(self.random_state)
        D = source.n_features
        batch_maps = self._batch_maps(source)
        if getattr(source, "subsampled", False) and head is not None:
            raise ValidationError("this activation store holds randomly subsampled patches, not whole maps, "
                                  "so the head f+ cannot be applied to them; fit without a head "
                                  "(head=None) or extract the store without --subsample.")
        if head is not None:
            head = _head_on_device(head, device)
            self._check_head(head, source, device)

        stats = _stream_stats(source, batch_maps, check_positive_int(self.max_init_patches, "max_init_patches"),
                              gen, device)
        if stats.n_patches < 2 * I:
            raise ValidationError(f"only {stats.n_patches} patches for {I} concepts; expected at least "
                                  f"{2 * I}. Pass more images or ask for fewer concepts.")
        mu = stats.mean
        sigma = math.sqrt(max(float(torch.trace(stats.cov)) / D, 1e-30))
        self.n_features_in_ = D
        self.scale_ = sigma

        # ---- initialisation
        eps = check_in_range(self.whiten_eps, "whiten_eps", 0, None, low_inclusive=False)
        r_std = _soft_standard_scale(stats.cov, eps).to(device)  # x̃ -> soft-standardised, for step (a)
        if self.init == "cluster":
            Wt, bt = self._cluster_init(stats, I, gen)  # scaled-space decoders with magnitude, thresholds
        else:  # random unit filters in the soft-standardised space of step (a)
            v = torch.randn(I, D, generator=gen).double().to(device)
            Wt = 4.0 * v / v.norm(dim=1, keepdim=True) * r_std.double()[None, :]
            bt = torch.zeros(I, dtype=torch.float64, device=device)
        gains = {"init": Wt.norm(dim=1).tolist()}
        if self.init_gain is not None:
            first = next(p for p in "bda" if steps[p] > 0) if any(steps.values()) else "b"
            Wt, bt = _calibrate_gains(Wt, bt, (stats.sample - mu) / sigma, self.init_gain, weights[first],
                                      tau[first], min(0.95, rho[first] * tau[first] / I), self.gamma)
        gains["start"] = Wt.norm(dim=1).tolist()
        dec0, bias0 = self._to_original(Wt, bt, mu, sigma)
        S0 = self._pattern(source, dec0, bias0, batch_maps, device)
        self.init_pairs_ = self._make_pairs(dec0, bias0, S0, mu, stage="init")

        # ---- refinement with the paper's losses
        history: Dict[str, Dict[str, list]] = {"gains": gains}
        total = sum(steps.values())
        bar = progress(total=total, enabled=self.progress, desc="EDDP")
        params = {
            "v": (Wt / Wt.norm(dim=1, keepdim=True)).float().clone(),
            "log_g": Wt.norm(dim=1).clamp_min(1e-3).log().float().clone(),
            "b": bt.float().clone(),
        }
        mu32, s32 = mu.float(), float(sigma)
        to_model = (lambda m: m * s32 + mu32[None, :, None, None]) if head is not None else None
        S_scaled = S0.float().clone()  # signal directions (isotropic scaling keeps directions)
        constraints: Dict[str, dict] = {}
        try:
            for phase in ("a", "b", "d"):
                if steps[phase] == 0:
                    continue
                scale = None
                if phase == "a":  # step (a) acts on soft-standardised features: w x̃ = (w / r)(x̃ ⊙ r)
                    scale = r_std.float()
                    Wa = self._decoders_t(params) / scale[None, :]
                    params = {"v": Wa / Wa.norm(dim=1, keepdim=True), "log_g": Wa.norm(dim=1).log(),
                              "b": params["b"]}
                if phase == "d":
                    # (c): signal vectors from the positive-only estimator for the current filters
                    dec, bias = self._to_original(self._decoders_t(params), params["b"].double(), mu, sigma)
                    S_scaled = self._pattern(source, dec, bias, batch_maps, device).float()
                    S_scaled = S_scaled / S_scaled.norm(dim=1, keepdim=True)
                rho_p = min(0.95, rho[phase] * tau[phase] / I)
                history[phase] = self._run_phase(
                    phase, steps[phase], params, S_scaled if phase == "d" else None, source, batch_maps,
                    mu32, s32, head, to_model, weights[phase], lr[phase], tau[phase], rho_p, gen, device, bar,
                    feat_scale=scale)
                if self.mode == "constrained":
                    vals = self._final_terms(params, phase, source, batch_maps, mu32, s32, weights[phase],
                                             tau[phase], rho_p, gen, device, feat_scale=scale)
                    per = {k: {"value": vals[k], "bound": bound, "holds": bool(vals[k] <= bound)}
                           for k, bound in PAPER_CONSTRAINTS.items() if k in vals}
                    constraints[phase] = {"terms": per, "all_hold": all(c["holds"] for c in per.values())}
                if phase == "a":  # back to the scaled space; standardisation and orthogonality are dropped
                    if I <= D:
                        params["v"] = params["v"] / params["v"].norm(dim=1, keepdim=True)
                    Wt_ = self._decoders_t(params) * scale[None, :]
                    params = {"v": Wt_ / Wt_.norm(dim=1, keepdim=True), "log_g": Wt_.norm(dim=1).log(),
                              "b": params["b"]}
                if phase == "d":
                    S_scaled = params.pop("S").detach()
        finally:
            bar.close()

        dec, bias = self._to_original(self._decoders_t(params).double(), params["b"].double(), mu, sigma)
        S = self._pattern(source, dec, bias, batch_maps, device)
        self.pairs_ = self._make_pairs(dec, bias, S, mu, stage="final")
        if self.mode == "constrained":
            history["constraints"] = constraints
            self.constraints_hold_ = all(c["all_hold"] for c in constraints.values()) if constraints else None
            self.pairs_.meta["constraints_hold"] = self.constraints_hold_
            self.pairs_.meta["constraints"] = {p: {k: c["holds"] for k, c in v["terms"].items()}
                                               for p, v in constraints.items()}
        history["seconds"] = time.perf_counter() - t_start
        self.history_ = history
        logger.info("EDDP fit: %d concepts on %d patches of width %d in %.1f s", I, stats.n_patches, D,
                    history["seconds"])
        return self

    def _batch_maps(self, source) -> int:
        """Whole maps per mini-batch: enough for at least ``batch_patches`` patches."""
        H, Wd = source.map_shape
        return max(1, math.ceil(check_positive_int(self.batch_patches, "batch_patches") / (H * Wd)))

    def _fit_levels(self, X, head, levels) -> "EDDP":
        """The finest level, then the coarser ones from its Ward tree (see the module docstring)."""
        t_start = time.perf_counter()
        gen = make_generator(self.random_state)
        seeds = [int(v) for v in torch.randint(0, 2**31 - 1, (len(levels),), generator=gen)]
        params = {k: v for k, v in self.get_params().items() if k not in ("n_concepts", "levels", "random_state")}
        logger.info("EDDP finest level: %d concepts", levels[-1])
        fine = EDDP(n_concepts=levels[-1], levels=None, random_state=seeds[-1], **params).fit(X, head=head)
        Pf = fine.pairs_
        source, data_device = _as_source(X)
        device = torch.device(self.device) if self.device is not None else (data_device or torch.device("cpu"))
        batch_maps = self._batch_maps(source)
        Wf = Pf.decoders.double().to(device)
        bf = Pf.biases.double().to(device)
        norms = Wf.norm(dim=1).clamp_min(1e-12)

        def assign(P):  # the finest concept each patch lies deepest inside (signed distance)
            return ((P.double() @ Wf.T - bf) / norms).argmax(1)
        # centroids of the finest concepts (streamed)
        n_f = len(bf)
        sums = torch.zeros(n_f, Wf.shape[1], dtype=torch.float64, device=device)
        counts = torch.zeros(n_f, dtype=torch.float64, device=device)
        for maps in source.iter_maps(batch_maps):
            P = _patches(maps.to(device)).double()
            a = assign(P)
            sums.index_add_(0, a, P)
            counts += torch.bincount(a, minlength=n_f).double()
        partitions = _ward_partitions(sums / counts.clamp_min(1)[:, None], counts, sorted(set(levels[:-1])))

        parts = {}
        for li, (size, seed) in enumerate(zip(levels[:-1], seeds[:-1])):
            groups = torch.as_tensor(partitions[size], device=device)
            logger.info("EDDP level %d: %d concepts (merged from the finest level)", li, size)
            est = EDDP(n_concepts=size, levels=None, random_state=seed, **params)
            est._init_labeler = lambda P, _g=groups: _g[assign(P.to(device))]
            parts[li] = est.fit(X, head=head)
        parts[len(levels) - 1] = fine
        parts = [parts[i] for i in range(len(levels))]

        def cat(attr, stage):
            ps = [getattr(p, attr) for p in parts]
            meta = {**ps[-1].meta, "stage": stage, "n_concepts": sum(levels), "levels": list(levels),
                    "level_of_concept": [li for li, size in enumerate(levels) for _ in range(size)],
                    "parent_groups": {str(size): [int(v) for v in partitions[size]] for size in partitions},
                    "level_seeds": seeds,
                    "params": {**ps[-1].meta.get("params", {}), "n_concepts": sum(levels), "levels": list(levels)},
                    "random_state": self.random_state if isinstance(self.random_state, int) else None}
            return DirectionPairs(torch.cat([p.decoders for p in ps]), torch.cat([p.biases for p in ps]),
                                  torch.cat([p.encoders for p in ps]), ps[-1].mean, meta=meta)
        self.levels_ = list(levels)
        self.n_features_in_ = fine.n_features_in_
        self.scale_ = fine.scale_
        self.init_pairs_ = cat("init_pairs_", "init")
        self.pairs_ = cat("pairs_", "final")
        self.history_ = {"levels": [p.history_ for p in parts], "seconds": time.perf_counter() - t_start}
        return self

    # ------------------------------------------------------------ components
    def _check_head(self, head, source, device):
        if not isinstance(head, nn.Module) and not callable(head):
            raise HeadError(f"head must be a torch nn.Module (or callable) mapping maps (N, D, H, W) to logits "
                            f"(N, K); got {type(head).__name__}.")
        if isinstance(head, nn.Module) and head.training:
            logger.warning("the head is in training mode (dropout/batch-norm behave stochastically); "
                           "call head.eval() before fitting for reproducible results.")
        probe = next(iter(source.iter_maps(2)))[:2].to(device)
        try:
            with torch.no_grad():
                out = head(probe)
        except Exception as exc:  # noqa: BLE001 - re-raised as a clear error
            raise HeadError(f"the head does not accept the feature maps: calling it on a batch of shape "
                            f"{tuple(probe.shape)} raised {type(exc).__name__}: {exc}. Pass the part of the "
                            f"network above the studied layer (it must take that layer's output).") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != probe.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise HeadError(f"the head must return logits of shape (N, K) = ({probe.shape[0]}, K) for "
                            f"{probe.shape[0]} maps; got {shape}. Wrap it so that it returns class logits.")
        if out.shape[1] < 2:
            raise HeadError(f"the head returns {out.shape[1]} logit per map; URA needs at least 2 classes.")
        if not torch.isfinite(out).all():
            raise HeadError("the head returned NaN or infinite logits on the activations.")

    def _cluster_init(self, stats: _Stats, I: int, gen) -> Tuple[torch.Tensor, torch.Tensor]:
        """k-means on soft-whitened patches, then one-vs-rest max-margin detectors.

        Returns decoders with magnitude and thresholds in the scaled space ``(x − μ)/σ``."""
        mu, cov = stats.mean, stats.cov
        sigma = math.sqrt(max(float(torch.trace(cov)) / cov.shape[0], 1e-30))
        ev, U = torch.linalg.eigh(cov)
        ev = ev.clamp_min(0)
        white = U / torch.sqrt(ev + check_in_range(self.whiten_eps, "whiten_eps", 0, None, low_inclusive=False)
                               * ev.mean().clamp_min(1e-30))[None, :]  # (D, D): z = (x−μ) @ white
        Z = (stats.sample - mu) @ white
        labeler = getattr(self, "_init_labeler", None)  # set for the coarse levels of a hierarchy
        if labeler is not None:
            labels = labeler(stats.sample).to(Z.device).long()
            if (torch.bincount(labels, minlength=I) < 2).any():
                logger.warning("a merged group holds fewer than 2 sampled patches; this level starts from k-means")
                labeler = None
        if labeler is None:
            labels = _kmeans(Z.float(), I, check_positive_int(self.n_init, "n_init"), gen)
        counts = torch.bincount(labels, minlength=I)
        if (counts == 0).any():
            raise ValidationError(f"the activations hold fewer than {I} distinct patterns (k-means left "
                                  f"{int((counts == 0).sum())} clusters empty); ask for fewer concepts.")
        Zf = Z.float()
        Wz, bz = _fit_margin_classifiers(Zf, labels, I)
        for _ in range(self.init_rounds - 1):
            # discriminative re-clustering: each patch goes to the detector it is deepest inside
            # (signed distance to the hyperplane), then the detectors are refitted
            new = ((Zf @ Wz.T - bz) / Wz.norm(dim=1).clamp_min(1e-12)).argmax(1)
            if torch.equal(new, labels) or (torch.bincount(new, minlength=I) < 2).any():
                break
            labels = new
            Wz, bz = _fit_margin_classifiers(Zf, labels, I, steps=30, start=(Wz, bz))
        Wz, bz = Wz.double(), bz.double()
        # z-space classifier: Wz·((x−μ) @ white) − bz  ->  scaled space x̃ = (x−μ)/σ
        Wt = (white @ Wz.T).T * sigma
        return Wt, bz

    @staticmethod
    def _decoders_t(params) -> torch.Tensor:
        v = params["v"]
        return (v / v.norm(dim=1, keepdim=True)) * params["log_g"].exp()[:, None]

    @staticmethod
    def _to_original(Wt, bt, mu, sigma):
        """Scaled-space detectors (Wt·x̃ − bt) to original-space (W·x − b)."""
        W = Wt.double() / sigma
        b = bt.double() + W @ mu.double()
        return W, b

    def _pattern(self, source, W, b, batch_maps, device) -> torch.Tensor:
        """Positive-only pattern estimator ŝ_i = cov[x, z_i] / var[z_i] over {x: z_i > b_i} (streamed)."""
        I, D = W.shape
        n = torch.zeros(I, dtype=torch.float64, device=device)
        sz = torch.zeros_like(n)
        szz = torch.zeros_like(n)
        sx = torch.zeros(I, D, dtype=torch.float64, device=device)
        sxz = torch.zeros_like(sx)
        shift = None
        for maps in source.iter_maps(batch_maps):
            x = _patches(maps.to(device)).double()
            if shift is None:
                shift = x.mean(0)
            x = x - shift  # covariances are shift-invariant; this keeps float64 sums well-conditioned
            z = x @ W.T
            pos = (z > (b - W @ shift)).double()
            pz = pos * z
            n += pos.sum(0)
            sz += pz.sum(0)
            szz += (pz * z).sum(0)
            sx += pos.T @ x
            sxz += pz.T @ x
        dead = n < 2
        n1 = n.clamp_min(1)
        var = szz / n1 - (sz / n1) ** 2
        S = (sxz / n1[:, None] - (sz / n1)[:, None] * (sx / n1[:, None])) / var.clamp_min(1e-30)[:, None]
        if dead.any() or (var <= 1e-30).any():
            bad = (dead | (var <= 1e-30)).nonzero().flatten().tolist()
            logger.warning("concepts %s fire on fewer than 2 patches (or on constant values); their signal "
                           "vectors fall back to their filter direction.", bad)
            S[bad] = W[bad] / (W[bad] * W[bad]).sum(1, keepdim=True)
        return S

    def _make_pairs(self, W, b, S, mu, stage):
        Su = S / S.norm(dim=1, keepdim=True).clamp_min(1e-30)
        meta = {"method": "EDDP", "stage": stage, "n_concepts": W.shape[0],
                "params": {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list, tuple)) else repr(v))
                           for k, v in self.get_params().items()},
                "random_state": self.random_state if isinstance(self.random_state, int) else None}
        return DirectionPairs(W.float(), b.float(), Su.float(), mu.float(), meta=meta)

    def _batches(self, source, batch_maps, gen) -> Iterator[torch.Tensor]:
        while True:
            empty = True
            for maps in source.iter_maps(batch_maps, shuffle=True, generator=gen):
                empty = False
                yield maps
            if empty:  # pragma: no cover - guarded by _as_source
                return

    def _run_phase(self, phase, n_steps, params, S_init, source, batch_maps, mu, sigma, head, to_model,
                   w, lr, tau, rho, gen, device, bar, feat_scale=None) -> Dict[str, list]:
        """One schedule step: Adam on the phase's losses, early stopping, the best state restored.

        ``feat_scale`` (D,), optional: the losses see ``x̃ ⊙ feat_scale`` instead of the scaled patches
        ``x̃`` (step (a): soft-standardised features); ``params`` then act in that space.
        The early-stopping criterion is the weighted total (``mode="weighted"``) or, in the
        constrained mode, the objective plus the total constraint violation (not the augmented
        Lagrangian, which grows with the multipliers). The parameters saved as "best" are the ones the
        loss was computed for (before that step's update).
        """
        I = params["v"].shape[0]
        for k in list(params):
            params[k] = params[k].detach().to(device).requires_grad_(True)
        if S_init is not None:
            params["S"] = S_init.detach().clone().to(device).requires_grad_(True)
        trainable = list(params.values())
        opt = torch.optim.Adam(trainable, lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(5, self.patience // 4))
        use_head = head is not None
        ura_key = "cur" if phase == "d" else "uur"
        orthogonal = phase == "a" and I <= source.n_features
        constrained = self.mode == "constrained"
        if feat_scale is not None:
            r = feat_scale.float().to(device)
            r4 = r[None, :, None, None]
            model_map = (lambda m: to_model(m / r4)) if to_model is not None else None
        else:
            r4, model_map = None, to_model
        hist: Dict[str, list] = {}
        lam = {k: 0.0 for k in PAPER_CONSTRAINTS}
        penalty = 10.0
        best, best_step, best_state = math.inf, 0, None
        batches = self._batches(source, batch_maps, gen)
        stopped = False
        for step in range(n_steps):
            maps = next(batches).to(device)
            xs = (maps - mu[None, :, None, None]) / sigma
            if r4 is not None:
                xs = xs * r4
            wbar, g = _filters(params, orthogonal)
            terms = _detector_terms(_patches(xs), wbar, g, params["b"], params.get("S"), w, tau, rho, self.gamma)
            if use_head and w.get(ura_key, 0) > 0:
                S = params["S"] if phase == "d" else None
                terms[ura_key] = L.ura_loss(xs, head, wbar * g[:, None], params["b"], S, self.kappa, gen, model_map)
            if not constrained:
                total = sum(w.get(k, 0.0) * t for k, t in terms.items())
                criterion = float(total.detach())
            else:
                obj = terms["s"] + terms.get("sb", 0.0) + terms.get(ura_key, 0.0)
                aug = 0.0
                violation = 0.0
                for k, bound in PAPER_CONSTRAINTS.items():
                    if k in terms:
                        c = terms[k] - bound
                        aug = aug + (torch.relu(lam[k] + penalty * c) ** 2 - lam[k] ** 2) / (2 * penalty)
                        violation += max(0.0, float(c.detach()))
                total = obj + aug
                criterion = float(obj.detach()) + violation
                hist.setdefault("objective", []).append(float(obj.detach()))
                hist.setdefault("violation", []).append(violation)
            for k, t in terms.items():
                hist.setdefault(k, []).append(float(t.detach()))
            hist.setdefault("total", []).append(float(total.detach()))
            hist.setdefault("criterion", []).append(criterion)
            # early stopping on the smoothed criterion; the snapshot is of the parameters just evaluated
            smooth = float(np.mean(hist["criterion"][-10:]))
            if smooth < best - 1e-4:
                best, best_step = smooth, step
                best_state = {k: p.detach().clone() for k, p in params.items()}
            elif step - best_step >= self.patience:
                bar.update(n_steps - step)
                logger.info("EDDP step (%s): early stop at %d/%d (best at %d)", phase, step + 1, n_steps,
                            best_step + 1)
                stopped = True
                break
            grads = torch.autograd.grad(total, trainable, allow_unused=True)
            for p, gr in zip(trainable, grads):
                p.grad = gr
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step(criterion)
            if constrained and (step + 1) % 10 == 0:
                for k, bound in PAPER_CONSTRAINTS.items():
                    if k in terms:
                        lam[k] = max(0.0, lam[k] + penalty * (float(terms[k].detach()) - bound))
            bar.update(1)
        if best_state is not None:
            for k in params:
                params[k] = best_state[k]
        if orthogonal:
            q, r_ = torch.linalg.qr(params["v"].T)
            params["v"] = (q * torch.sign(torch.diagonal(r_))[None, :]).T.contiguous()
        for k in list(params):
            params[k] = params[k].detach()
        hist["steps_run"] = [len(hist.get("total", []))]
        hist["best_step"] = [best_step]
        hist["early_stopped"] = [bool(stopped)]
        return hist

    def _final_terms(self, params, phase, source, batch_maps, mu, sigma, w, tau, rho, gen, device,
                     feat_scale=None, n_batches: int = 8) -> Dict[str, float]:
        """The detector losses of the phase's final parameters, averaged over a few mini-batches."""
        orthogonal = phase == "a" and params["v"].shape[0] <= source.n_features
        sums: Dict[str, float] = {}
        n = 0
        with torch.no_grad():
            wbar, g = _filters(params, orthogonal)
            for maps in source.iter_maps(batch_maps, shuffle=True, generator=gen):
                xs = (maps.to(device) - mu[None, :, None, None]) / sigma
                if feat_scale is not None:
                    xs = xs * feat_scale.float().to(device)[None, :, None, None]
                terms = _detector_terms(_patches(xs), wbar, g, params["b"], params.get("S"), w, tau, rho,
                                        self.gamma)
                for k, t in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(t)
                n += 1
                if n >= n_batches:
                    break
        return {k: v / max(n, 1) for k, v in sums.items()}

    # ------------------------------------------------------------- sklearn API
    def get_params(self, deep: bool = True) -> dict:
        import inspect
        names = [p for p in inspect.signature(self.__init__).parameters]
        return {n: getattr(self, n) for n in names}

    def set_params(self, **params) -> "EDDP":
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise ValidationError(f"unknown parameter {k!r} for EDDP; valid: {sorted(valid)}.")
            setattr(self, k, v)
        return self

    def detect(self, X) -> torch.Tensor:
        """Detector activations of the fitted pairs (see :meth:`DirectionPairs.detect`)."""
        self._check_fitted()
        return self.pairs_.detect(X)

    def transform(self, X) -> torch.Tensor:
        """Signal values (mean-centred latent factors) of the fitted pairs, (N, I, H, W)."""
        self._check_fitted()
        return self.pairs_.signal_values(X)

    def fit_transform(self, X, head=None, y=None) -> torch.Tensor:
        return self.fit(X, head=head).transform(X)

    def __repr__(self) -> str:
        return f"EDDP(n_concepts={self.n_concepts!r}, init={self.init!r}, mode={self.mode!r})"
