"""`EDDP`, the estimator: validates its parameters, runs the stages, builds the direction pairs."""
from __future__ import annotations

import logging
import math
import numbers
import time
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ... import _distributed as Dist
from ..._errors import HeadError, ValidationError
from ..._progress import progress
from ..._validation import check_in_range, check_positive_int, make_generator
from .._base import DirectionEstimator, Interval, Options
from ..pairs import DirectionPairs
from ..pattern import PositivePattern
from ._source import _as_source, _patches, _RankSource
from .discriminant import ZSpace, discriminant_passes
from .initialisation import _calibrate_gains, _ward_partitions, cluster_init, recluster_rounds, to_scaled
from .refinement import PAPER_CONSTRAINTS, PAPER_WEIGHTS, DataSpec, PhaseSpec, final_terms, run_phase
from .statistics import _soft_standard_scale, _stream_stats

#: The dimension the paper's learning rates were set for (its synthetic recipe, method.md §6).
LR_REFERENCE_DIM = 16

logger = logging.getLogger("unveil")


_STREAM_PATCHES = 2048  # patches per chunk of a streamed pass with batch_patches="auto"
_BATCH_PER_CONCEPT = 256  # the refinement's mini-batch with batch_patches="auto": this many patches per concept


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



# ---------------------------------------------------------------------------------- the estimator
def _scaled_float32(sample: torch.Tensor, mu: torch.Tensor, sigma: float, device, chunk: int = 65_536) -> torch.Tensor:
    """``(sample − μ) / σ`` in float32 on ``device``, converted in chunks (no float64 copy of the whole sample)."""
    out = torch.empty(sample.shape, dtype=torch.float32, device=device)
    mu = mu.to(device, torch.float64)
    for i in range(0, sample.shape[0], chunk):
        out[i:i + chunk] = ((sample[i:i + chunk].to(device, torch.float64) - mu) / sigma).float()
    return out


