"""Baselines that produce :class:`~unveil.directions.DirectionPairs`, so one scoring code applies.

Every baseline follows the estimator contract of :class:`~unveil.directions._base.DirectionEstimator`
(scikit-learn compatible: ``get_params``/``set_params``, ``clone``, ``check_is_fitted``):
``__init__`` stores hyperparameters, ``fit(X)`` validates them, takes feature maps ``(N, D, H, W)``
or patch vectors ``(P, D)`` and returns ``self``; the result is ``pairs_`` (decoders, biases,
encoders, mean), and ``transform(X)`` gives their signal values. Each method has a **label-free**
detection rule (except :class:`PatternCAV`, which is supervised by design), stated in its docstring
and recorded in ``pairs_.meta["detection_rule"]``:

============================  =======================  ========================  ===========================
method                        encoders (generative)    decoders (read-out)       detection (label-free)
============================  =======================  ========================  ===========================
:class:`PCABaseline`          principal axes           = encoders (orthonormal)  score > Otsu threshold
:class:`ICABaseline`          ICA mixing columns       ICA unmixing rows         score > Otsu threshold
:class:`NMFBaseline`          NMF components           rows of pinv(componentsᵀ)  coefficient > Otsu thresh.
:class:`KMeansBaseline`       centroid − data mean     rows of pinv(encodersᵀ)   nearest centroid
:class:`SphericalKMeans...`   cluster mean − data mean rows of pinv(encodersᵀ)   largest cosine to centroid
:class:`SparseAutoencoder`    decoder columns          encoder rows              ReLU unit active (> 0)
:class:`PatternCAV`           difference of means      logistic-regression filter  p(concept) > 0.5
============================  =======================  ========================  ===========================

"Score" is ``wᵀ(x − E[x])`` with each component's sign oriented so that its scores have positive
skewness (the concept's patches form the long upper tail; a label-free convention). The Otsu
threshold splits a component's score histogram into two classes with maximal between-class
variance (Otsu 1979), chosen without labels. Nearest-centroid and largest-cosine assignments are
not a hyperplane per concept; those pairs are :class:`DirectionPairs` with ``detection_rule="argmax"``,
whose ``detect`` is one-hot of the arg-max of affine scores (``pairs_.meta["detection_rule"]`` states
each method's rule in words; ``pairs_.detection_rule`` is how the pairs apply it, ``"threshold"`` or
``"argmax"``).

Known limits (method.md §6): PCA's directions are orthogonal, NMF's non-negative and k-means'
centroids sum to zero around the mean; none can express non-orthogonal mixed-sign encoding
directions, which the synthetic benchmark shows in numbers.
"""
from __future__ import annotations

import logging
import numbers
import warnings
from typing import Optional

import numpy as np
import torch

from .._device import limit_threads
from .._errors import ValidationError
from .._validation import check_maps, make_generator
from ._base import DirectionEstimator, Interval, Options
from .pairs import ArgmaxPairs, DirectionPairs

__all__ = ["otsu_threshold", "ArgmaxPairs", "PCABaseline", "ICABaseline", "NMFBaseline", "KMeansBaseline",
           "SphericalKMeansBaseline", "SparseAutoencoder", "PatternCAV"]

log = logging.getLogger("unveil")


# --------------------------------------------------------------------------- helpers
def otsu_threshold(values, bins: int = 256) -> float:
    """Otsu's threshold of 1-D ``values``: the cut maximising the between-class variance.

    Parameters
    ----------
    values : array-like of shape (P,)
    bins : int
        Histogram bins.

    Returns
    -------
    float, a value between ``min(values)`` and ``max(values)``. When several cuts tie (an empty gap
    between two modes), the middle of the tied range is returned.

    Examples
    --------
    >>> import numpy as np
    >>> v = np.r_[np.zeros(100), np.ones(50) * 4]
    >>> 0 < otsu_threshold(v) < 4
    True
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValidationError("otsu_threshold needs at least one value.")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    # cuts in an empty gap between the modes tie: take the middle of the best plateau
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(0.5 * (edges[best[0] + 1] + edges[best[-1] + 1]))


def _skew_signs(scores: np.ndarray) -> np.ndarray:
    """+1/−1 per column so that each column's skewness is >= 0."""
    c = scores - scores.mean(0)
    skew = (c ** 3).mean(0) / np.maximum((c ** 2).mean(0), 1e-30) ** 1.5
    return np.where(skew < 0, -1.0, 1.0)


