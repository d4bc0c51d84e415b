"""Baselines on planted data: each returns valid DirectionPairs that recover what it can express."""
import json

import numpy as np
import pytest
import torch

from unveil import DirectionPairs, NotFittedError, ValidationError
from unveil.data.synthetic import make_synthetic, random_directions
from unveil.directions.baselines import (ArgmaxPairs, ICABaseline, KMeansBaseline, NMFBaseline, PatternCAV,
                                         PCABaseline, SparseAutoencoder, SphericalKMeansBaseline, otsu_threshold)
from unveil.evaluate.recovery import direction_cosines, matched_iou, score_pairs


def _t(a):
    return torch.tensor(a, dtype=torch.float32)


def _best_cos(est, truth):
    """|cos| of each truth row with its best-matching estimate (greedy over a tiny matrix)."""
    E = est / np.linalg.norm(est, axis=1, keepdims=True)
    T = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    return np.abs(E @ T.T).max(0)


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(0, 0.3, 600), rng.normal(5, 0.3, 300)]
    thr = otsu_threshold(v)
    assert 2.0 < thr < 3.0  # the middle of the empty gap between the modes
    assert otsu_threshold(np.full(5, 2.0)) == 2.0
    with pytest.raises(ValidationError, match="at least one value"):
        otsu_threshold([])


def test_pca_recovers_orthogonal_directions_with_skew_sign():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    S = Q[:3]
    A = rng.exponential(size=(2000, 3)) * np.array([3.0, 2.0, 1.0])  # distinct variances, positive skew
    X = A @ S + 0.01 * rng.normal(size=(2000, 8)) + 5.0
    p = PCABaseline(3).fit(_t(X)).pairs_
    enc = p.encoders.double().numpy()
    signed = (enc * S).sum(1) / np.linalg.norm(enc, axis=1)
    np.testing.assert_allclose(signed, [1, 1, 1], atol=2e-3)  # order by variance, sign by skewness
    torch.testing.assert_close(p.decoders, p.encoders, atol=0, rtol=0)
    # detection = score above its Otsu threshold
    score = (_t(X) - p.mean) @ p.decoders.T
    thr = torch.tensor(p.meta["thresholds"], dtype=torch.float32)
    torch.testing.assert_close(p.detect(_t(X)) > 0.5, score > thr, atol=0, rtol=0)


def test_pca_accepts_maps_and_patches_alike():
    d = make_synthetic(n_per_class=40, random_state=1)
    patches = d.X.permute(0, 2, 3, 1).reshape(-1, 16)
    a = PCABaseline(3).fit(d.X).pairs_
    b = PCABaseline(3).fit(patches).pairs_
    torch.testing.assert_close(a.encoders, b.encoders, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.biases, b.biases, atol=1e-4, rtol=0)


def test_ica_recovers_non_orthogonal_mixing():
    rng = np.random.default_rng(0)
    M = random_directions(3, 6, correlation=0.5, rng=rng)
    assert np.abs(M @ M.T - np.eye(3)).max() > 0.3  # clearly non-orthogonal
    X = rng.laplace(size=(3000, 3)) @ M + 0.001 * rng.normal(size=(3000, 6))
    est = ICABaseline(3).fit(_t(X))
    p = est.pairs_
    assert p.meta["converged"] is True
    np.testing.assert_allclose(_best_cos(p.encoders.double().numpy(), M), [1, 1, 1], atol=5e-3)
    # decoders unmix: W S^T ≈ identity up to permutation
    WS = p.decoders.double().numpy() @ p.encoders.double().numpy().T
    np.testing.assert_allclose(WS, np.eye(3), atol=1e-3)


