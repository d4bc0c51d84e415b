"""Recovery metrics on hand-made cases whose answers are known exactly."""
import json
import math

import numpy as np
import pytest
import torch

from unveil import DirectionPairs, ValidationError
from unveil.data.synthetic import make_synthetic
from unveil.evaluate.recovery import (RecoveryReport, direction_cosines, iou_matrix, matched_iou, score_pairs,
                                      signal_value_rmse, unit_encoder_pairs)


# ------------------------------------------------------------------ matched_iou
def test_perfect_detector_has_iou_one_and_no_overlap():
    concept = np.array([0, 0, 1, 2, 2, 1, 0])
    detected = concept[:, None] == np.arange(3)[None]
    r = matched_iou(detected, concept, 3)
    np.testing.assert_allclose(r["matched"], [1.0, 1.0, 1.0], atol=0)
    assert r["assignment"].tolist() == [0, 1, 2]
    assert r["off_diagonal"] == 0.0
    np.testing.assert_allclose(r["iou"], np.eye(3), atol=0)


def test_hungarian_undoes_swapped_detectors():
    concept = np.array([0, 0, 1, 2, 2, 1, 0])
    detected = (concept[:, None] == np.arange(3)[None])[:, [2, 0, 1]]  # detector k fires on concept [2,0,1][k]
    r = matched_iou(detected, concept, 3)
    assert r["assignment"].tolist() == [1, 2, 0]
    np.testing.assert_allclose(r["matched"], [1.0, 1.0, 1.0], atol=0)


def test_partial_iou_values_by_hand():
    concept = np.array([0, 0, 1, 1])
    detected = np.array([[1, 0], [1, 0], [1, 1], [0, 1]], bool)
    r = matched_iou(detected, concept, 2)
    # detector 0: {0,1,2} vs concept 0 {0,1}: 2/3; vs concept 1 {2,3}: 1/4
    # detector 1: {2,3} vs concept 1: 1; vs concept 0: 0
    np.testing.assert_allclose(r["iou"], [[2 / 3, 1 / 4], [0.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(r["matched"], [2 / 3, 1.0], atol=1e-12)
    assert r["off_diagonal"] == pytest.approx((1 / 4 + 0.0) / 2, abs=1e-12)


def test_fewer_detectors_than_concepts_leaves_unmatched():
    concept = np.array([0, 1, 2, 2])
    detected = (concept == 2)[:, None]
    r = matched_iou(detected, concept, 3)
    assert r["assignment"].tolist() == [-1, -1, 0]
    np.testing.assert_allclose(r["matched"], [0.0, 0.0, 1.0], atol=0)


def test_more_detectors_than_concepts_picks_the_best():
    concept = np.array([0, 0, 1, 1])
    detected = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 0], [0, 1, 0]], bool)  # detector 2 is exact for 0
    r = matched_iou(detected, concept, 2)
    assert r["assignment"].tolist() == [2, 1]


def test_empty_detector_and_empty_concept_have_iou_zero():
    iou = iou_matrix(np.zeros((3, 2), bool), np.array([0, 0, 0]), 2)
    np.testing.assert_allclose(iou, np.zeros((2, 2)), atol=0)


def test_matched_iou_validates():
    with pytest.raises(ValidationError, match=r"concept must be \(P,\) with P = 3"):
        matched_iou(np.zeros((3, 2), bool), np.array([0, 1]), 2)
    with pytest.raises(ValidationError, match="concept labels must lie in 0..1"):
        matched_iou(np.zeros((2, 2), bool), np.array([0, 5]), 2)
    with pytest.raises(ValidationError, match=r"detected must be \(P, I_hat\)"):
        matched_iou(np.zeros(3, bool), np.array([0, 1, 1]), 2)
    with pytest.raises(ValidationError, match="n_concepts must be an integer >= 1"):
        matched_iou(np.zeros((2, 2), bool), np.array([0, 1]), 0)


# ------------------------------------------------------------------ cosines
def test_direction_cosines_known_values_and_sign():
    truth = np.array([[1.0, 0.0], [0.0, 1.0]])
    est = np.array([[0.0, -3.0], [1.0, 1.0]])  # est 0 ~ -truth 1; est 1 at 45 degrees to truth 0
    c = direction_cosines(est, truth, np.array([1, 0]))
    np.testing.assert_allclose(c, [1 / math.sqrt(2), 1.0], atol=1e-12)