def _pinv_rows(encoders: np.ndarray, rcond: float = 1e-6) -> np.ndarray:
    """(I, D) read-out filters W with ``W @ encoders.T = I`` when the encoders are independent.

    Singular values below ``rcond`` times the largest are dropped (k-means' centred centroids are
    exactly dependent; inverting their zero singular value would only amplify rounding noise).
    """
    return np.linalg.pinv(encoders.T, rcond=rcond)


def _to_patches(X, name: str = "X") -> np.ndarray:
    t = check_maps(X, name, allow_patches=True)
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.detach().cpu().double().numpy()


def _pairs(decoders, biases, encoders, mean, meta) -> DirectionPairs:
    f = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32)  # noqa: E731
    return DirectionPairs(f(decoders), f(biases), f(encoders), f(mean), meta=meta)


def _oriented_threshold_pairs(patches, decoders, encoders, mean, meta, orient: bool = True) -> DirectionPairs:
    """Pairs whose detector i fires where the (sign-oriented) score ``w_iᵀ(x − mean)`` exceeds its Otsu
    threshold."""
    scores = (patches - mean) @ decoders.T
    if orient:
        sg = _skew_signs(scores)
        decoders, encoders, scores = decoders * sg[:, None], encoders * sg[:, None], scores * sg
    thr = np.array([otsu_threshold(scores[:, i]) for i in range(scores.shape[1])])
    biases = thr + decoders @ mean
    meta = dict(meta, thresholds=thr.tolist())
    return _pairs(decoders, biases, encoders, mean, meta)


_POSITIVE_INT = [Interval(numbers.Integral, 1, None, closed="left")]
_COMMON = {"n_concepts": _POSITIVE_INT, "random_state": ["random_state", None]}


def _seed(random_state) -> Optional[int]:
    """The int seed handed to scikit-learn / numpy (a Generator is turned into one)."""
    if random_state is None or isinstance(random_state, (int, np.integer)):
        return None if random_state is None else int(random_state)
    return int(make_generator(random_state).initial_seed() % (2**31))


def _prepare(est, X) -> np.ndarray:
    """Validate the hyperparameters of ``est`` and return ``X`` as (P, D) float64 patches."""
    est._validate_params()
    I = est.n_concepts
    P = _to_patches(X)
    if P.shape[0] < I:
        raise ValidationError(f"{type(est).__name__} needs at least n_concepts={I} patches, got {P.shape[0]}.")
    return P


def _meta(est, **kw) -> dict:
    return {"method": est.method, "random_state": _seed(est.random_state), **kw}


def _fitted(est, P: np.ndarray, pairs: DirectionPairs):
    """Set the learned attributes (last, so that a failed fit leaves an unfitted estimator unfitted)."""
    est.n_features_in_ = P.shape[1]
    est.pairs_ = pairs
    return est