def test_nmf_recovers_nonnegative_parts_and_shifts_negative_data():
    rng = np.random.default_rng(0)
    H = np.abs(rng.normal(size=(3, 10))) * 0.3
    H[0, :3] += 3
    H[1, 3:6] += 3
    H[2, 6:] += 3
    A = rng.exponential(size=(2000, 3)) * (rng.random((2000, 3)) < 0.5)
    X = A @ H
    p = NMFBaseline(3).fit(_t(X)).pairs_
    np.testing.assert_allclose(_best_cos(p.encoders.double().numpy(), H), [1, 1, 1], atol=1e-2)
    assert p.meta["shift"] == [0.0] * 10
    # shifting the data by a negative constant: NMF sees the same non-negative data, pairs move along
    q = NMFBaseline(3).fit(_t(X - 7.0)).pairs_
    assert min(q.meta["shift"]) > 6.9
    torch.testing.assert_close(q.encoders, p.encoders, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(q.detect(_t(X - 7.0)), p.detect(_t(X)), atol=1e-3, rtol=0)


def _blobs(rng, centers, n=300, sd=0.2):
    lab = np.repeat(np.arange(len(centers)), n)
    return centers[lab] + sd * rng.normal(size=(len(lab), centers.shape[1])), lab


def test_kmeans_detects_clusters_exactly_with_argmax_pairs():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0, 0, 0], [4, 0, 0, 0], [0, 4, 1, 0]], float) + 10
    X, lab = _blobs(rng, centers)
    p = KMeansBaseline(3).fit(_t(X)).pairs_
    assert p.detection_rule == "argmax" and isinstance(p, DirectionPairs)
    assert isinstance(p, ArgmaxPairs)  # the compatibility name still recognises them
    det = p.detect(_t(X))
    torch.testing.assert_close(det.sum(1), torch.ones(len(X)), atol=0, rtol=0)  # one-hot
    np.testing.assert_allclose(matched_iou(det.numpy() > 0.5, lab, 3)["matched"], [1, 1, 1], atol=0)
    # decision_function > 0 exactly where detected
    torch.testing.assert_close(p.decision_function(_t(X)) > 0, det > 0.5, atol=0, rtol=0)
    # encoders are centroid - mean
    true_enc = centers - centers.mean(0)
    m = matched_iou(det.numpy() > 0.5, lab, 3)
    np.testing.assert_allclose(direction_cosines(p.encoders, true_enc, m["assignment"]), [1, 1, 1], atol=1e-3)


def test_argmax_pairs_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    X, _ = _blobs(rng, np.array([[0, 0, 0], [3, 0, 0], [0, 3, 0]], float))
    p = KMeansBaseline(3).fit(_t(X)).pairs_
    p.save(tmp_path / "km")
    q = DirectionPairs.load(tmp_path / "km")
    assert q == p and q.detection_rule == "argmax"
    assert ArgmaxPairs.load(tmp_path / "km") == p  # the compatibility loader
    torch.testing.assert_close(q.detect(_t(X)), p.detect(_t(X)), atol=0, rtol=0)
    torch.testing.assert_close(q.score_weights, p.score_weights, atol=0, rtol=0)
    assert q.meta["method"] == "kmeans"
    # maps: one-hot along the concept axis
    maps = _t(X[:8]).T.reshape(1, 3, 2, 4)
    assert p.detect(maps).shape == (1, 3, 2, 4)
    torch.testing.assert_close(p.detect(maps).sum(1), torch.ones(1, 2, 4), atol=0, rtol=0)


def test_spherical_kmeans_clusters_by_angle():
    rng = np.random.default_rng(0)
    dirs = np.array([[1, 0, 0], [0, 1, 0], [-1, -1, 0]], float)
    lab = rng.integers(0, 3, 900)
    amp = rng.uniform(1, 5, 900)  # norms vary a lot; angles do not
    X = amp[:, None] * dirs[lab] + 0.05 * rng.normal(size=(900, 3))
    X = X - X.mean(0) + 3.0
    p = SphericalKMeansBaseline(3, random_state=0).fit(_t(X)).pairs_
    det = p.detect(_t(X)).numpy() > 0.5
    np.testing.assert_allclose(matched_iou(det, lab, 3)["matched"], [1, 1, 1], atol=0.01)


def test_sparse_autoencoder_recovers_sparse_dictionary():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    Dct = Q[:3]
    lab = rng.integers(0, 3, 3000)
    X = rng.uniform(1, 3, 3000)[:, None] * Dct[lab] + 0.01 * rng.normal(size=(3000, 8))
    est = SparseAutoencoder(3, l1=0.1, epochs=60, random_state=0).fit(_t(X))
    p = est.pairs_
    det = p.detect(_t(X)).numpy() > 0.5
    m = matched_iou(det, lab, 3)
    np.testing.assert_allclose(m["matched"], [1, 1, 1], atol=0.02)
    np.testing.assert_array_less(0.9, direction_cosines(p.encoders, Dct, m["assignment"]))
    assert est.history_["loss"][-1] < 0.5 * est.history_["loss"][0]
    torch.testing.assert_close(p.encoders.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)


def test_sparse_autoencoder_active_rule_is_the_relu_hyperplane():
    rng = np.random.default_rng(0)
    X = _t(rng.normal(size=(500, 5)))
    est = SparseAutoencoder(2, l1=0.01, epochs=5, detection="active", random_state=0).fit(X)
    frac = (est.pairs_.detect(X) > 0.5).float().mean(0).tolist()
    np.testing.assert_allclose(frac, est.pairs_.meta["active_fraction"], atol=2e-3)
    with pytest.raises(ValidationError, match="detection must be one of"):
        SparseAutoencoder(2, detection="median").fit(X)
    with pytest.raises(ValidationError, match="l1 must be a finite number >= 0, got -1.0"):
        SparseAutoencoder(2, l1=-1.0).fit(X)