def test_direction_cosines_unmatched_and_zero_estimates_are_zero():
    truth = np.eye(3)
    est = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    c = direction_cosines(est, truth, np.array([0, 1, -1]))
    np.testing.assert_allclose(c, [0.0, 1.0, 0.0], atol=0)


def test_direction_cosines_validates():
    with pytest.raises(ValidationError, match="same D"):
        direction_cosines(np.eye(2), np.eye(3), np.array([0, 1, 2]))
    with pytest.raises(ValidationError, match=r"assignment must be \(2,\) ints in -1..1"):
        direction_cosines(np.eye(2), np.eye(2), np.array([0, 2]))


# ------------------------------------------------------------------ rmse
def test_signal_value_rmse_known_offset_and_assignment():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(5, 2, 1, 3))
    est = np.stack([truth[:, 1] + 0.5, truth[:, 0] - 0.2], 1)  # swapped, with constant errors
    r = signal_value_rmse(est, truth, np.array([1, 0]))
    np.testing.assert_allclose(r["per_concept"], [0.2, 0.5], atol=1e-12)  # true 0 <- est 1
    assert r["overall"] == pytest.approx(math.sqrt((0.25 + 0.04) / 2), abs=1e-12)


def test_signal_value_rmse_unmatched_is_nan_and_excluded():
    truth = np.zeros((4, 2, 1, 1))
    est = np.ones((4, 1, 1, 1)) * 0.3
    r = signal_value_rmse(est, truth, np.array([-1, 0]))
    assert math.isnan(r["per_concept"][0])
    assert r["per_concept"][1] == pytest.approx(0.3, abs=1e-12)
    assert r["overall"] == pytest.approx(0.3, abs=1e-12)


def test_signal_value_rmse_validates_shapes():
    with pytest.raises(ValidationError, match="same N, H, W"):
        signal_value_rmse(np.zeros((2, 1, 1, 3)), np.zeros((3, 1, 1, 3)), np.array([0]))


# ------------------------------------------------------------------ score_pairs
@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_per_class=100, random_state=3)


def _ideal(data, order=(0, 1, 2), enc_scale=1.0):
    F = data.ideal_filters()[list(order)]
    S = data.S[list(order)] * enc_scale
    return DirectionPairs(F, 2.5 + 10 * F.sum(1), S, mean=data.X.mean(dim=(0, 2, 3)))


def test_score_pairs_ideal_pairs_are_perfect(data):
    r = score_pairs(_ideal(data), data)
    np.testing.assert_allclose(r.matched_iou, [1, 1, 1], atol=1e-12)
    assert r.off_diagonal_iou == 0.0
    np.testing.assert_allclose(r.encoder_cosine, [1, 1, 1], atol=1e-5)
    np.testing.assert_allclose(r.decoder_cosine, [1, 1, 1], atol=1e-5)
    assert r.rmse_overall < 1e-4 and r.rmse_raw_overall < 1e-4
    assert r.n_unmatched == 0


def test_score_pairs_matches_permuted_pairs(data):
    r = score_pairs(_ideal(data, order=(2, 0, 1)), data)
    assert r.assignment == [1, 2, 0]
    np.testing.assert_allclose(r.matched_iou, [1, 1, 1], atol=1e-12)
    np.testing.assert_allclose(r.encoder_cosine, [1, 1, 1], atol=1e-5)
    assert r.rmse_overall < 1e-4


def test_score_pairs_rmse_reads_along_unit_encoders(data):
    r = score_pairs(_ideal(data, enc_scale=2.0), data)
    assert r.rmse_overall < 1e-4  # unit-norm read-out: scale convention does not matter
    # raw read-out halves every value: RMSE = 0.5 * std of the true centred factors
    expected = 0.5 * float(data.true_signal_values().pow(2).mean().sqrt())
    assert r.rmse_raw_overall == pytest.approx(expected, rel=1e-4)


def test_score_pairs_wrong_direction_lowers_cosine(data):
    p = _ideal(data)
    bad = DirectionPairs(p.decoders, p.biases, p.encoders + data.Dist[0], mean=p.mean)
    r = score_pairs(bad, data)
    assert max(r.encoder_cosine) < 0.95
    np.testing.assert_allclose(r.decoder_cosine, [1, 1, 1], atol=1e-5)  # decoders untouched
    assert r.rmse_overall > 0.1