# --------------------------------------------------------------------------- decompositions
class PCABaseline(DirectionEstimator):
    """PCA with ``n_concepts`` components.

    Encoders = decoders = the principal axes (orthonormal), each sign-oriented to positive score
    skewness. Detection: score ``wᵀ(x − E[x])`` above its Otsu threshold (label-free).

    Parameters
    ----------
    n_concepts : int
        Number of components (at most D are fitted).
    random_state : int, Generator or None
        Seed of scikit-learn's PCA solver.

    Attributes
    ----------
    pairs_ : DirectionPairs
    n_features_in_ : int

    Examples
    --------
    >>> import torch
    >>> X = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([5., 1., .1, .1])
    >>> PCABaseline(n_concepts=1).fit(X).pairs_.encoders.abs().argmax().item()
    0
    """

    method = "pca"
    detection_rule = "score w^T(x - mean) (sign oriented to positive skewness) > its Otsu threshold"
    _parameter_constraints = dict(_COMMON)

    def __init__(self, n_concepts: int, random_state=0):
        self.n_concepts = n_concepts
        self.random_state = random_state

    def fit(self, X, y=None) -> "PCABaseline":
        """Fit on feature maps (N, D, H, W) or patches (P, D); ``y`` is ignored. Returns ``self``."""
        from sklearn.decomposition import PCA
        P = _prepare(self, X)
        I = min(self.n_concepts, P.shape[1])
        pca = PCA(n_components=I, random_state=_seed(self.random_state)).fit(P)
        V = pca.components_
        meta = _meta(self, detection_rule=self.detection_rule, encoders="principal axes", decoders="principal axes",
                     explained_variance_ratio=pca.explained_variance_ratio_.tolist())
        return _fitted(self, P, _oriented_threshold_pairs(P, V.copy(), V.copy(), pca.mean_, meta))


class ICABaseline(DirectionEstimator):
    """FastICA with ``n_concepts`` components (scikit-learn, unit-variance whitening).

    Encoders = columns of the mixing matrix; decoders = rows of the unmixing matrix; both
    sign-oriented to positive score skewness. Detection: score above its Otsu threshold.

    Parameters
    ----------
    n_concepts : int
    random_state : int, Generator or None
    max_iter : int
        FastICA iterations (a warning is logged, and ``pairs_.meta["converged"]`` is False, when
        they do not suffice).

    Examples
    --------
    >>> import numpy as np, torch
    >>> M = np.array([[1., 0., 0.], [.6, .8, 0.]])  # two non-orthogonal unit directions
    >>> X = torch.tensor(np.random.default_rng(0).laplace(size=(500, 2)) @ M, dtype=torch.float32)
    >>> enc = torch.nn.functional.normalize(ICABaseline(n_concepts=2).fit(X).pairs_.encoders.double(), dim=1)
    >>> bool((enc @ torch.tensor(M).T).abs().max(0).values.min() > 0.99)
    True
    """

    method = "ica"
    detection_rule = "score w^T(x - mean) (sign oriented to positive skewness) > its Otsu threshold"
    _parameter_constraints = {**_COMMON, "max_iter": _POSITIVE_INT}

    def __init__(self, n_concepts: int, random_state=0, max_iter: int = 1000):
        self.n_concepts = n_concepts
        self.random_state = random_state
        self.max_iter = max_iter

    def fit(self, X, y=None) -> "ICABaseline":
        """Fit on feature maps (N, D, H, W) or patches (P, D); ``y`` is ignored. Returns ``self``."""
        from sklearn.decomposition import FastICA
        from sklearn.exceptions import ConvergenceWarning
        P = _prepare(self, X)
        I = min(self.n_concepts, P.shape[1])
        ica = FastICA(n_components=I, whiten="unit-variance", max_iter=int(self.max_iter),
                      random_state=_seed(self.random_state))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            ica.fit(P)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not converged:
            log.warning("FastICA did not converge in %d iterations; results may be poor", self.max_iter)
        meta = _meta(self, detection_rule=self.detection_rule, encoders="ICA mixing columns",
                     decoders="ICA unmixing rows", converged=converged)
        return _fitted(self, P, _oriented_threshold_pairs(P, ica.components_.copy(), ica.mixing_.T.copy(),
                                                          ica.mean_, meta))


