"""RCAV influence scores and their permutation significance, on data whose answer is known."""
import numpy as np
import pytest
import torch

from unveil import DirectionPairs, HeadError, ValidationError
from unveil.data.synthetic import PoolLinearHead
from unveil.evaluate.influence import Influence, influence, noise_signal_vectors, permutation_noise_vectors, rcav

D, K = 6, 3


def planted(n=60, seed=12345):
    """Patches are concept A (x0 high, x1 low) or concept B (x1 high, x0 low), plus 4 noise coordinates.

    Detector 0 = "x0 > 2" (concept A) with its positive-only signal vector e0; over *random* patch sets
    the pattern of z = x0 is about e0 - 0.85 e1 (A and B exclude each other), so the permuted-rule null
    pushes the head the other way. Detector 1 reads noise coordinate 3 and its encoder e3 is not read
    by the head (orthogonal to it).
    """
    g = torch.Generator().manual_seed(seed)
    is_a = torch.rand(n, 1, 2, 2, generator=g) < 0.5
    hi = 3 + 2 * torch.rand(n, 1, 2, 2, generator=g)
    lo = torch.rand(n, 1, 2, 2, generator=g)
    x0 = torch.where(is_a, hi, lo)
    x1 = torch.where(is_a, lo, hi)
    noise = torch.randn(n, 4, 2, 2, generator=g)
    X = torch.cat([x0, x1, noise], 1)
    labels = torch.arange(n) % K
    head = PoolLinearHead(D, K)
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.bias.zero_()
        head.fc.weight[0, 0], head.fc.weight[0, 1], head.fc.bias[0] = 0.5, 1.0, -3.0
    eye = torch.eye(D)
    pairs = DirectionPairs(eye[[0, 3]], torch.tensor([2.0, 1.0]), eye[[0, 3]], names=["A", "noise3"])
    return X, labels, pairs, head