def test_unit_encoder_pairs_keeps_the_detector(data):
    p = _ideal(data, enc_scale=3.0)
    u = unit_encoder_pairs(p)
    torch.testing.assert_close(u.encoders.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(u.detect(data.X), p.detect(data.X), atol=0, rtol=0)
    torch.testing.assert_close(p.encoders.norm(dim=1), torch.full((3,), 3.0), atol=1e-5, rtol=0)  # original kept


def test_report_to_dict_is_strict_json():
    r = RecoveryReport(matched_iou=[1.0, 0.5], off_diagonal_iou=float("nan"), assignment=[0, -1],
                       iou_matrix=[[1.0, 0.0]], encoder_cosine=[1.0, 0.0], decoder_cosine=[0.5, 0.0],
                       rmse=[0.1, float("nan")], rmse_overall=0.1, rmse_raw_overall=0.2, n_unmatched=1)
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["off_diagonal_iou"] is None and d["rmse"] == [0.1, None]
    assert d["mean_iou"] == pytest.approx(0.75, abs=1e-12)
    assert d["mean_decoder_cosine"] == pytest.approx(0.25, abs=1e-12)


def test_score_pairs_validates(data):
    with pytest.raises(ValidationError, match="pairs must be a DirectionPairs"):
        score_pairs("nope", data)
    with pytest.raises(ValidationError, match="pairs have 4 features but the data has 16"):
        score_pairs(DirectionPairs(torch.eye(4)[:3], torch.zeros(3), torch.eye(4)[:3]), data)


# ------------------------------------------------------------------ scoring a subset of the planted concepts
def test_free_patches_plant_class_independent_concepts():
    from unveil.data.synthetic import make_hard_synthetic
    d = make_hard_synthetic(n_concepts=6, n_used=3, patches=2, free_patches=1, n_classes=3, n_per_class=200,
                            random_state=0)
    used = sorted({c for rule in d.classes for c in rule})
    assert used == [0, 1, 2] and d.X.shape[3] == 3 and d.info["free_concepts"] == [3, 4, 5]
    # every image holds its rule's concepts plus exactly one of the free concepts, whatever its class
    for n in range(0, 600, 37):
        got = sorted(d.concept[n].tolist())
        extra = [c for c in got if c >= 3]
        assert len(extra) == 1 and sorted(c for c in got if c < 3) == sorted(d.classes[int(d.y[n])])
    counts = torch.stack([torch.bincount(d.concept[d.y == k].flatten(), minlength=6)[3:] for k in range(3)]).double()
    freq = counts / counts.sum(1, keepdim=True)
    torch.testing.assert_close(freq, torch.full_like(freq, 1 / 3), rtol=0, atol=0.08)
    # the default recipe is unchanged by the new parameters
    a, b = make_synthetic(n_per_class=20, random_state=3), make_synthetic(n_per_class=20, random_state=3, free_patches=0)
    assert torch.equal(a.X, b.X) and a.X.shape[3] == 2
    with pytest.raises(ValidationError, match="n_used"):
        make_hard_synthetic(n_concepts=6, n_used=7)


def test_score_pairs_on_a_subset_of_concepts():
    d = make_synthetic(n_per_class=50, random_state=0)
    F = d.ideal_filters()
    mean = d.X.mean(dim=(0, 2, 3))
    # detectors for concepts 2 and 0 only, in that order
    pairs = DirectionPairs(F[[2, 0]], (2.5 + 10 * F.sum(1))[[2, 0]], d.S[[2, 0]], mean=mean)
    rep = score_pairs(pairs, d, concepts=[0, 2])
    np.testing.assert_allclose(rep.matched_iou, [1.0, 1.0], atol=1e-12)
    assert rep.assignment == [1, 0]
    np.testing.assert_allclose(rep.encoder_cosine, [1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(rep.decoder_cosine, [1.0, 1.0], atol=1e-5)
    assert rep.rmse_overall == pytest.approx(0.0, abs=1e-3)
    assert rep.off_diagonal_iou == pytest.approx(0.0, abs=1e-12)
    # over all three concepts one is unmatched
    assert score_pairs(pairs, d).n_unmatched == 1
    with pytest.raises(ValidationError, match="concepts must be distinct indices"):
        score_pairs(pairs, d, concepts=[0, 0])
    with pytest.raises(ValidationError, match="concepts must be distinct indices"):
        score_pairs(pairs, d, concepts=[3])