class NMFBaseline(DirectionEstimator):
    """Non-negative matrix factorisation with ``n_concepts`` components.

    NMF needs non-negative input: each component d is shifted by ``max(0, −min_p x_pd)`` (nothing
    when the data are already non-negative, as in the synthetic recipe). Encoders = the NMF
    components (non-negative by construction); decoders = rows of ``pinv(componentsᵀ)``, the linear
    read-out of the coefficients (NMF's own non-negative least-squares transform is not linear, so it
    cannot be a direction). No sign orientation (NMF's sign is meaningful). Detection: the linear
    coefficient ``w_iᵀ(x + shift)`` above its Otsu threshold.

    Parameters
    ----------
    n_concepts : int
    random_state : int, Generator or None
    max_iter : int
        NMF iterations.

    Examples
    --------
    >>> import numpy as np, torch
    >>> H = np.array([[3., 3., 0., 0.], [0., 0., 3., 3.]])
    >>> X = torch.tensor(np.random.default_rng(0).exponential(size=(300, 2)) @ H, dtype=torch.float32)
    >>> p = NMFBaseline(n_concepts=2).fit(X).pairs_
    >>> bool((p.encoders >= 0).all()), p.meta["shift"]
    (True, [0.0, 0.0, 0.0, 0.0])
    """

    method = "nmf"
    detection_rule = "linear NMF coefficient w^T(x + shift), w = rows of pinv(H^T), > its Otsu threshold"
    _parameter_constraints = {**_COMMON, "max_iter": _POSITIVE_INT}

    def __init__(self, n_concepts: int, random_state=0, max_iter: int = 1000):
        self.n_concepts = n_concepts
        self.random_state = random_state
        self.max_iter = max_iter

    def fit(self, X, y=None) -> "NMFBaseline":
        """Fit on feature maps (N, D, H, W) or patches (P, D); ``y`` is ignored. Returns ``self``."""
        from sklearn.decomposition import NMF
        from sklearn.exceptions import ConvergenceWarning
        P = _prepare(self, X)
        shift = np.maximum(0.0, -P.min(0))
        Ps = P + shift
        nmf = NMF(n_components=self.n_concepts, init="nndsvda", max_iter=int(self.max_iter),
                  random_state=_seed(self.random_state))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            nmf.fit(Ps)
        H = nmf.components_
        Wd = _pinv_rows(H)
        coef = Ps @ Wd.T
        thr = np.array([otsu_threshold(coef[:, i]) for i in range(coef.shape[1])])
        mean = P.mean(0)
        biases = thr - Wd @ shift
        meta = _meta(self, detection_rule=self.detection_rule, encoders="NMF components", decoders="rows of pinv(H^T)",
                     shift=shift.tolist(), thresholds=thr.tolist(), reconstruction_err=float(nmf.reconstruction_err_))
        return _fitted(self, P, _pairs(Wd, biases, H, mean, meta))


# --------------------------------------------------------------------------- clustering
class KMeansBaseline(DirectionEstimator):
    """k-means with ``n_concepts`` clusters (scikit-learn, ``n_init`` restarts).

    Encoders = centroid − data mean (the displacement a cluster adds); decoders = rows of
    ``pinv(encodersᵀ)``. The centred centroids are linearly dependent (their weighted sum is zero),
    which limits what the read-out can express. Detection: nearest centroid (one concept per
    position; the pairs have ``detection_rule="argmax"``).

    Parameters
    ----------
    n_concepts : int
    random_state : int, Generator or None
    n_init : int
        k-means restarts.

    Examples
    --------
    >>> import numpy as np, torch
    >>> rng = np.random.default_rng(0)
    >>> X = torch.tensor(np.r_[rng.normal(0, .1, (50, 2)), rng.normal(3, .1, (50, 2))], dtype=torch.float32)
    >>> p = KMeansBaseline(n_concepts=2, n_init=2).fit(X).pairs_
    >>> p.detection_rule, sorted(p.detect(X).sum(0).tolist())
    ('argmax', [50.0, 50.0])
    """

    method = "kmeans"
    detection_rule = "nearest centroid (Euclidean); exactly one concept per position"
    _parameter_constraints = {**_COMMON, "n_init": _POSITIVE_INT}

    def __init__(self, n_concepts: int, random_state=0, n_init: int = 10):
        self.n_concepts = n_concepts
        self.random_state = random_state
        self.n_init = n_init

    def fit(self, X, y=None) -> "KMeansBaseline":
        """Fit on feature maps (N, D, H, W) or patches (P, D); ``y`` is ignored. Returns ``self``."""
        from sklearn.cluster import KMeans
        P = _prepare(self, X)
        km = KMeans(n_clusters=self.n_concepts, n_init=int(self.n_init), random_state=_seed(self.random_state)).fit(P)
        C = km.cluster_centers_
        mean = P.mean(0)
        # exact cluster means of the final assignment: their weighted sum around the mean is exactly
        # zero, so pinv drops that null direction instead of inverting a near-zero singular value
        lab = km.labels_
        enc = np.stack([(P[lab == k] - mean).mean(0) if (lab == k).any() else C[k] - mean
                        for k in range(self.n_concepts)])
        dec = _pinv_rows(enc)
        meta = _meta(self, detection_rule=self.detection_rule, encoders="centroid - data mean",
                     decoders="rows of pinv(encoders^T)", inertia=float(km.inertia_))
        return _fitted(self, P, _argmax_pairs(dec, enc, mean, 2 * C, -(C ** 2).sum(1), meta))


