"""Concept influence on the prediction: RCAV scores with a permutation null (method.md §8).

For class k and encoding direction i (Pfau et al. 2020, "RCAV"):

* ``u_i = α · ŝ_i / ‖ŝ_i‖₂`` (``normalize=True``, default) — the unit signal vector scaled by α — or
  ``u_i = α · ŝ_i`` (``normalize=False``: since ``w_iᵀŝ_i = 1`` this raises concept i's signal
  value by exactly α). ``u_i`` is added at every spatial position: ``X'[:, :, h, w] = X[:, :, h, w] + u_i``.
* The head f⁺ maps ``X'`` to logits; ``Δp = softmax(f⁺(X'))_k − softmax(f⁺(X))_k`` on every image of
  class k (the image's label); ``sign(Δp)`` counts 0 when ``|Δp| ≤ tol`` (float noise).
* ``score(i, k) = mean over class-k images of sign(Δp)`` ∈ [−1, 1].

Significance. For each direction i a null distribution of scores comes from ``n_permutations``
"noise" signal vectors made from label-permuted detector rules: the detector's positive patches
(``w_iᵀx − b_i > 0``) are replaced by a random patch set with the same firing rate (each patch of the
data independently with probability ``n_pos_i / n_patches``; a Bernoulli version of permuting the
positive labels, so that it streams), and the positive-only pattern estimator of method.md §3 is
re-run on it: ``ŝ' = cov[x, z] / var[z]`` over the random set, ``z = w_iᵀx``. Each noise vector is
scaled like the real one and scored on the same images. The test is two-sided: with null mean m
and standard deviation s (ddof 1) over the n valid permutations, ``t = (score − m) /
(s' · sqrt(1 + 1/n))`` with ``s' = max(s, 1/n_k)`` (a score moves in steps of 1/n_k, so a null
without spread is never treated as infinitely precise), and ``p = 2·P(T_{n−1} > |t|)`` (the
prediction-interval t-test of a new observation against a sample). The empirical permutation
p-value ``(1 + #{|null − m| ≥ |score − m|}) / (n + 1)`` is reported too, but cannot go below
1/(n+1), far above a Bonferroni level, so it is not used for the decision. A pair (i, k) is
significant when ``p < significance / (I · K)`` (Bonferroni over the I directions and the K classes
that have images). SDC = directions significant for at least one class; SCDP = significant
(class, direction) pairs.

``null="pooled"`` instead draws ``n_permutations`` noise vectors in total (permutation p uses
detector ``p mod I``'s rule) and compares every direction with that one null per class.

Note on the per-direction null: a random patch set with the detector's firing rate estimates about
the *all-patch* pattern of ``w_i`` (whose spread over permutations is only ~1/sqrt(n_pos)), so the
test asks "does the positive-only signal vector act differently from the all-patch pattern of the
same filter?". The null is narrow; with many patches small systematic differences become
significant (on relu'd Gaussian noise with I = 64 fitted-style pattern encoders and a random linear
head, 23–28 of 64 directions came out significant; with ``null="pooled"``, 0).

Cost. The head runs on ``N · I · (n_permutations + 1)`` shifted maps (``N · (I + n_permutations)``
with ``null="pooled"``) plus N for the base, in chunks of ``chunk_elements`` floats; with
``pooled_head`` (heads that start with a global average pool) each evaluation is on a D-vector
instead of a D×H×W map. The noise vectors cost ``O(n_permutations · I · N·H·W · D)``
multiply-adds (dense masked matrix products) and ``n_permutations · I · N·H·W`` random numbers.
Memory is O(chunk_elements + n_permutations · I · D), independent of N when maps stream.
``n_permutations=0`` gives scores only. Measured on a shared 2-core CPU (load ~8),
``OMP_NUM_THREADS=1``, N = 600 maps of 128 × 8 × 8, I = 64, K = 6, pool → linear head, 100
permutations, per-direction null: 39 s wall / 17 s CPU on the generic per-map path (3.9 M shifted
maps), 11 s wall / 4.5 s CPU with ``pooled_head`` (the noise vectors dominate); ``null="pooled"``:
1.4 s generic, 0.7 s with ``pooled_head``. Under heavy contention two OpenMP threads were slower
than one (thread synchronisation on many small ops).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .._errors import HeadError, ValidationError
from .._progress import progress as _progress
from .._validation import check_in_range, check_maps, check_positive_int, make_generator

__all__ = ["InfluenceResult", "rcav", "noise_signal_vectors"]

logger = logging.getLogger("unveil")


# --------------------------------------------------------------------------- data access
class _Maps:
    """Re-iterable access to maps: one (N, D, H, W) tensor, a list of batches, or a factory of iterators."""

    def __init__(self, maps, batch_size: int, n_features: int, device):
        self.batch_size = batch_size
        self.n_features = n_features
        self.device = device
        if isinstance(maps, (torch.Tensor, np.ndarray)):
            self.tensor = check_maps(maps, "maps", n_features=n_features, allow_patches=False,
                                     context="the direction pairs")
            self.factory = None
            self.n = int(self.tensor.shape[0])
        else:
            self.tensor = None
            if callable(maps) and not hasattr(maps, "__iter__"):
                self.factory = maps
            elif hasattr(maps, "__iter__") and iter(maps) is not maps:
                self.factory = lambda: iter(maps)
            else:
                raise ValidationError(
                    "maps must be an (N, D, H, W) tensor, a re-iterable of batches (a list, an activation "
                    "store) or a zero-argument callable returning a fresh iterator; a one-shot iterator "
                    "cannot be read the several times RCAV needs.")
            self.n = None

    def __iter__(self):
        if self.tensor is not None:
            for s in range(0, self.n, self.batch_size):
                yield s, self.tensor[s:s + self.batch_size].to(self.device or self.tensor.device)
            return
        start = 0
        for b in self.factory():
            if isinstance(b, (tuple, list)):
                b = b[0]
            b = check_maps(b, "maps batch", n_features=self.n_features, allow_patches=False,
                           context="the direction pairs")
            b = b.to(self.device or b.device)
            yield start, b
            start += b.shape[0]
        if self.n is None:
            self.n = start
        elif self.n != start:
            raise ValidationError(f"the maps iterator gave {start} maps on one pass and {self.n} on an "
                                  f"earlier one; it must give the same maps every time.")


# --------------------------------------------------------------------------- noise vectors
def noise_signal_vectors(maps, pairs, n_permutations: int = 100, *, random_state=0, batch_size: int = 256,
                         max_elements: int = 2 ** 24, device=None):
    """Signal vectors of label-permuted detector rules (the RCAV null of method.md §8).

    For detector i, a random patch set with the detector's firing rate replaces its positive set
    (every patch drawn independently with probability ``n_pos_i / n_patches``), and
    ``ŝ' = cov[x, z] / var[z]``, ``z = w_iᵀx``, is computed over it, in one stream.

    Parameters
    ----------
    maps : (N, D, H, W) tensor, re-iterable of batches, or callable returning an iterator
    pairs : DirectionPairs
    n_permutations : int

    Returns
    -------
    vectors : (n_permutations, I, D) float32 tensor (rows of NaN where undefined: < 2 patches drawn
        or var[z] = 0)
    rate : (I,) float64 tensor — the firing rates used

    Examples
    --------
    >>> import torch
    >>> from unveil import DirectionPairs
    >>> p = DirectionPairs(torch.eye(4)[:2], torch.zeros(2), torch.eye(4)[:2])
    >>> v, r = noise_signal_vectors(torch.randn(20, 4, 3, 3), p, 5)
    >>> tuple(v.shape)
    (5, 2, 4)
    """
    n_permutations = check_positive_int(n_permutations, "n_permutations")
    src = maps if isinstance(maps, _Maps) else _Maps(maps, check_positive_int(batch_size, "batch_size"),
                                                     pairs.n_features, device)
    gen = None
    W = b = None
    counts = None
    n_patches = 0
    shift = None
    for _, X in src:
        if W is None:
            W, b = pairs.decoders.to(X.device), pairs.biases.to(X.device)
            counts = torch.zeros(pairs.n_concepts, dtype=torch.float64)
        Xp = X.permute(0, 2, 3, 1).reshape(-1, X.shape[1])
        if shift is None:
            shift = Xp.mean(0)
        counts += ((Xp @ W.T) > b).sum(0).double().cpu()
        n_patches += Xp.shape[0]
    rate = counts / max(n_patches, 1)
    n_det, d = pairs.n_concepts, pairs.n_features
    Sn = torch.zeros(n_permutations, n_det, dtype=torch.float64)
    Sz = torch.zeros_like(Sn)
    Szz = torch.zeros_like(Sn)
    Sx = torch.zeros(n_permutations, n_det, d, dtype=torch.float64)
    Sxz = torch.zeros_like(Sx)
    for _, X in src:
        if gen is None:
            gen = make_generator(random_state, device=X.device)
        Xc = X.permute(0, 2, 3, 1).reshape(-1, X.shape[1]) - shift  # cov is shift invariant; less cancellation
        Zt = W @ Xc.T  # (I, n): patches last, so the masked sums below are contiguous matrix products
        r = rate.to(device=X.device, dtype=X.dtype)[:, None]
        n = Xc.shape[0]
        pc = max(1, min(n_permutations, max_elements // max(1, 2 * n * n_det)))
        for p0 in range(0, n_permutations, pc):
            p1 = min(n_permutations, p0 + pc)
            A = torch.empty((p1 - p0, 2 * n_det, n), device=X.device, dtype=X.dtype)
            m, mz = A[:, :n_det], A[:, n_det:]
            torch.lt(torch.rand((p1 - p0, n_det, n), generator=gen, device=X.device, dtype=X.dtype), r, out=m)
            torch.mul(m, Zt, out=mz)
            Sn[p0:p1] += m.sum(-1).double().cpu()
            Sz[p0:p1] += mz.sum(-1).double().cpu()
            Szz[p0:p1] += (mz * Zt).sum(-1).double().cpu()
            prod = (A.reshape(-1, n) @ Xc).reshape(p1 - p0, 2 * n_det, d).double().cpu()
            Sx[p0:p1] += prod[:, :n_det]
            Sxz[p0:p1] += prod[:, n_det:]
    nn_ = Sn.clamp_min(1.0)
    cov = Sxz - Sx * (Sz / nn_)[..., None]
    var = Szz - Sz * Sz / nn_
    ok = (Sn >= 2) & (var > 1e-12 * Szz.abs().clamp_min(1e-300))
    vec = cov / var.clamp_min(1e-300)[..., None]
    vec[~ok] = float("nan")
    return vec.float(), rate


# --------------------------------------------------------------------------- result
@dataclass
class InfluenceResult:
    """Outcome of :func:`rcav`.

    Attributes
    ----------
    scores : (I, K) — mean sign of Δp(k) over class-k images (NaN for classes without images)
    p_values : (I, K) — two-sided parametric p-values against the permutation null (NaN: no null)
    p_values_empirical : (I, K) — permutation p-values (>= 1/(n+1); not used for decisions)
    significant : (I, K) bool — p < significance / (I · K)
    null_mean, null_std : (I, K); null_scores : (n_permutations, I, K)
    class_counts : (K,) images per class; sdc, scdp : int
    concept_names, class_names : list of str; config : dict
    """

    scores: np.ndarray
    p_values: np.ndarray
    p_values_empirical: np.ndarray
    significant: np.ndarray
    null_mean: np.ndarray
    null_std: np.ndarray
    null_scores: np.ndarray
    class_counts: np.ndarray
    sdc: int
    scdp: int
    concept_names: List[str]
    class_names: List[str]
    config: Dict[str, Any] = field(default_factory=dict)

    def top_concepts(self, n: int = 5) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
        """Per class: the (at most n) significant directions with the largest positive / negative scores."""
        out = {}
        for k, cname in enumerate(self.class_names):
            sig = np.nonzero(self.significant[:, k])[0]
            s = self.scores[sig, k]
            pos = sig[np.argsort(-s, kind="stable")]
            neg = sig[np.argsort(s, kind="stable")]

            def rows(ids, sign):
                return [{"direction": int(i), "concept": self.concept_names[i], "score": float(self.scores[i, k]),
                         "p_value": float(self.p_values[i, k])}
                        for i in ids if sign * self.scores[i, k] > 0][:n]
            out[cname] = {"positive": rows(pos, 1), "negative": rows(neg, -1)}
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        def clean(a):
            a = np.asarray(a, dtype=np.float64)
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]
        return {"sdc": int(self.sdc), "scdp": int(self.scdp), "scores": clean(self.scores),
                "p_values": clean(self.p_values), "p_values_empirical": clean(self.p_values_empirical),
                "significant": self.significant.astype(bool).tolist(), "null_mean": clean(self.null_mean),
                "null_std": clean(self.null_std), "class_counts": self.class_counts.astype(int).tolist(),
                "concept_names": list(self.concept_names), "class_names": list(self.class_names),
                "top_concepts": self.top_concepts(), "config": dict(self.config)}


# --------------------------------------------------------------------------- scoring
def _head_probs(head, X: torch.Tensor, n_classes: Optional[int]) -> torch.Tensor:
    try:
        out = head(X)
    except Exception as exc:  # noqa: BLE001 - reported with context
        raise HeadError(f"the head failed on maps of shape {tuple(X.shape)} ({type(exc).__name__}: {exc}); "
                        f"it must map (N, D, H, W) feature maps of the studied layer to logits (N, K).") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != X.shape[0] or \
            (n_classes is not None and out.shape[1] != n_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HeadError(f"the head returned {shape} for maps of shape {tuple(X.shape)}; expected logits "
                        f"({X.shape[0]}, K). Wrap the head so it returns a (N, K) tensor.")
    return torch.softmax(out.double(), dim=1)


def _check_pooled_head(head, pooled_head, X: torch.Tensor, U: torch.Tensor) -> None:
    """Verify head(X + u) == pooled_head(mean_hw(X) + u) on a few maps and shifts, or raise HeadError."""
    Xf = X[:4]
    idx = torch.linspace(0, U.shape[0] - 1, steps=min(3, U.shape[0])).round().long()
    shifts = torch.cat([torch.zeros(1, U.shape[1], dtype=U.dtype), U[idx]], 0).to(device=X.device, dtype=X.dtype)
    with torch.no_grad():
        for u in shifts:
            full = head(Xf + u[None, :, None, None])
            fast = pooled_head(Xf.mean(dim=(2, 3)) + u[None])
            if not isinstance(fast, torch.Tensor) or fast.shape != full.shape or \
                    not torch.allclose(fast.double(), full.double(), rtol=1e-4, atol=1e-4 * (1 + float(full.abs().max()))):
                raise HeadError(
                    "pooled_head does not reproduce the head: head(X + u) and pooled_head(mean over H, W of X, "
                    "plus u) differ on a test batch. Pass pooled_head only when the head starts with a global "
                    "average pool (e.g. pooled_head=head.fc for pool -> linear), or leave it None.")


def _t_two_sided_p(t, df) -> np.ndarray:
    """Two-sided Student-t p-value ``P(|T_df| >= |t|) = I_{df/(df+t²)}(df/2, 1/2)`` (NaN stays NaN)."""
    from scipy.special import betainc  # lighter than scipy.stats
    t = np.asarray(t, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        x = df / (df + t * t)
    return betainc(df / 2.0, 0.5, x)


def _sign_sums(src: _Maps, labels: torch.Tensor, U: torch.Tensor, head, n_classes: int, tol: float,
               chunk_elements: int, bar, pooled_head=None) -> torch.Tensor:
    """Σ over images of class k of sign(Δp_k) for each direction row of U: (J, K) float64."""
    J = U.shape[0]
    sums = torch.zeros(J, n_classes, dtype=torch.float64)
    buf = None
    for start, X in src:
        b, d, h, w = X.shape
        if start + b > labels.shape[0]:
            raise ValidationError(f"labels has {labels.shape[0]} entries but the maps give more; pass one "
                                  f"label per map.")
        y = labels[start:start + b].to(X.device)
        onehot = torch.nn.functional.one_hot(y, n_classes).double()
        Ud = U.to(device=X.device, dtype=X.dtype)
        if pooled_head is not None:
            base_in = X.mean(dim=(2, 3))  # (b, D): a spatially constant shift commutes with the pool
            f = pooled_head
            per_map = d
        else:
            base_in = X
            f = head
            per_map = d * h * w
        bi = max(1, min(b, chunk_elements // per_map))
        with torch.no_grad():
            for i0 in range(0, b, bi):
                Xi = base_in[i0:i0 + bi]
                nb = Xi.shape[0]
                yi = y[i0:i0 + bi]
                base = _head_probs(f, Xi, n_classes).gather(1, yi[:, None])  # (nb, 1)
                jc = max(1, chunk_elements // (nb * per_map))
                for j0 in range(0, J, jc):
                    j1 = min(J, j0 + jc)
                    shape = (nb, j1 - j0) + tuple(Xi.shape[1:])
                    if buf is None or buf.numel() < math.prod(shape):
                        buf = torch.empty(math.prod(shape), device=X.device, dtype=X.dtype)
                    out = buf[:math.prod(shape)].view(shape)
                    if pooled_head is not None:
                        torch.add(Xi[:, None], Ud[None, j0:j1], out=out)
                    else:
                        torch.add(Xi[:, None], Ud[None, j0:j1, :, None, None], out=out)
                    p = _head_probs(f, out.view((-1,) + tuple(Xi.shape[1:])), n_classes).reshape(nb, j1 - j0, n_classes)
                    dp = p.gather(2, yi[:, None, None].expand(nb, j1 - j0, 1))[..., 0] - base
                    sgn = torch.where(dp.abs() <= tol, torch.zeros_like(dp), torch.sign(dp))
                    sums[j0:j1] += (sgn.T @ onehot[i0:i0 + bi]).cpu()
        bar.update(b)
    return sums


def rcav(maps, labels, pairs, head, *, alpha: float = 5.0, normalize: bool = True,
         n_permutations: int = 100, null: str = "per_direction", significance: float = 0.05,
         tol: float = 1e-6, pooled_head: Optional[Callable] = None,
         random_state=0, batch_size: int = 256, chunk_elements: int = 2 ** 22,
         concept_names: Optional[Sequence[str]] = None, class_names: Optional[Sequence[str]] = None,
         device=None, progress: bool = False) -> InfluenceResult:
    """RCAV influence of every encoding direction on every class, with permutation significance.

    Parameters
    ----------
    maps : (N, D, H, W) tensor, a re-iterable of batches (list, activation store; a batch may be
        ``(maps, ...)``), or a zero-argument callable returning a fresh iterator of batches. It is
        read 3 times (firing rates, noise vectors, scores).
    labels : (N,) ints
        Class of each image, in the order of ``maps``; class-k images score class k.
    pairs : DirectionPairs
        ``encoders`` are the directions ŝ_i; ``decoders``/``biases`` define the detector rules for the null.
    head : nn.Module or callable
        f⁺: maps (M, D, H, W) -> logits (M, K); used as given (not moved, not switched to eval).
    alpha : float
        Step length (see ``normalize``); 5 by default.
    normalize : bool
        True: add ``α · ŝ_i/‖ŝ_i‖``; False: add ``α · ŝ_i`` (raises concept i's signal value by α).
    n_permutations : int
        Noise vectors per direction (0: no significance test, p-values NaN).
    null : {"per_direction", "pooled"}
        ``"per_direction"`` (default, method.md §8): direction i is compared with noise vectors of its
        own permuted detector rule, ``n_permutations · I`` noise directions to score. ``"pooled"``:
        ``n_permutations`` noise vectors in total (permutation p uses detector ``p mod I``'s rule),
        one null per class shared by all directions; I + n_permutations directions to score.
    significance : float
        Family-wise level, Bonferroni-corrected over I × K.
    tol : float
        ``|Δp| <= tol`` counts as no change (sign 0).
    pooled_head : callable, optional
        Fast path for heads that start with a global average pool: ``g`` with
        ``head(X) == g(X.mean((2, 3)))`` (e.g. ``head.fc`` of a pool -> linear head). A spatially
        constant shift commutes with the pool, so every evaluation costs O(D) instead of O(D·H·W).
        Checked against ``head`` on a few maps and shifts (:class:`HeadError` if they differ).
    random_state : int, Generator or None
    batch_size : int
        Images per batch when ``maps`` is one tensor.
    chunk_elements : int
        Floats per head call (shifted maps are built chunk by chunk).
    concept_names, class_names : optional names (default ``pairs.names`` and ``"class_<k>"``).
    device : torch device for the maps (default: where they are). The head is not moved.
    progress : bool

    Returns
    -------
    InfluenceResult

    Examples
    --------
    >>> import torch
    >>> from unveil import DirectionPairs
    >>> from unveil.data.synthetic import PoolLinearHead
    >>> head = PoolLinearHead(4, 2)
    >>> pairs = DirectionPairs(torch.eye(4)[:2], torch.zeros(2), torch.eye(4)[:2])
    >>> res = rcav(torch.randn(10, 4, 2, 2), torch.arange(10) % 2, pairs, head, n_permutations=3)
    >>> res.scores.shape
    (2, 2)
    """
    alpha = check_in_range(alpha, "alpha")
    significance = check_in_range(significance, "significance", 0.0, 1.0, low_inclusive=False)
    tol = check_in_range(tol, "tol", 0.0)
    n_perm = check_positive_int(n_permutations, "n_permutations", minimum=0)
    if null not in ("per_direction", "pooled"):
        raise ValidationError(f"null must be 'per_direction' or 'pooled', got {null!r}.")
    batch_size = check_positive_int(batch_size, "batch_size")
    chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
    src = _Maps(maps, batch_size, pairs.n_features, device)
    y = torch.as_tensor(np.asarray(labels))
    if y.dim() != 1 or y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValidationError(f"labels must be a 1-D sequence of integer classes, got shape {tuple(y.shape)} "
                              f"and dtype {y.dtype}.")
    y = y.long()
    if src.n is not None and y.shape[0] != src.n:
        raise ValidationError(f"labels has {y.shape[0]} entries for {src.n} maps; pass one label per map.")
    # the number of classes from one head call on the first map
    first_batch = next(iter(src))[1]
    with torch.no_grad():
        n_classes = int(_head_probs(head, first_batch[:1], None).shape[1])
    if y.numel() and (y.min() < 0 or y.max() >= n_classes):
        raise ValidationError(f"labels must lie in [0, {n_classes - 1}] (the head gives {n_classes} logits), "
                              f"got values in [{int(y.min())}, {int(y.max())}].")
    n_det = pairs.n_concepts
    S = pairs.encoders.double()
    norms = S.norm(dim=1)
    if normalize and (norms < 1e-12).any():
        raise ValidationError(f"encoders {torch.nonzero(norms < 1e-12).flatten().tolist()} are zero vectors; "
                              f"they cannot be normalized.")
    scale = (lambda V: alpha * V / V.norm(dim=-1, keepdim=True)) if normalize else (lambda V: alpha * V)
    U = [scale(S)]
    n_rows = n_perm if null == "pooled" else n_perm * n_det  # noise directions to score
    row_ok = torch.zeros(n_rows, dtype=torch.bool)
    if n_perm:
        per_det = math.ceil(n_perm / n_det) if null == "pooled" else n_perm
        noise, rate = noise_signal_vectors(src, pairs, per_det, random_state=random_state,
                                           max_elements=4 * chunk_elements)
        # pooled: permutation p uses detector p mod I (each detector's rule in turn), shared by all directions
        noise = noise.double().reshape(-1, pairs.n_features)[:n_rows]
        row_ok = torch.isfinite(noise).all(-1)
        if normalize:
            row_ok &= noise.nan_to_num(0.0).norm(dim=-1) > 1e-12
        safe = torch.where(row_ok[:, None], noise, torch.ones(()).double())
        U.append(torch.where(row_ok[:, None], scale(safe), torch.zeros(()).double()))
        if null == "per_direction":
            bad = (~row_ok.reshape(n_perm, n_det)).all(0)
            if bad.any():
                logger.warning("rcav: no null for directions %s (their detectors fire on < 2 patches or z is "
                               "constant); they are never significant.", bad.nonzero().flatten().tolist())
    U = torch.cat(U, 0).float()
    if pooled_head is not None:
        _check_pooled_head(head, pooled_head, first_batch, U)
    bar = _progress(total=src.n, enabled=progress, desc="rcav", unit="map")
    sums = _sign_sums(src, y, U, head, n_classes, tol, chunk_elements, bar, pooled_head=pooled_head)
    bar.close()
    if src.n != y.shape[0]:
        raise ValidationError(f"labels has {y.shape[0]} entries for {src.n} maps; pass one label per map.")
    counts = torch.bincount(y, minlength=n_classes).double()
    with np.errstate(invalid="ignore", divide="ignore"):
        all_scores = (sums / counts[None, :]).numpy()  # NaN for empty classes
    scores = all_scores[:n_det]
    has_class = counts.numpy() > 0
    k_eval = int(has_class.sum())
    if n_perm:
        if null == "pooled":
            null_s = np.broadcast_to(all_scores[n_det:][:, None, :], (n_perm, n_det, n_classes))
            ok = np.broadcast_to(row_ok.numpy()[:, None, None], null_s.shape)
        else:
            null_s = all_scores[n_det:].reshape(n_perm, n_det, n_classes)
            ok = np.broadcast_to(row_ok.numpy().reshape(n_perm, n_det)[..., None], null_s.shape)
        null_s = np.where(ok, null_s, np.nan)
        n_valid = ok.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (no null / empty class)
            m = np.nanmean(null_s, axis=0)
            sd = np.nanstd(null_s, axis=0, ddof=1)
        step = np.where(has_class, 1.0 / np.maximum(counts.numpy(), 1), np.nan)[None, :]
        sd_eff = np.fmax(np.nan_to_num(sd, nan=0.0), step)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = (scores - m) / (sd_eff * np.sqrt(1.0 + 1.0 / np.maximum(n_valid, 1)))
            p = _t_two_sided_p(t, np.maximum(n_valid - 1, 1))
            p = np.where((n_valid >= 2) & has_class[None, :], p, np.nan)
            exceed = (np.abs(null_s - m[None]) >= np.abs(scores - m)[None] - 1e-12) & ok
            p_emp = np.where((n_valid >= 1) & has_class[None, :], (1.0 + exceed.sum(0)) / (n_valid + 1.0), np.nan)
    else:
        null_s = np.zeros((0, n_det, n_classes))
        m = sd = p = p_emp = np.full((n_det, n_classes), np.nan)
    level = significance / max(1, n_det * k_eval)
    significant = np.nan_to_num(p, nan=1.0) < level
    sdc = int(significant.any(axis=1).sum())
    scdp = int(significant.sum())
    names = list(pairs.names if concept_names is None else concept_names)
    if len(names) != n_det:
        raise ValidationError(f"concept_names has {len(names)} entries for {n_det} directions.")
    cnames = [f"class_{k}" for k in range(n_classes)] if class_names is None else list(class_names)
    if len(cnames) != n_classes:
        raise ValidationError(f"class_names has {len(cnames)} entries but the head gives {n_classes} classes.")
    config = {"alpha": alpha, "normalize": bool(normalize), "n_permutations": n_perm,
              "significance": significance, "bonferroni_level": level, "n_tests": n_det * k_eval,
              "tol": tol, "random_state": random_state if isinstance(random_state, (int, type(None))) else "generator",
              "null": null, "pooled_head": pooled_head is not None, "test": "prediction-interval t, sd floored at 1/n_k",
              "n_maps": int(src.n)}
    logger.info("rcav: SDC=%d SCDP=%d (Bonferroni level %.3g over %d tests)", sdc, scdp, level, n_det * k_eval)
    return InfluenceResult(scores=scores, p_values=p, p_values_empirical=p_emp, significant=significant,
                           null_mean=m, null_std=sd, null_scores=np.ascontiguousarray(null_s), class_counts=counts.numpy().astype(np.int64),
                           sdc=sdc, scdp=scdp, concept_names=[str(x) for x in names], class_names=[str(c) for c in cnames],
                           config=config)