def test_sparse_autoencoder_is_reproducible():
    X = _t(np.random.default_rng(0).normal(size=(300, 4)))
    a = SparseAutoencoder(2, epochs=3, random_state=7).fit(X).pairs_
    b = SparseAutoencoder(2, epochs=3, random_state=7).fit(X).pairs_
    torch.testing.assert_close(a.decoders, b.decoders, atol=0, rtol=0)


def test_pattern_cav_recovers_planted_mean_shift():
    rng = np.random.default_rng(0)
    S = rng.normal(size=(3, 10))
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    lab = rng.integers(0, 3, 3000)
    X = 2.0 * S[lab] + 0.3 * rng.normal(size=(3000, 10))
    p = PatternCAV(3).fit(_t(X), torch.tensor(lab)).pairs_
    # difference of means of concept i vs the rest = 2 s_i - mean(2 s_j, j != i): compare to that
    expected = np.stack([2 * S[i] - np.mean([2 * S[j] for j in range(3) if j != i], 0) for i in range(3)])
    np.testing.assert_allclose(direction_cosines(p.encoders, expected, np.arange(3)), [1, 1, 1], atol=2e-3)
    det = p.detect(_t(X)).numpy() > 0.5
    np.testing.assert_array_less(0.9, matched_iou(det, lab, 3)["matched"])


def test_pattern_cav_validates_labels():
    X = torch.randn(20, 3)
    with pytest.raises(ValidationError, match=r"labels must give one concept per patch \(20\), got 19"):
        PatternCAV(2).fit(X, np.zeros(19, int))
    with pytest.raises(ValidationError, match="concept 0 has 20 of 20 patches"):
        PatternCAV(2).fit(X, np.zeros(20, int))
    with pytest.raises(ValidationError, match="labels must be integers"):
        PatternCAV(2).fit(X, np.zeros(20))


def test_not_fitted_and_bad_inputs():
    with pytest.raises(NotFittedError, match="PCABaseline is not fitted yet"):
        PCABaseline(2).pairs_
    with pytest.raises(ValidationError, match="n_concepts must be an integer >= 1"):
        KMeansBaseline(0).fit(torch.randn(10, 3))
    with pytest.raises(ValidationError, match="NaN or infinite"):
        PCABaseline(2).fit(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValidationError, match="needs at least n_concepts=5 patches, got 3"):
        ICABaseline(5).fit(torch.randn(3, 8))


# --------------------------------------------------------------- paper recipe
@pytest.fixture(scope="module")
def paper():
    return make_synthetic(n_per_class=200, random_state=0)


ALL = [
    ("pca", lambda: PCABaseline(3)),
    ("ica", lambda: ICABaseline(3)),
    ("nmf", lambda: NMFBaseline(3)),
    ("kmeans", lambda: KMeansBaseline(3, n_init=3)),
    ("spherical-kmeans", lambda: SphericalKMeansBaseline(3, n_init=3)),
    ("sae", lambda: SparseAutoencoder(3, l1=0.01, epochs=20)),
    ("pattern-cav", lambda: PatternCAV(3)),
]


@pytest.mark.parametrize("name,make", ALL, ids=[a for a, _ in ALL])
def test_every_baseline_scores_on_the_paper_recipe(name, make, paper):
    est = make()
    est.fit(paper.X, paper.concept[:, None, :]) if name == "pattern-cav" else est.fit(paper.X)
    p = est.pairs_
    assert isinstance(p, DirectionPairs) and p.n_concepts == 3 and p.n_features == 16
    assert est.n_features_in_ == 16
    assert p.meta["method"] == type(est).method and p.meta["detection_rule"]
    json.dumps(p.meta, allow_nan=False)
    r = score_pairs(p, paper)
    d = r.to_dict()
    assert sorted(d["assignment"]) == [0, 1, 2]
    for key in ("matched_iou", "encoder_cosine", "decoder_cosine"):
        assert all(0.0 <= v <= 1.0 for v in d[key]), (key, d[key])
    assert np.isfinite(d["rmse_overall"]) and d["rmse_overall"] >= 0


def test_orthogonal_nonnegative_and_centroid_methods_miss_the_paper_directions(paper):
    """method.md §6: PCA, NMF and k-means cannot express non-orthogonal mixed-sign directions."""
    for est in (PCABaseline(3), NMFBaseline(3), KMeansBaseline(3, n_init=3)):
        r = score_pairs(est.fit(paper.X).pairs_, paper)
        assert r.mean_encoder_cosine < 0.75, (type(est).__name__, r.encoder_cosine)
        assert r.rmse_overall > 1.0, (type(est).__name__, r.rmse_overall)
    # the supervised linear read-out, by contrast, detects the concepts almost perfectly
    r = score_pairs(PatternCAV(3).fit(paper.X, paper.concept[:, None, :]).pairs_, paper)
    np.testing.assert_array_less(0.95, r.matched_iou)