def _argmax_pairs(dec, enc, mean, A, c, meta) -> DirectionPairs:
    # biases: the hyperplane half-way along each read-out coordinate (w_iᵀ(x − mean) > 0.5·w_iᵀenc_i);
    # not used for detection (the argmax rule), kept so that the pairs are meaningful as plain pairs
    biases = dec @ mean + 0.5 * (dec * enc).sum(1)
    f = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32)  # noqa: E731
    return DirectionPairs(f(dec), f(biases), f(enc), f(mean), meta=meta, detection_rule="argmax",
                          score_weights=f(A), score_offsets=f(c))


class SphericalKMeansBaseline(DirectionEstimator):
    """Spherical k-means (cosine similarity) of centred patches.

    Patches are centred on the data mean (and, with ``standardize=True``, divided by each
    component's standard deviation — beware: components without noise are then blown up, see
    method.md §6), normalised to unit length and clustered by cosine (k-means++ seeding, ``n_init``
    restarts, Lloyd iterations). Encoders = mean of the centred patches of each cluster (in the
    original units); decoders = rows of ``pinv(encodersᵀ)``. Detection: largest cosine to a unit
    centroid (the pairs have ``detection_rule="argmax"``).

    Parameters
    ----------
    n_concepts : int
    random_state : int, Generator or None
    n_init : int
        Restarts (the best objective is kept).
    max_iter : int
        Lloyd iterations per restart.
    standardize : bool
        Divide each component by its standard deviation before clustering.

    Examples
    --------
    >>> import numpy as np, torch
    >>> rng = np.random.default_rng(0)
    >>> lab = np.repeat([0, 1], 40)
    >>> X = rng.uniform(1, 5, (80, 1)) * np.array([[1., 0.], [0., 1.]])[lab] + 0.01 * rng.normal(size=(80, 2))
    >>> p = SphericalKMeansBaseline(n_concepts=2, n_init=2).fit(torch.tensor(X, dtype=torch.float32)).pairs_
    >>> det = p.detect(torch.tensor(X, dtype=torch.float32)).argmax(1).numpy()
    >>> bool((det == lab).all() or (det == 1 - lab).all())
    True
    """

    method = "spherical-kmeans"
    detection_rule = "largest cosine between (x - mean) and the unit centroids; exactly one concept per position"
    _parameter_constraints = {**_COMMON, "n_init": _POSITIVE_INT, "max_iter": _POSITIVE_INT,
                              "standardize": ["boolean"]}

    def __init__(self, n_concepts: int, random_state=0, n_init: int = 10, max_iter: int = 100,
                 standardize: bool = False):
        self.n_concepts = n_concepts
        self.random_state = random_state
        self.n_init = n_init
        self.max_iter = max_iter
        self.standardize = standardize

    def fit(self, X, y=None) -> "SphericalKMeansBaseline":
        """Fit on feature maps (N, D, H, W) or patches (P, D); ``y`` is ignored. Returns ``self``."""
        P = _prepare(self, X)
        I = self.n_concepts
        mean = P.mean(0)
        scale = P.std(0).clip(1e-12) if self.standardize else np.ones(P.shape[1])
        Z = (P - mean) / scale
        U = Z / np.linalg.norm(Z, axis=1, keepdims=True).clip(1e-12)
        rng = np.random.default_rng(_seed(self.random_state))
        best = (-np.inf, None, None)
        for _ in range(int(self.n_init)):
            C = _kmeanspp_cosine(U, I, rng)
            for _ in range(int(self.max_iter)):
                lab = (U @ C.T).argmax(1)
                newC = C.copy()
                for k in range(I):
                    members = U[lab == k]
                    if len(members):
                        s = members.sum(0)
                        newC[k] = s / max(np.linalg.norm(s), 1e-12)
                    else:  # empty cluster: restart it at the worst-fitting patch
                        newC[k] = U[(U @ C.T).max(1).argmin()]
                if np.allclose(newC, C, atol=1e-10, rtol=0):
                    C = newC
                    break
                C = newC
            obj = float((U @ C.T).max(1).sum())
            if obj > best[0]:
                best = (obj, C, (U @ C.T).argmax(1))
        _, C, lab = best
        enc = np.stack([(P[lab == k] - mean).mean(0) if (lab == k).any() else np.zeros(P.shape[1])
                        for k in range(I)])
        dec = _pinv_rows(enc)
        A = C / scale  # cosine score in the original units: u_kᵀ((x − mean)/scale)
        meta = _meta(self, detection_rule=self.detection_rule, encoders="cluster mean of (x - mean)",
                     decoders="rows of pinv(encoders^T)", standardize=bool(self.standardize), objective=best[0])
        return _fitted(self, P, _argmax_pairs(dec, enc, mean, A, -(A @ mean), meta))


