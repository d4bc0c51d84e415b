"""The S³ comparison against supervised Pattern-CAVs, and the influence test sharing one precomputed null."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unveil import DirectionPairs, ValidationError
from unveil.evaluate.pattern_cav import _iou_sweep, compare_with_pattern_cavs

torch.set_num_threads(1)


def test_iou_sweep_equals_the_direct_count():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20, 4, 4, generator=g)
    mask = torch.rand(20, 16, 16, generator=g) > 0.6
    thr = torch.tensor([-1.0, 0.0, 0.3, 0.3, 1.2])
    up = F.interpolate(scores[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    direct = torch.stack([((up > t) & mask).sum() / ((up > t) | mask).sum() for t in thr]).double()
    torch.testing.assert_close(_iou_sweep(scores, mask, thr, batch=7), direct, atol=1e-6, rtol=0)


def _planted(n, seed):
    """Channel c of the maps is 3 x concept c's mask (4 x 4, the masks' resolution), plus a distractor channel."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(n, 2, 4, 4, generator=g) > 0.5
    maps = torch.cat([cells.float() * 3.0, torch.rand(n, 1, 4, 4, generator=g)], 1)
    return maps, cells


def test_pattern_cavs_and_eddp_detectors_on_planted_concepts():
    (mt, kt), (mv, kv) = _planted(60, 0), _planted(40, 1)
    # detector 0 reads concept 1, detector 1 concept 0, detector 2 the distractor
    pairs = DirectionPairs(torch.tensor([[0.0, 10, 0], [10, 0, 0], [0, 0, 10]]), torch.tensor([15.0, 15, 5]),
                           torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]))
    from unveil.experiments.shortcut import concept_iou
    it, iv = concept_iou(pairs.detect(mt), kt).numpy(), concept_iou(pairs.detect(mv), kv).numpy()
    cmp = compare_with_pattern_cavs(mt, kt, mv, kv, pairs, it, iv, concept_names=["a", "b"], min_cells=10)
    assert cmp.concepts == ["a", "b"] and cmp.eddp_detector == [1, 0]
    np.testing.assert_allclose(cmp.eddp_iou, [1.0, 1.0], rtol=0, atol=1e-12)
    # the difference of means is (nearly) the concept's own channel; its threshold is the best of a grid of
    # train quantiles, so it separates the concept up to that grid
    assert all(0.95 < v <= 1.0 for v in cmp.pattern_cav_iou)
    np.testing.assert_allclose(cmp.cos_signal, [1.0, 1.0], rtol=0, atol=1e-2)
    assert cmp.s3_eddp == pytest.approx(2.0) and cmp.eddp_wins == sum(v < 1.0 for v in cmp.pattern_cav_iou)
    with pytest.raises(ValidationError, match="eddp_iou_train / eddp_iou_val must be \\(3, 2\\)"):
        compare_with_pattern_cavs(mt, kt, mv, kv, pairs, it[:2], iv, min_cells=10)


def test_influence_with_a_precomputed_null_equals_the_computed_one():
    from unveil.data.synthetic import PoolLinearHead
    from unveil.evaluate.influence import influence, permutation_noise_vectors
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(30, 4, 3, 3, generator=g)
    labels = torch.arange(30) % 2
    head = PoolLinearHead(4, 2)
    pairs = DirectionPairs(torch.randn(2, 4, generator=g) * 3, torch.zeros(2), torch.randn(2, 4, generator=g))
    kw = dict(n_null=6, max_patches=200, epochs=10, statistic="logit", test="t", random_state=3)
    ref = influence(head, maps, labels, pairs, **kw)
    vec, _ = permutation_noise_vectors(maps, pairs, 6, random_state=3, max_patches=200, epochs=10)
    got = influence(head, maps, labels, pairs, null_vectors=vec, **kw)
    np.testing.assert_allclose(got.p_value, ref.p_value, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.score, ref.score, rtol=0, atol=1e-12)
    with pytest.raises(ValidationError, match=r"null_vectors must have shape \(n_null, I, D\) = \(6, 2, 4\)"):
        influence(head, maps, labels, pairs, null_vectors=vec[:5], **kw)
    with pytest.raises(ValidationError, match="use them with null='permutation'"):
        influence(head, maps, labels, pairs, null_vectors=vec, null="pooled", n_null=6)