class EDDP(DirectionEstimator):
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
        with an augmented Lagrangian (more stable on small problems), aimed 0.5% inside each bound so
        that the bounds hold at the end. Early stopping watches the objective plus the total constraint
        violation; whether every constraint holds at the end is recorded (``constraints_hold_``,
        ``history_["constraints"]``, ``pairs_.meta``). From the margin detectors' gains
        (``init_gain=None``) L_mm < 8 is out of reach of a few hundred Adam steps; pass
        ``init_gain="auto"`` to start inside the bound.
    lr : dict, optional
        Adam learning rates per step; default the paper's ``{"a": 1e-3, "b": 1e-4, "d": 5e-4}``
        scaled by ``lr_scale``.
    lr_scale : "auto" or float
        Multiplies every default learning rate. ``"auto"`` (default): ``min(1, sqrt(16 / D))``, the
        paper's rates at its D = 16 and smaller ones above: Adam moves every coordinate of a unit
        direction by about the learning rate per step, so a step turns the direction by about
        ``lr * sqrt(D)``, and at a layer's width the paper's rates walk the filters along noise
        (D = 512, the ``scale`` setting, 100k patches, seed 0, no head: matched IoU 0.783 after the
        initialisation, 0.739 after the refinement at the paper's rates, 0.794 with ``"auto"``).
        ``1.0``: the paper's rates at every D.
    gamma : float
        Sharpening exponent γ in L_ic and L_eac (default 1.1, the paper's synthetic run).
    tau : dict
        τ per step (ν = τ/I); default ``{"a": 0.9, "b": 0.9, "d": 0.2}``.
    rho : dict
        ρ per step as a multiple of τ/I: default ``{"b": 12, "d": 70}`` (the paper's); ρ is capped
        at 0.95.
    kappa : tuple
        Range of the URA step κ ~ U[κ₀, κ₁].
    ic_floor : {"paper", "start"}
        The firing-rate floor of L_ic (no dead detector). ``"paper"`` (default): ν = τ/I for every
        detector. It presumes concepts of about equal frequency and pushes the detector of a rarer
        concept to fire on more patches. ``"start"``: ν_i = min(τ/I, r_i / 2), r_i the detector's firing
        rate (E[y^γ] on the patch sample) where the refinement starts: a detector may not lose more
        than half its patches, and none is pushed above its concept's frequency (meant for a clustering
        start; random detectors may start dead, and then only the paper's floor revives them).
        Measured with ``sb_patches="claimed"``. On the ``scale`` setting (D = 512, 64 concepts whose
        frequencies differ by 8×, 500k patches, seed 1, with the head), matched IoU / encoding cosine:
        initialisation 0.891 / 0.972, refined with ``"paper"`` 0.898 / 0.978, with ``"start"`` 0.902 /
        0.979. On the demo's real layer (``layer4``, a script around ``run_demo`` without the
        baselines) S1 / S2 15.27 / 4.91 with ``"paper"``, 14.54 / 4.76 with ``"start"``: the paper's floor
        broadens the detectors there, and the concept masks reward it. So the paper's floor stays the
        default.
    sb_patches : {"claimed", "all"}
        The patches L_sb (the worst patch's sparsity entropy) reads. ``"all"``: every patch (the
        paper's). ``"claimed"`` (default): each patch's entropy weighted by ``min(1, Σ_i y_i)``, how
        much the detectors claim it. The entropy of ``y / ‖y‖₁`` reads relative sizes, so a patch no
        detector fires on can have the largest entropy of a batch (on the setting below about half of the
        smooth maximum's weight lies on such patches) and its gradient makes some detector claim it.
        Same setting and seed, with the paper's L_ic floor: ``"all"`` 0.884 / 0.930, below the
        initialisation (the refinement lost rare concepts' signal vectors, the lowest per concept 0.02),
        ``"claimed"`` 0.898 / 0.978; on the demo's ``layer4`` S1 / S2 15.63 / 4.80 and 15.27 / 4.91.
    shared_positives : {"split", "full"}
        How a patch that several detectors call positive counts in each one's signal vector (the
        positive-only pattern estimator, method.md §3). ``"full"``: 1 in each (the paper's).
        ``"split"`` (default): ``1/k`` in each of the ``k`` (:class:`~unveil.directions.pattern.PositivePattern`).
        A detector's false positives are mostly patches another detector claims, and a few of them
        tilt its signal vector. Scale setting, 64 concepts, 500k patches, seed 0, the same refined
        detectors: mean encoding cosine 0.963 with ``"full"`` (one concept at 0.55), 0.972 with
        ``"split"`` (lowest 0.81). Used for the signal vectors of ``init_pairs_`` and ``pairs_``; step (c),
        where the refinement's signal vectors start, keeps the paper's estimator (with ``"split"`` there too,
        the demo's ``layer4`` S1 / S2 went from 15.27 / 4.91 to 14.79 / 4.74, one run).
    refine_signals : {"auto", "pattern", "learned"}
        The signal vectors Ŝ of step (d), which L_fso and the constrained URA term read. ``"learned"``:
        free parameters trained jointly with the filters (the paper's wording). ``"pattern"``: the
        positive-only pattern (method.md §3, every positive counts 1) of the current filters,
        re-estimated every 10 steps on the initialisation's patch sample; the losses then move the
        filters alone. ``"auto"`` (default): ``"pattern"`` with ``init="random"``, ``"learned"`` with
        the clustering initialisation. Why: a filter that reads its concept minus a part of the others
        separates one-concept patches better (L_s and L_ma favour it), and L_fso, which should stop it,
        is met just as well by moving a free Ŝ away from the other filters, so the filters keep the
        leak and the signal values inherit it. From random detectors, where the losses shape the
        filters, that decides the result: the paper's path on its synthetic recipe (its
        hyper-parameters, seeds 0–5, ``benchmarks/eddp_paper_path.py``) with ``"learned"`` left
        filters that read 0.28–0.39 of each other concept (seed 1) and met the paper's numbers (IoU
        ≥ 0.92 per concept, RMSE ≤ 0.26) on 2 of 6 seeds (RMSE up to 0.48); with ``"pattern"``
        0.08–0.12, and 6 of 6 (RMSE 0.099–0.148). From the clustering initialisation the filters start
        at the concepts and it is a wash, ``"pattern"`` against ``"learned"``: the ``hard`` setting
        (``benchmarks/eddp_ablation.py``, seeds 0–2) RMSE 0.126 against 0.121, the same IoU; the
        ``scale`` setting (``benchmarks/eddp_scale.py``, 64 concepts, 500k patches, seed 0) IoU 0.896
        against 0.897, encoding cosine 0.975 against 0.972; the demo's ``layer4`` (a script around
        ``run_demo`` without the baselines) S1 / S2 15.35 / 4.86 against 15.27 / 4.91.
    whiten_eps : float
        The ε floor of the soft whitening, relative to the mean eigenvalue.
    noise_floor : float or None
        When the activations' spectrum has a flat noise bulk (many equal eigenvalues: isotropic
        noise spread over many components, as in wide synthetic data; a layer's own spectrum, which
        decays over orders of magnitude, has none), the whitening floor is raised to this multiple
        of the bulk's eigenvalue and k-means runs on the components above the bulk. Whitening the
        bulk to unit variance would let hundreds of noise components swamp every distance: at
        D = 512 (the ``scale`` setting, 32 concepts, 100k patches, seed 0) the initialisation
        reached matched IoU 0.728 without this, 0.748 with 10 and 0.783 with 30 (the supervised
        ceiling: 0.786). ``None``: never.
    n_init : int or "auto"
        k-means++ restarts (``seeding="best"`` or ``"kmeans++"``, or when ICA cannot seed). ``"auto"``
        (default): 8 for up to 16 concepts, 4 above. Each restart is a Lloyd run on one thread (the
        clusters must not depend on the thread count): with 8, k-means++ took 24 s of a 131 s fit on the
        scale setting (64 concepts, 500k patches), where ICA's partition wins anyway; 4 and 8 gave matched IoU
        within 0.0011 on the ``hard`` setting (8 concepts, seeds 0–4). With few concepts a
        poor restart costs a whole concept: on the ablation's ``ura`` setting (6 concepts) 4 restarts gave
        IoU 0.430 on the used concepts against 0.469 with 8.
    seeding : {"best", "ica", "kmeans++"}
        Where the detectors start. ``"kmeans++"``: the best of ``n_init`` k-means++ runs.
        ``"ica"``: the partition given by the most skewed directions of the whitened patches
        (skewness FastICA: a concept present in few patches skews the patches' projection on it).
        ``"best"`` (default): both; detectors are fitted to each partition and the partition they
        reproduce better (mean IoU of each detector's positives with its group) wins: a concept is a
        half-space of the patches, a group cut by k-means along a distractor or a rare concept
        split among its neighbours is not; k-means' own inertia does not favour the concepts (a
        Lloyd run, which lowers it, moves a rare concept's patches into its neighbours' clusters).
        Measured on the ``scale`` setting (200k patches, seed 0, initialisation alone, matched
        IoU): 32 concepts, k-means++ 0.861 (two rare concepts lost), ICA 0.909. The ICA partition
        is used as it is: a Lloyd run from it moves the patches of rare concepts into their
        neighbours' clusters (64 concepts, seed 1, with the previous class-balanced thresholds:
        0.64 after Lloyd, 0.72 without).
    init_rounds : int
        Rounds of discriminative re-clustering after k-means: every patch is reassigned to the
        detector it lies deepest inside, and the detectors are refitted (1 = k-means labels only).
        Skipped when discriminant passes run (they do the same on every patch), unless no pass can be
        kept.
    discriminant_passes : int
        Passes over every patch after the initialisation (0: none). Each assigns every patch to the
        detector of largest score and re-estimates the detectors as linear discriminants of those
        groups (group means over every patch, the covariance of the statistics pass); a logistic
        regression on the sample, started from the discriminants, ends them (see
        :mod:`unveil.directions.eddp.discriminant`). The initialisation sees a sample of about a
        thousand patches per concept; these passes see them all (they are skipped when the sample
        holds every patch). ``scale`` setting (D = 512, 64 concepts, 200k patches, seed 0,
        initialisation alone): matched IoU 0.859 without, 0.892 with 2 passes (supervised ceiling
        0.920).
    batch_patches : int or "auto"
        Patches per mini-batch of the refinement, and per chunk of the streamed passes (whole maps
        are drawn until at least this many patches). ``"auto"`` (default): max(2048, 256 ×
        n_concepts) for the refinement, 2048 for the passes. The losses L_ic and L_eac read each
        detector's firing rate in the mini-batch and L_sb its worst patches; with 2048 patches a
        concept holding a quarter of 1/I of the patches has about 8 positives in a batch of 64
        concepts, and the noisy terms walk the filters away from the concepts (``scale`` setting,
        D = 512, 64 concepts, 200k patches, seed 0, initialisation 0.892 matched IoU / 0.937
        encoding cosine; after the refinement: 2048 patches 0.872 / 0.861, 8192 0.886 / 0.914,
        16 384 (the rule) 0.891 / 0.933, 32 768 0.892 / 0.929). On the demo's real layers the
        refinement's gain stays (``layer4`` S1 / S2 15.36 / 4.79 with 2048, 15.39 / 4.74 with
        32 768 at every level).
    max_init_patches : int or "auto"
        Size of the random patch sample used for the initialisation. ``"auto"`` (default):
        max(20 000, 1 000 × n_concepts), about a thousand patches per concept for the clustering
        start (``scale`` setting, 64 concepts, 200k patches, seed 1, initialisation alone: matched
        IoU 0.574 from 20 000 patches, 0.635 from 64 000, before the IoU thresholds).
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
        from the initialisation and at the start of the refinement), ``"seconds"`` and
        ``"stage_seconds"``; with ``init="cluster"``, ``"replaced_detectors"`` (the redundant
        detectors the initialisation gave to a missed concept, one dict each) and, when they ran,
        ``"discriminant_passes"``. With several levels, ``history_["levels"]`` holds one such dict
        per level.
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

    _POS_INT = [Interval(numbers.Integral, 1, None, closed="left")]
    _POS_REAL = [Interval(numbers.Real, 0, None, closed="neither")]
    _NONNEG_INT = [Interval(numbers.Integral, 0, None, closed="left")]
    _parameter_constraints = {
        "n_concepts": _POS_INT, "init": [Options({"cluster", "random"})], "steps": [None, "dict"],
        "weights": [None, "dict"], "mode": [Options({"weighted", "constrained"})], "lr": [None, "dict"],
        "lr_scale": [Options({"auto"})] + _POS_REAL, "gamma": _POS_REAL, "tau": [None, "dict"], "rho": [None, "dict"],
        "kappa": ["sequence"], "ic_floor": [Options({"paper", "start"})], "sb_patches": [Options({"claimed", "all"})],
        "shared_positives": [Options({"split", "full"})],
        "refine_signals": [Options({"auto", "pattern", "learned"})], "whiten_eps": _POS_REAL,
        "noise_floor": [None] + _POS_REAL,
        "n_init": [Options({"auto"})] + _POS_INT,
        "seeding": [Options({"best", "ica", "kmeans++"})],
        "init_rounds": _POS_INT, "discriminant_passes": _NONNEG_INT,
        "batch_patches": [Options({"auto"})] + _POS_INT, "max_init_patches": [Options({"auto"})] + _POS_INT,
        "patience": _POS_INT,
        "init_gain": [None, Options({"auto"}), Interval(numbers.Real, 0, None, closed="neither")],
        "levels": [None, Options({"auto"}), "sequence"], "device": [None, "device"],
        "random_state": [None, "random_state"], "progress": ["boolean"],
    }
    _learned_attributes = ("pairs_", "init_pairs_", "history_", "n_features_in_", "levels_", "scale_")

    def __init__(self, n_concepts: int = 32, *, init: str = "cluster", steps: Optional[dict] = None,
                 weights: Optional[dict] = None, mode: str = "weighted", lr: Optional[dict] = None,
                 lr_scale="auto", gamma: float = 1.1, tau: Optional[dict] = None,
                 rho: Optional[dict] = None, kappa: Tuple[float, float] = (0.5, 0.9),
                 ic_floor: str = "paper", sb_patches: str = "claimed", shared_positives: str = "split",
                 refine_signals: str = "auto", whiten_eps: float = 1e-2,
                 noise_floor: Optional[float] = 30.0, n_init="auto", seeding: str = "best",
                 init_rounds: int = 5, discriminant_passes: int = 2, batch_patches="auto",
                 max_init_patches="auto", patience: int = 60, init_gain=None, levels=None,
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
        self.ic_floor = ic_floor
        self.sb_patches = sb_patches
        self.shared_positives = shared_positives
        self.refine_signals = refine_signals
        self.whiten_eps = whiten_eps
        self.noise_floor = noise_floor
        self.n_init = n_init
        self.seeding = seeding
        self.init_rounds = init_rounds
        self.discriminant_passes = discriminant_passes
        self.batch_patches = batch_patches
        self.max_init_patches = max_init_patches
        self.patience = patience
        self.init_gain = init_gain
        self.levels = levels
        self.device = device
        self.random_state = random_state
        self.progress = progress

    # ------------------------------------------------------------------ params
    def _lr_factor(self, n_features: Optional[int]) -> float:
        """What the default learning rates are multiplied by: ``lr_scale``, or with ``"auto"``
        ``min(1, sqrt(16 / D))``."""
        if self.lr_scale == "auto":
            return 1.0 if n_features is None else min(1.0, math.sqrt(LR_REFERENCE_DIM / n_features))
        if isinstance(self.lr_scale, str):
            raise ValidationError(f"lr_scale must be 'auto' or a positive number; got {self.lr_scale!r}.")
        return check_in_range(self.lr_scale, "lr_scale", 0, None, low_inclusive=False)

    def _resolved(self, n_features: Optional[int] = None):
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
        lr = {k: v * self._lr_factor(n_features) for k, v in lr.items()}
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

    # --------------------------------------------------------------------- fit
    def fit(self, X, y=None, *, head: Optional[nn.Module] = None) -> "EDDP":
        """Learn the direction pairs.

        Parameters
        ----------
        X : tensor (N, D, H, W) or an ActivationStore
            Feature maps of the studied layer (a store is streamed; memory does not grow with it).
            (P, D) patch vectors are accepted too (treated as 1×1 maps).
        y : ignored
            Present for scikit-learn compatibility (EDDP learns without labels).
        head : nn.Module, optional, keyword only
            The frozen rest of the network f⁺: maps (N, D, H, W) -> logits (N, K). Enables the URA
            terms. Never trained, moved or switched to eval mode here; its gradients are not touched.

        Returns
        -------
        self

        Notes
        -----
        Several processes (an initialised ``torch.distributed`` process group, or ``torchrun``'s
        environment): every process calls ``fit`` with the same data, head and parameters; each
        reads a block of every streamed pass and a slice of every mini-batch, and the sums and
        gradients are added over the processes, so all end with the same pairs
        (``pairs_.meta["world_size"]``). They equal one process's fit up to the order of float
        additions; ``docs/scaling.md`` says what is equal and how closely.
        """
        self._validate_params()
        levels = self.resolved_levels()
        if len(levels) > 1:
            return self._fit_levels(X, head, levels)
        self.levels_ = levels
        t_start = time.perf_counter()
        source, data_device = _as_source(X)
        device = torch.device(Dist.rank_device(self.device)) if self.device is not None else \
            (data_device or torch.device("cpu"))
        gen = make_generator(self.random_state)
        D = source.n_features
        I, steps, weights, lr, tau, rho = self._resolved(D)
        batch_maps = self._batch_maps(source)
        head = self._prepared_head(head, source, device)
        if Dist.ensure_initialised(device):  # several processes: each reads its part of every pass
            Dist.same_generator(gen, self.random_state is not None)
            source = _RankSource(source)

        clock: Dict[str, float] = {}

        def lap(stage: str) -> None:  # seconds since the previous stage ended
            clock[stage] = time.perf_counter() - t_start - sum(clock.values())
        n_sample = (max(20_000, 1_000 * I) if self.max_init_patches == "auto"
                    else check_positive_int(self.max_init_patches, "max_init_patches"))
        stats = _stream_stats(source, batch_maps, n_sample, gen, device)
        if stats.n_patches < 2 * I:
            raise ValidationError(f"only {stats.n_patches} patches for {I} concepts; expected at least "
                                  f"{2 * I}. Pass more images or ask for fewer concepts.")
        lap("statistics")
        mu = stats.mean
        sigma = math.sqrt(max(float(torch.trace(stats.cov)) / D, 1e-30))
        self.n_features_in_ = D
        self.scale_ = sigma

        # ---- initialisation
        eps = check_in_range(self.whiten_eps, "whiten_eps", 0, None, low_inclusive=False)
        r_std = _soft_standard_scale(stats.cov, eps).to(device)  # x̃ -> soft-standardised, for step (a)
        Wt, bt, init_info, gains = self._initial_detectors(stats, source, batch_maps, I, eps, sigma, r_std,
                                                           (steps, weights, tau, rho), gen, device, lap)
        dec0, bias0 = self._to_original(Wt, bt, mu, sigma)
        S0 = self._pattern(source, dec0, bias0, batch_maps, device, self.shared_positives)
        lap("initial_signal_vectors")
        self.init_pairs_ = self._make_pairs(dec0, bias0, S0, mu, stage="init")

        # ---- refinement with the paper's losses
        floors = self._ic_floors(Wt, bt, (stats.sample - mu) / sigma, I, tau) if self.ic_floor == "start" else None
        data = self._refinement_data(stats, source, I, steps, device)
        n_patches = int(stats.n_patches)
        del stats  # the float64 sample is not needed any more
        params, history, constraints = self._refine(Wt, bt, S0, data, mu, head, (steps, weights, lr, tau, rho),
                                                    r_std, gen, floors)
        history = {"gains": gains, **history, **init_info, "refine_signals": self._refine_signals()}

        lap("refinement")
        dec, bias = self._to_original(self._decoders_t(params).double(), params["b"].double(), mu, sigma)
        S = self._pattern(source, dec, bias, batch_maps, device, self.shared_positives)
        self.pairs_ = self._make_pairs(dec, bias, S, mu, stage="final")
        if self.mode == "constrained":
            history["constraints"] = constraints
            self._record_constraints(constraints)
        lap("signal_vectors")
        history["seconds"] = sum(clock.values())
        history["stage_seconds"] = clock
        self.history_ = history
        logger.info("EDDP fit: %d concepts on %d patches of width %d in %.1f s", I, n_patches, D,
                    history["seconds"])
        return self

    def _prepared_head(self, head, source, device):
        """The head on the fit's device (a copy when it must move), checked against the data; None stays None."""
        if head is None:
            return None
        if getattr(source, "subsampled", False):
            raise ValidationError("this activation store holds randomly subsampled patches, not whole maps, "
                                  "so the head f+ cannot be applied to them; fit without a head "
                                  "(head=None) or extract the store without --subsample.")
        head = _head_on_device(head, device)
        self._check_head(head, source, device)
        return head

    def _refinement_data(self, stats, source, I: int, steps: dict, device) -> DataSpec:
        """What the refinement reads: the source in mini-batches, scaled by ``(x − μ)/σ``, and with
        step (d)'s signal vectors re-estimated (:meth:`_refine_signals`) the patch sample so scaled."""
        sample = None
        if self._refine_signals() == "pattern" and steps["d"] > 0:
            sample = _scaled_float32(stats.sample, stats.mean, self.scale_, device)
        return DataSpec(source=source, batch_maps=self._batch_maps(source, I), mu=stats.mean.float(),
                        sigma=float(self.scale_), device=device, sample=sample)

    def _initial_detectors(self, stats, source, batch_maps: int, I: int, eps: float, sigma: float, r_std, schedule,
                           gen, device, lap):
        """Where the refinement starts, in the scaled space: the clustering initialisation and its passes
        (``init="cluster"``) or random unit filters in the soft-standardised space of step (a); then,
        with ``init_gain``, the gains calibrated. ``schedule`` is ``(steps, weights, tau, rho)``.
        Returns ``(Wt, bt, init_info, gains record)``; ``init_info`` holds the history entries of the
        clustering initialisation (``"replaced_detectors"``, and ``"discriminant_passes"`` when they ran)."""
        steps, weights, tau, rho = schedule
        init_info = {}
        if self.init == "cluster":
            Wt, bt, init_info = self._cluster_detectors(stats, source, batch_maps, I, eps, sigma, gen, device, lap)
        else:
            v = torch.randn(I, r_std.shape[0], generator=gen).double().to(device)
            Wt = 4.0 * v / v.norm(dim=1, keepdim=True) * r_std.double()[None, :]
            bt = torch.zeros(I, dtype=torch.float64, device=device)
            lap("initialisation")
        gains = {"init": Wt.norm(dim=1).tolist()}
        if self.init_gain is not None:
            first = next(p for p in "bda" if steps[p] > 0) if any(steps.values()) else "b"
            Wt, bt = _calibrate_gains(Wt, bt, (stats.sample - stats.mean) / sigma, self.init_gain, weights[first],
                                      tau[first], min(0.95, rho[first] * tau[first] / I), self.gamma,
                                      sb_claimed=self.sb_patches == "claimed")
        gains["start"] = Wt.norm(dim=1).tolist()
        return Wt, bt, init_info, gains

    def _ic_floors(self, Wt, bt, x, I: int, tau: dict) -> dict:
        """τ per schedule step for L_ic: the numbers of ``tau`` (``ic_floor="paper"``), or with
        ``"start"`` one per detector, τ_i = I · min(τ/I, r_i / 2), r_i = E[y^γ] of the starting
        detectors ``(Wt, bt)`` over the scaled sample ``x``."""
        how = self.ic_floor
        if how not in ("paper", "start"):
            raise ValidationError(f"ic_floor must be 'paper' or 'start'; got {self.ic_floor!r}.")
        if how == "paper":
            return dict(tau)
        with torch.no_grad():
            Wd, bd = Wt.double().to(x.device), bt.double().to(x.device)
            rate = torch.zeros(Wd.shape[0], dtype=torch.float64, device=x.device)
            for i in range(0, x.shape[0], 8192):
                rate += (torch.sigmoid(x[i:i + 8192].double() @ Wd.T - bd) ** self.gamma).sum(0)
            rate = (rate / max(1, x.shape[0])).cpu()
        return {k: torch.minimum(torch.full_like(rate, float(v)), I * rate / 2).float() for k, v in tau.items()}

    def _refine_signals(self) -> str:
        """Step (d)'s signal vectors: ``refine_signals``, with ``"auto"`` ``"pattern"`` from random detectors
        (``init="random"``) and ``"learned"`` from the clustering initialisation (the value is checked by
        the constraints table when ``fit`` starts)."""
        if self.refine_signals == "auto":
            return "pattern" if self.init == "random" else "learned"
        return self.refine_signals

    def _n_init(self, I: int) -> int:
        """k-means++ restarts for ``I`` concepts (``n_init="auto"``: 8 up to 16 concepts, 4 above)."""
        if isinstance(self.n_init, str) and self.n_init == "auto":
            return 8 if I <= 16 else 4
        return check_positive_int(self.n_init, "n_init")

    def _record_constraints(self, constraints) -> None:
        """Constrained mode: whether every bound holds at the end, on the estimator and in the pairs' meta."""
        self.constraints_hold_ = all(c["all_hold"] for c in constraints.values()) if constraints else None
        self.pairs_ = self.pairs_.with_meta(
            constraints_hold=self.constraints_hold_,
            constraints={p: {k: c["holds"] for k, c in v["terms"].items()} for p, v in constraints.items()})

    def _cluster_detectors(self, stats, source, batch_maps: int, I: int, eps: float, sigma: float, gen, device,
                           lap):
        """Steps 2–4 of the fit: the clustering initialisation on the sample, then the discriminant passes
        over every patch. Returns scaled-space detectors ``(Wt, bt)`` and their history entries:
        ``"replaced_detectors"`` (:func:`replace_redundant`) and, when they ran, ``"discriminant_passes"``."""
        # the passes add the patches the sample left out; when it holds them all they have nothing to add
        # (the hard setting, 16 000 patches all sampled: matched IoU 0.959 with two passes, 0.962 without).
        # When they run, the re-clustering rounds on the sample are skipped: the passes redo them on every
        # patch (scale setting, 64 concepts, 200k patches, seed 0: IoU 0.892 after 1 or 5 rounds, 7 s less);
        # when no pass can be kept, the rounds run after all
        passes = check_positive_int(self.discriminant_passes, "discriminant_passes", minimum=0)
        passes = passes if stats.sample.shape[0] < int(stats.n_patches) else 0
        Wt, bt, space = cluster_init(stats, I, whiten_eps=eps, n_init=self._n_init(I),
                                     init_rounds=1 if passes else self.init_rounds, gen=gen,
                                     noise_floor=self.noise_floor, labeler=getattr(self, "_init_labeler", None),
                                     seeding=self.seeding)
        lap("initialisation")
        init_info = {"replaced_detectors": space["replaced"]}
        if not passes:
            return Wt, bt, init_info
        z = ZSpace(mu=stats.mean.to(device), proj=space["proj"].to(device), sample=space["sample"])
        cov_z = space["proj"].T @ stats.cov @ space["proj"]
        Wz, bz, info = discriminant_passes(source, batch_maps, z, cov_z, space["Wz"], space["bz"], passes, device,
                                           progress_bar=self.progress)
        if not info["changed"] and self.init_rounds > 1:
            # no pass could be kept (the starting detectors leave a group empty): the rounds on the sample instead
            Wz, bz, _ = recluster_rounds(space["sample"], space["labels"], Wz, bz, I, self.init_rounds - 1)
            info["rounds_instead"] = True
        lap("discriminant_passes")
        return to_scaled(Wz, bz, space["proj"], sigma) + ({**init_info, "discriminant_passes": info},)

    def _refine(self, Wt, bt, S0, data: DataSpec, mu, head, schedule, r_std, gen, floors=None):
        """The paper's schedule steps (a), (b), (d) from scaled-space detectors ``Wt``, ``bt`` and signal
        vectors ``S0``; ``schedule`` is ``(steps, weights, lr, tau, rho)`` as :meth:`_resolved` gives them;
        ``floors``: L_ic's τ per step (:meth:`_ic_floors`; default ``tau``). Returns the final parameters, the
        per-step histories and the constraint checks."""
        steps, weights, lr, tau, rho = schedule
        I, D = Wt.shape
        source, batch_maps, device = data.source, data.batch_maps, data.device
        history: Dict[str, Dict[str, list]] = {}
        total = sum(steps.values())
        bar = progress(total=total, enabled=self.progress, desc="EDDP")
        params = {
            "v": (Wt / Wt.norm(dim=1, keepdim=True)).float().clone(),
            "log_g": Wt.norm(dim=1).clamp_min(1e-3).log().float().clone(),
            "b": bt.float().clone(),
        }
        mu32, sigma = data.mu, data.sigma
        to_model = (lambda m: m * sigma + mu32[None, :, None, None]) if head is not None else None
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
                    # (c): signal vectors from the positive-only estimator for the current filters; the
                    # paper's (shared_positives="split" there moved the demo's layer4 S1 15.27 -> 14.79)
                    dec, bias = self._to_original(self._decoders_t(params), params["b"].double(), mu, sigma)
                    S_scaled = self._pattern(source, dec, bias, batch_maps, device).float()
                    S_scaled = S_scaled / S_scaled.norm(dim=1, keepdim=True)
                tau_ic = tau[phase] if floors is None else floors[phase]
                spec = PhaseSpec(phase=phase, n_steps=steps[phase], weights=weights[phase], lr=lr[phase],
                                 tau=tau_ic.to(device) if torch.is_tensor(tau_ic) else tau_ic,
                                 rho=min(0.95, rho[phase] * tau[phase] / I), gamma=self.gamma,
                                 kappa=tuple(self.kappa), mode=self.mode, patience=self.patience, feat_scale=scale,
                                 sb_claimed=self.sb_patches == "claimed")
                history[phase] = run_phase(spec, data, params, S_scaled if phase == "d" else None, head, to_model,
                                           gen, bar)
                if self.mode == "constrained":
                    vals = final_terms(spec, data, params, gen)
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

        return params, history, constraints

    def _batch_maps(self, source, n_concepts: Optional[int] = None) -> int:
        """Whole maps per chunk of a streamed pass, or (``n_concepts`` given) per mini-batch of the
        refinement: enough for at least ``batch_patches`` patches (see ``batch_patches`` for "auto")."""
        H, Wd = source.map_shape
        stream_auto = n_concepts is None and isinstance(self.batch_patches, str) and self.batch_patches == "auto"
        patches = _STREAM_PATCHES if stream_auto else self.resolved_batch_patches(n_concepts)
        return max(1, math.ceil(patches / (H * Wd)))

    def resolved_batch_patches(self, n_concepts: Optional[int] = None) -> int:
        """Patches per mini-batch of the refinement (see ``batch_patches``) for ``n_concepts`` detectors
        (default: this estimator's ``n_concepts``)."""
        if isinstance(self.batch_patches, str) and self.batch_patches == "auto":
            I = check_positive_int(self.n_concepts if n_concepts is None else n_concepts, "n_concepts")
            return max(_STREAM_PATCHES, _BATCH_PER_CONCEPT * I)
        return check_positive_int(self.batch_patches, "batch_patches")

    def _fit_levels(self, X, head, levels) -> "EDDP":
        """The finest level, then the coarser ones from its Ward tree (see the module docstring)."""
        t_start = time.perf_counter()
        gen = make_generator(self.random_state)
        if Dist.ensure_initialised(None if self.device is None else Dist.rank_device(self.device)):
            Dist.same_generator(gen, self.random_state is not None)
        seeds = [int(v) for v in torch.randint(0, 2**31 - 1, (len(levels),), generator=gen)]
        params = {k: v for k, v in self.get_params().items() if k not in ("n_concepts", "levels", "random_state")}
        logger.info("EDDP finest level: %d concepts", levels[-1])
        fine = EDDP(n_concepts=levels[-1], levels=None, random_state=seeds[-1], **params).fit(X, head=head)
        Pf = fine.pairs_
        source, data_device = _as_source(X)
        device = torch.device(Dist.rank_device(self.device)) if self.device is not None else \
            (data_device or torch.device("cpu"))
        batch_maps = self._batch_maps(source)
        if Dist.is_distributed():  # this rank's block of the batches; the sums are added below
            source = _RankSource(source)
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
        if Dist.is_distributed():
            Dist.all_reduce_sum_(sums, "adding the concept centroids")
            Dist.all_reduce_sum_(counts, "adding the concept centroids")
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

    @staticmethod
    def _pattern(source, W, b, batch_maps, device, shared: str = "full") -> torch.Tensor:
        """Positive-only pattern estimator ŝ_i = cov[x, z_i] / var[z_i] over {x: z_i > b_i} (streamed);
        ``shared`` as :class:`~unveil.directions.pattern.PositivePattern`."""
        acc = PositivePattern(W.to(device), b.to(device), shared)
        if isinstance(source, _RankSource):  # this rank's batches, about one process's shift; sums added below
            acc.shift = _patches(source.batch(0, batch_maps).to(device)).double().mean(0)
        for maps in source.iter_maps(batch_maps):
            acc.update(_patches(maps.to(device)))
        if isinstance(source, _RankSource):
            for t in acc.sums():
                Dist.all_reduce_sum_(t, "adding the signal-vector sums")
        S, ok = acc.result()
        if not ok.all():
            bad = (~ok).nonzero().flatten().tolist()
            logger.warning("concepts %s fire on fewer than 2 patches (or on constant values); their signal "
                           "vectors fall back to their filter direction.", bad)
            Wb = W.double().to(device)[bad]
            S[bad] = Wb / (Wb * Wb).sum(1, keepdim=True)
        return S

    def _make_pairs(self, W, b, S, mu, stage):
        Su = S / S.norm(dim=1, keepdim=True).clamp_min(1e-30)
        meta = {"method": "EDDP", "stage": stage, "n_concepts": W.shape[0],
                "params": {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list, tuple)) else repr(v))
                           for k, v in self.get_params().items()},
                "random_state": self.random_state if isinstance(self.random_state, int) else None,
                "world_size": Dist.world_size()}
        return DirectionPairs(W.float(), b.float(), Su.float(), mu.float(), meta=meta)

    # ------------------------------------------------------------- sklearn API
    def fit_transform(self, X, y=None, *, head=None) -> torch.Tensor:
        """Fit, then return the signal values of ``X`` (N, I, H, W)."""
        return self.fit(X, head=head).transform(X)