def _kmeanspp_cosine(U: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    C = [U[rng.integers(len(U))]]
    for _ in range(1, k):
        d = 1 - np.max(U @ np.stack(C).T, axis=1)
        d = np.clip(d, 0, None)
        p = d / d.sum() if d.sum() > 0 else None
        C.append(U[rng.choice(len(U), p=p)])
    return np.stack(C)


# --------------------------------------------------------------------------- autoencoders
class SparseAutoencoder(DirectionEstimator):
    """A one-layer (sparse) autoencoder in torch: ``h = ReLU(W_e(z − b_d) + b_e)``, ``ẑ = W_d h + b_d``.

    ``z = (x − E[x]) / σ`` with one global scale σ (root mean squared norm of the centred patches),
    so ``l1`` means the same on every data set. Loss: ``mean_p ‖ẑ − z‖² + l1 · mean_p ‖h‖₁``;
    decoder columns are kept at unit norm (the usual SAE constraint; without it the L1 term is
    defeated by rescaling). ``l1 = 0`` is a plain autoencoder. Adam, mini-batches; the hidden layer
    has ``n_concepts`` units.

    Encoder rows are the decoding directions (filters) and decoder columns the encoding directions.

    Detection (``detection``), both hyperplanes, so the pairs are plain :class:`DirectionPairs`:

    - ``"otsu"`` (default): the unit's pre-activation above the Otsu threshold of its values over
      the training patches (label-free, the same rule as PCA/ICA; the sign is fixed by the ReLU);
    - ``"active"``: the ReLU unit is active, pre-activation > 0 (an autoencoder without sparsity
      keeps its units active almost everywhere, so this rule detects everything).

    Parameters
    ----------
    n_concepts : int
        Hidden units.
    l1 : float
        Weight of the L1 penalty on the hidden activations (>= 0).
    epochs, batch_size : int
        Passes over the patches and patches per Adam step.
    lr : float
        Adam learning rate.
    detection : {"otsu", "active"}
    random_state : int, Generator or None
        Seed of the initial weights and of the mini-batch order (a local ``torch.Generator``).

    Attributes
    ----------
    pairs_ : DirectionPairs
    history_ : dict
        ``{"loss": [mean loss per epoch]}``.
    n_features_in_ : int

    Examples
    --------
    >>> import torch
    >>> X = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    >>> est = SparseAutoencoder(n_concepts=2, epochs=2, random_state=0).fit(X)
    >>> est.transform(X).shape, len(est.history_["loss"])
    (torch.Size([100, 2]), 2)
    """

    method = "sae"
    _rules = {"otsu": "pre-activation W_e (z - b_d) + b_e > its Otsu threshold over the training patches",
              "active": "ReLU unit active: W_e (z - b_d) + b_e > 0"}
    _parameter_constraints = {**_COMMON, "l1": [Interval(numbers.Real, 0, None, closed="left")],
                              "epochs": _POSITIVE_INT, "batch_size": _POSITIVE_INT,
                              "lr": [Interval(numbers.Real, 0, None, closed="neither")],
                              "detection": [Options(_rules)]}
    _learned_attributes = DirectionEstimator._learned_attributes + ("history_",)

    def __init__(self, n_concepts: int, l1: float = 0.01, epochs: int = 200, batch_size: int = 256,
                 lr: float = 3e-3, detection: str = "otsu", random_state=0):
        self.n_concepts = n_concepts
        self.l1 = l1
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.detection = detection
        self.random_state = random_state

    def fit(self, X, y=None) -> "SparseAutoencoder":
        """Fit on feature maps (N, D, H, W) or patches (P, D); ``y`` is ignored. Returns ``self``."""
        P = _prepare(self, X)
        l1, lr, epochs, bs = float(self.l1), float(self.lr), int(self.epochs), int(self.batch_size)
        g = make_generator(self.random_state)
        mean = P.mean(0)
        sigma = float(np.sqrt(((P - mean) ** 2).sum(1).mean())) or 1.0
        Z = torch.as_tensor((P - mean) / sigma, dtype=torch.float32)
        n, D = Z.shape
        I = self.n_concepts
        Wd = torch.randn(D, I, generator=g)
        Wd = (Wd / Wd.norm(dim=0, keepdim=True)).requires_grad_()
        We = Wd.detach().T.clone().requires_grad_()
        be = torch.zeros(I, requires_grad=True)
        bd = torch.zeros(D, requires_grad=True)
        opt = torch.optim.Adam([We, be, Wd, bd], lr=lr)
        losses = []
        # tiny matrices: thread hand-offs cost more than the arithmetic
        with limit_threads(1 if D * I <= 65536 else torch.get_num_threads(), blas=False):
            for _ in range(epochs):
                perm = torch.randperm(n, generator=g)
                tot = 0.0
                for i in range(0, n, bs):
                    z = Z[perm[i:i + bs]]
                    h = torch.relu((z - bd) @ We.T + be)
                    zh = h @ Wd.T + bd
                    loss = ((zh - z) ** 2).sum(1).mean() + l1 * h.sum(1).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        Wd /= Wd.norm(dim=0, keepdim=True).clamp_min(1e-12)
                    tot += float(loss.detach()) * len(z)
                losses.append(tot / n)
            with torch.no_grad():
                pre = ((Z - bd) @ We.T + be).double().numpy()
        We_, be_, Wd_, bd_ = (t.detach().double().numpy() for t in (We, be, Wd, bd))
        thr = (np.array([otsu_threshold(pre[:, i]) for i in range(I)]) if self.detection == "otsu"
               else np.zeros(I))
        # back to the original units: pre-activation = (W_e/σ)ᵀx − [(W_e/σ)ᵀ(mean + σ b_d) − b_e]
        dec = We_ / sigma
        biases = dec @ (mean + sigma * bd_) - be_ + thr
        enc = Wd_.T.copy()
        meta = _meta(self, detection_rule=self._rules[self.detection], encoders="decoder columns (unit norm)",
                     decoders="encoder rows", l1=l1, epochs=epochs, final_loss=losses[-1],
                     active_fraction=(pre > 0).mean(0).tolist(), thresholds=thr.tolist())
        pairs = _pairs(dec, biases, enc, mean, meta)
        self.history_ = {"loss": losses}
        return _fitted(self, P, pairs)


# --------------------------------------------------------------------------- supervised
class PatternCAV(DirectionEstimator):
    """Supervised Pattern-CAV: uses ground-truth concept labels of every patch.

    For concept i (one-vs-rest): encoder = mean(x | concept i) − mean(x | not i) (the pattern of a
    linear concept classifier is the difference of class means); decoder = the filter of an
    L2-regularised logistic regression (scikit-learn, ``C``) fitted on patches centred and divided
    by one global scale (isotropic, so noise-free components are not blown up), mapped back to the
    original units. Detection: the logistic regression's ``p(concept i | x) > 0.5``, i.e. exactly the
    hyperplane of the pairs.

    ``fit(X, y)`` takes the labels ``y`` of shape (N, H, W) for maps or (P,) for patches, ints in
    ``0 .. n_concepts-1`` (required).

    Parameters
    ----------
    n_concepts : int
    C : float
        Inverse L2 strength of the logistic regressions (> 0).
    random_state : int, Generator or None
        Recorded in ``pairs_.meta`` (the fit is deterministic).
    max_iter : int
        Logistic-regression iterations.

    Examples
    --------
    >>> import numpy as np, torch
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1], 50)
    >>> X = torch.tensor(3.0 * np.eye(3)[y] + 0.3 * rng.normal(size=(100, 3)), dtype=torch.float32)
    >>> p = PatternCAV(n_concepts=2).fit(X, y).pairs_
    >>> float((p.detect(X).argmax(1).numpy() == y).mean())
    1.0
    """

    method = "pattern-cav"
    detection_rule = "supervised: logistic-regression p(concept | x) > 0.5 (one-vs-rest, uses true patch labels)"
    _parameter_constraints = {**_COMMON, "C": [Interval(numbers.Real, 0, None, closed="neither")],
                              "max_iter": _POSITIVE_INT}

    def __init__(self, n_concepts: int, C: float = 1.0, random_state=0, max_iter: int = 2000):
        self.n_concepts = n_concepts
        self.C = C
        self.random_state = random_state
        self.max_iter = max_iter

    def fit(self, X, y=None) -> "PatternCAV":
        """Fit on feature maps (N, D, H, W) or patches (P, D) with their concept labels ``y``. Returns ``self``."""
        from sklearn.linear_model import LogisticRegression
        P = _prepare(self, X)
        if y is None:
            raise ValidationError("PatternCAV is supervised and needs concept labels: call fit(X, y) with y of shape "
                                  "(N, H, W) for maps or (P,) for patches.")
        lab = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        lab = lab.reshape(-1)
        if lab.shape[0] != P.shape[0]:
            raise ValidationError(f"labels must give one concept per patch ({P.shape[0]}), got {lab.shape[0]} "
                                  f"(pass (N, H, W) for maps or (P,) for patches).")
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValidationError(f"labels must be integers, got dtype {lab.dtype}.")
        C = float(self.C)
        I = self.n_concepts
        mean = P.mean(0)
        sigma = float(np.sqrt(((P - mean) ** 2).sum(1).mean())) or 1.0
        Z = (P - mean) / sigma
        dec, biases, enc = np.zeros((I, P.shape[1])), np.zeros(I), np.zeros((I, P.shape[1]))
        for i in range(I):
            pos = lab == i
            if pos.all() or not pos.any():
                raise ValidationError(f"concept {i} has {int(pos.sum())} of {len(pos)} patches; Pattern-CAV needs "
                                      f"positive and negative patches for every concept.")
            enc[i] = P[pos].mean(0) - P[~pos].mean(0)
            lr = LogisticRegression(C=C, max_iter=int(self.max_iter)).fit(Z, pos)
            w = lr.coef_[0] / sigma
            dec[i] = w
            biases[i] = w @ mean - lr.intercept_[0]  # σ(wᵀx − b) = σ(coefᵀz + intercept)
        meta = _meta(self, detection_rule=self.detection_rule, encoders="difference of class means",
                     decoders="logistic-regression filter", C=C)
        return _fitted(self, P, _pairs(dec, biases, enc, mean, meta))