def test_aligned_direction_scores_plus_one_and_is_significant_orthogonal_is_not():
    """Scores, Bonferroni bookkeeping and top_concepts under the narrow ``per_direction`` null.

    That null is biased against this planted direction (its mean score has the opposite sign), so the
    significance here is no evidence of calibration; the family-wise error rate on pure noise is
    tested in test_influence_calibration.py, where this null fails and the paper's null passes.
    """
    X, y, pairs, head = planted()
    res = rcav(X, y, pairs, head, n_permutations=30, random_state=0)
    # adding e0 raises logit 0: p(class 0) up on class-0 images, p(1), p(2) down on theirs
    np.testing.assert_allclose(res.scores[0], [1.0, -1.0, -1.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.scores[1], [0.0, 0.0, 0.0], rtol=0, atol=1e-12)  # head ignores e3
    # the permuted-rule null of detector 0 points against e1 and gives the opposite signs
    np.testing.assert_allclose(res.null_mean[0], [-1.0, 1.0, 1.0], rtol=0, atol=1e-12)
    assert res.significant[0].all()
    assert not res.significant[1].any()
    assert np.all(res.p_values[1] > 0.05)
    assert res.sdc == 1 and res.scdp == 3
    assert res.class_counts.tolist() == [20, 20, 20]
    top = res.top_concepts()
    assert [r["concept"] for r in top["class_0"]["positive"]] == ["A"]
    assert top["class_0"]["negative"] == []
    assert [r["concept"] for r in top["class_1"]["negative"]] == ["A"]
    d = res.to_dict()
    assert d["sdc"] == 1 and d["scdp"] == 3 and len(d["scores"]) == 2


def test_bonferroni_level_and_count():
    X, y, pairs, head = planted()
    y = y.clone()
    y[y == 2] = 1  # class 2 has no images: 2 directions x 2 classes are tested
    res = rcav(X, y, pairs, head, n_permutations=20, random_state=1)
    assert res.config["n_tests"] == 4
    assert res.config["bonferroni_level"] == pytest.approx(0.05 / 4, rel=1e-12)
    assert np.isnan(res.scores[:, 2]).all() and not res.significant[:, 2].any()
    expected = np.nan_to_num(res.p_values, nan=1.0) < 0.05 / 4
    assert np.array_equal(res.significant, expected)
    assert res.scdp == int(expected.sum()) == 2
    # the same p-values under a looser family-wise level can only add pairs
    loose = rcav(X, y, pairs, head, n_permutations=20, random_state=1, significance=0.5)
    np.testing.assert_allclose(loose.p_values, res.p_values, rtol=0, atol=1e-12)
    assert loose.scdp >= res.scdp
    assert np.array_equal(loose.significant, np.nan_to_num(loose.p_values, nan=1.0) < 0.5 / 4)


def test_noise_vectors_follow_the_random_set_pattern():
    X, y, pairs, head = planted(n=200)
    vec, rate = noise_signal_vectors(X, pairs, 8, random_state=0)
    assert vec.shape == (8, 2, D)
    Xp = X.permute(0, 2, 3, 1).reshape(-1, D)
    assert rate[0].item() == pytest.approx(float((Xp[:, 0] > 2).double().mean()), abs=1e-12)
    # all-patch pattern of z = x0: what a random positive set estimates
    z = Xp[:, 0]
    full = ((Xp - Xp.mean(0)) * (z - z.mean())[:, None]).mean(0) / z.var(unbiased=False)
    for p in range(8):
        v = vec[p, 0]
        assert torch.dot(pairs.decoders[0], v).item() == pytest.approx(1.0, abs=1e-4)  # wᵀŝ' = 1
        cos = torch.nn.functional.cosine_similarity(v, full, dim=0).item()
        assert cos > 0.98
    assert (vec[:, 0, 1] < -0.6).all()  # the anti-correlated concept leaks in with a negative sign


def test_streamed_batches_equal_one_tensor_and_pooled_fast_path_matches():
    X, y, pairs, head = planted()
    whole = rcav(X, y, pairs, head, n_permutations=10, random_state=3, batch_size=16)
    batches = [X[i:i + 16] for i in range(0, len(X), 16)]
    streamed = rcav(batches, y, pairs, head, n_permutations=10, random_state=3)
    np.testing.assert_allclose(streamed.scores, whole.scores, rtol=0, atol=1e-12)
    np.testing.assert_allclose(streamed.null_scores, whole.null_scores, rtol=0, atol=1e-12)
    np.testing.assert_allclose(streamed.p_values, whole.p_values, rtol=0, atol=1e-12)
    fast = rcav(X, y, pairs, head, n_permutations=10, random_state=3, batch_size=16, pooled_head=head.fc)
    np.testing.assert_allclose(fast.scores, whole.scores, rtol=0, atol=1e-12)
    assert np.array_equal(fast.significant, whole.significant)
    # direction 0's null (large effects) is identical; direction 1's null may differ only where |Δp| ~ tol
    np.testing.assert_allclose(fast.null_scores[:, 0], whole.null_scores[:, 0], rtol=0, atol=1e-12)


def test_pooled_null_is_shared_and_normalize_false_scales_by_alpha():
    X, y, pairs, head = planted()
    res = rcav(X, y, pairs, head, n_permutations=6, null="pooled", random_state=0)
    assert res.null_scores.shape == (6, 2, K)
    np.testing.assert_allclose(res.null_scores[:, 0], res.null_scores[:, 1], rtol=0, atol=0)
    # a tiny raw step changes nothing beyond tol; the unit step of the same alpha does
    small = rcav(X, y, pairs, head, alpha=1e-9, normalize=False, n_permutations=0)
    np.testing.assert_allclose(small.scores, 0.0, rtol=0, atol=1e-12)
    assert np.isnan(small.p_values).all() and small.sdc == 0


def test_errors_are_clear():
    X, y, pairs, head = planted()
    with pytest.raises(ValidationError, match="one label per map"):
        rcav(X, y[:-1], pairs, head, n_permutations=0)
    with pytest.raises(ValidationError, match="one-shot iterator"):
        rcav(iter([X]), y, pairs, head, n_permutations=0)
    with pytest.raises(ValidationError, match="null must be"):
        rcav(X, y, pairs, head, null="random")
    with pytest.raises(ValidationError, match=r"labels must lie in \[0, 2\]"):
        rcav(X, y + 5, pairs, head, n_permutations=0)
    with pytest.raises(ValidationError, match="channels"):
        rcav(X[:, :4], y, pairs, head, n_permutations=0)
    with pytest.raises(HeadError, match="expected logits"):
        rcav(X, y, pairs, lambda m: m.mean(dim=(2, 3))[:, :, None], n_permutations=0)
    other = torch.nn.Linear(D, K)
    with pytest.raises(HeadError, match="pooled_head does not reproduce the head"):
        rcav(X, y, pairs, head, n_permutations=0, pooled_head=other)


def test_t_p_value_matches_scipy():
    from scipy import stats
    from unveil.evaluate.influence import _t_two_sided_p
    t = np.array([0.0, 0.3, -1.7, 2.5, 40.0])
    df = np.array([1, 5, 29, 99, 99])
    np.testing.assert_allclose(_t_two_sided_p(t, df), 2 * stats.t.sf(np.abs(t), df), rtol=1e-10, atol=1e-300)


def test_influence_api_is_frozen_and_round_trips():
    import dataclasses
    import json

    import unveil
    assert unveil.influence is influence
    X, y, pairs, head = planted()
    res = unveil.influence(head, X, y, pairs, n_null=20, epochs=20, random_state=0, statistic="sign")
    assert res.score.shape == res.p_value.shape == res.significant.shape == (2, K)
    np.testing.assert_allclose(res.score, rcav(X, y, pairs, head, n_permutations=0).scores, rtol=0, atol=1e-12)
    assert res.sdc == int(res.significant.any(1).sum()) and res.scdp == int(res.significant.sum())
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.score = None
    with pytest.raises(ValueError, match="read-only"):
        res.score[0, 0] = 2.0
    back = Influence.from_dict(json.loads(json.dumps(res.to_dict())))
    for name in ("score", "p_value", "null_mean", "null_std"):
        np.testing.assert_allclose(getattr(back, name), getattr(res, name), rtol=0, atol=0, equal_nan=True)
    assert np.array_equal(back.significant, res.significant) and back.class_names == res.class_names
    assert back.config == res.config
    bad = res.to_dict()
    bad["score"] = [["x", 1.0, 1.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValidationError, match="'score' is not a numeric array"):
        Influence.from_dict(bad)
    bad = res.to_dict()
    bad["significant"] = [[1, 0, 0], [0, 0, 0]]
    with pytest.raises(ValidationError, match="'significant' is not a boolean array"):
        Influence.from_dict(bad)
    with pytest.raises(ValidationError, match="unknown influence schema"):
        Influence.from_dict({**res.to_dict(), "schema": "other"})
    with pytest.raises(ValidationError, match="test must be one of"):
        influence(head, X, y, pairs, test="z")


def test_permutation_noise_vectors_use_balanced_subsets_and_are_reproducible():
    X, y, pairs, head = planted(n=100)
    Xp = X.permute(0, 2, 3, 1).reshape(-1, D)
    n_pos = ((Xp @ pairs.decoders.T) > pairs.biases).sum(0)
    v1, n1 = permutation_noise_vectors(X, pairs, 6, random_state=4, max_patches=100, epochs=30)
    v2, n2 = permutation_noise_vectors([X[:37], X[37:]], pairs, 6, random_state=4, max_patches=100, epochs=30)
    assert v1.shape == (6, 2, D)
    expected = 2 * torch.minimum(torch.minimum(n_pos, Xp.shape[0] - n_pos), torch.tensor(50))
    assert n1.tolist() == expected.tolist()
    assert torch.isfinite(v1).all()
    # batches of another size draw the same random keys in the same patch order: identical subsets
    np.testing.assert_allclose(v2.numpy(), v1.numpy(), rtol=1e-5, atol=1e-6)
    # a detector that never fires has no null
    never = DirectionPairs(pairs.decoders, torch.tensor([1e6, 1e6]), pairs.encoders)
    v3, n3 = permutation_noise_vectors(X, never, 3, epochs=5)
    assert n3.tolist() == [0, 0] and torch.isnan(v3).all()


def test_detected_shift_is_zero_where_nothing_fires_and_everywhere_where_everything_does():
    X, y, pairs, head = planted()
    off = DirectionPairs(pairs.decoders, torch.full((2,), 1e6), pairs.encoders)
    res = influence(head, X, y, off, n_null=0, shift="detected", statistic="sign")
    np.testing.assert_allclose(res.score, 0.0, rtol=0, atol=1e-12)
    on = DirectionPairs(pairs.decoders, torch.full((2,), -1e6), pairs.encoders)
    a = influence(head, X, y, on, n_null=0, shift="detected", statistic="sign")
    b = influence(head, X, y, on, n_null=0, shift="everywhere", statistic="sign")
    np.testing.assert_allclose(a.score, b.score, rtol=0, atol=1e-12)
    for statistic, atol in (("sign", 1e-12), ("logit", 1e-6)):  # log-odds: float32 rounding of two paths
        fast = influence(head, X, y, pairs, n_null=0, shift="detected", pooled_head=head.fc, statistic=statistic)
        slow = influence(head, X, y, pairs, n_null=0, shift="detected", statistic=statistic)
        np.testing.assert_allclose(fast.score, slow.score, rtol=0, atol=atol)
