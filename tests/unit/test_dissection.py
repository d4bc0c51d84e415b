"""Network Dissection metrics on data whose answer is known."""
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unveil import ValidationError
from unveil.evaluate.dissection import (average_precision_from_histograms, detector_from_pairs, dissect,
                                        fit_thresholds_on_train)


@dataclass
class Concept:
    name: str
    category: str


@dataclass
class Sample:
    image: np.ndarray
    masks: np.ndarray
    label: int
    annotated: Optional[Any] = None


class FakeDataset:
    def __init__(self, masks, concepts, images=None, annotated=None):
        self.masks = np.asarray(masks, dtype=bool)
        self.concepts = concepts
        n, _, h, w = self.masks.shape
        self.images = images if images is not None else np.zeros((n, h, w, 3), np.uint8)
        self.annotated = annotated

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        a = None if self.annotated is None else self.annotated[i]
        return Sample(self.images[i], self.masks[i], 0, a)


def _row(*bits):
    return np.array(bits, dtype=bool)[None, :]  # (1, W): a 1-pixel-high mask


def hand_case():
    """Two concepts, images of 1 x 4 pixels; train = images 0, 1; validation = images 2, 3."""
    A = [_row(1, 1, 0, 0), _row(0, 0, 1, 1), _row(1, 1, 0, 0), _row(1, 0, 0, 0)]
    B = [_row(0, 0, 1, 1), _row(1, 1, 0, 0), _row(0, 0, 1, 1), _row(0, 1, 1, 0)]
    masks = np.stack([np.stack([a, b]) for a, b in zip(A, B)])  # (4, 2, 1, 4)
    concepts = [Concept("A", "object"), Concept("B", "color")]
    maps = np.zeros((4, 3, 1, 4), np.float32)
    # train: d0 = A, d1 = B, d2 = A exactly
    for n in (0, 1):
        maps[n, 0], maps[n, 1], maps[n, 2] = A[n], B[n], A[n]
    # validation, by hand:
    maps[2, 0], maps[3, 0] = _row(1, 1, 0, 0), _row(1, 1, 0, 0)  # vs A: inter 2+1, union 2+2 -> 0.75
    maps[2, 1], maps[3, 1] = _row(0, 0, 1, 1), _row(0, 0, 0, 0)  # vs B: inter 2+0, union 2+2 -> 0.5
    maps[2, 2], maps[3, 2] = _row(1, 0, 0, 0), _row(1, 0, 0, 0)  # vs A: inter 1+1, union 2+1 -> 2/3
    return FakeDataset(masks, concepts), maps


def test_hand_computed_labels_s1_s2_precision_recall():
    ds, maps = hand_case()
    res = dissect(maps, ds, [0, 1], [2, 3])
    assert res.label_names() == ["A", "B", "A"]
    np.testing.assert_allclose(res.train_iou, [1.0, 1.0, 1.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.val_iou, [0.75, 0.5, 2 / 3], rtol=0, atol=1e-12)
    assert res.summary["S1"] == pytest.approx(0.75 + 0.5 + 2 / 3, abs=1e-12)
    assert res.summary["S2"] == pytest.approx(0.75 + 0.5, abs=1e-12)  # max over the two A detectors + B
    assert res.summary["n_interpretable"] == 3
    assert res.summary["n_distinct"] == 2
    np.testing.assert_allclose(res.precision, [3 / 4, 2 / 2, 2 / 2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.recall, [3 / 3, 2 / 4, 2 / 3], rtol=0, atol=1e-12)
    f1 = [2 * p * r / (p + r) for p, r in zip(res.precision, res.recall)]
    np.testing.assert_allclose(res.f1, f1, rtol=0, atol=1e-12)
    assert res.summary["mPrecision"] == pytest.approx((0.75 + 1 + 1) / 3, abs=1e-12)
    assert res.summary["mRecall"] == pytest.approx((1 + 0.5 + 2 / 3) / 3, abs=1e-12)
    rows = res.table()
    assert rows[1]["label"] == "B" and rows[1]["category"] == "color"
    d = res.to_dict()
    assert set(["S1", "S2", "n_interpretable", "n_distinct", "mPrecision", "mRecall", "mAP", "mF1"]) <= set(d["summary"])
    assert len(d["detectors"]) == 3


def test_interpretable_threshold_and_unlabelled_detector():
    ds, maps = hand_case()
    maps[:, 1] = 0.0  # detector 1 never fires -> no label, IoU 0
    res = dissect(maps, ds, [0, 1], [2, 3], iou_threshold=0.7)
    assert res.labels.tolist() == [0, -1, 0]
    assert res.label_names()[1] is None
    assert res.summary["n_interpretable"] == 1  # only 0.75 >= 0.7
    assert res.summary["S2"] == pytest.approx(0.75, abs=1e-12)
    assert res.precision[1] == 0.0 and res.ap[1] == 0.0


def blocky_case(n=12, c=3, cell=4, h=4, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.random((n, c, h, h)) < 0.35
    masks = low.repeat(cell, axis=2).repeat(cell, axis=3)
    concepts = [Concept(f"c{i}", "object" if i % 2 == 0 else "part") for i in range(c)]
    return FakeDataset(masks, concepts), low


def test_planted_detectors_get_iou_one_and_the_right_label_nearest_upsampling():
    ds, low = blocky_case()
    maps = low[:, [2, 0, 1]].astype(np.float32)  # detector i = concept perm[i] at map resolution (4x4)
    res = dissect(torch.from_numpy(maps), ds, range(0, 6), range(6, 12), upsample="nearest", batch_size=5)
    assert res.labels.tolist() == [2, 0, 1]
    np.testing.assert_allclose(res.val_iou, 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.precision, 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.recall, 1.0, rtol=0, atol=1e-12)
    assert res.summary["S1"] == pytest.approx(3.0, abs=1e-12)
    assert res.summary["S2"] == pytest.approx(3.0, abs=1e-12)


def test_perfect_scorer_has_ap_one_and_imperfect_scorer_less():
    ds, _ = blocky_case()
    perfect = ds.masks.astype(np.float32)  # maps at annotation resolution: no upsampling at all
    res = dissect(perfect, ds, range(6), range(6, 12))
    np.testing.assert_allclose(res.ap, 1.0, rtol=0, atol=1e-12)
    assert res.summary["mAP"] == pytest.approx(1.0, abs=1e-12)
    noisy = perfect + np.random.default_rng(1).normal(0, 0.6, perfect.shape).astype(np.float32)
    res2 = dissect(noisy, ds, range(6), range(6, 12))
    assert (res2.ap < 0.99).all() and (res2.ap > 0.3).all()


def test_histogram_ap_equals_sklearn_on_binned_scores():
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    for _ in range(5):
        bins = rng.integers(0, 20, size=400)
        y = rng.random(400) < (0.1 + bins / 25)
        pos = np.bincount(bins[y], minlength=20)[None]
        neg = np.bincount(bins[~y], minlength=20)[None]
        got = average_precision_from_histograms(pos, neg)[0]
        assert got == pytest.approx(average_precision_score(y, bins), abs=1e-12)


def _one_shot_iou(maps, masks, ann, thr, mode):
    """Independent whole-dataset computation (everything in memory at once)."""
    up = F.interpolate(torch.as_tensor(maps), size=masks.shape[-2:], mode=mode,
                       **({"align_corners": False} if mode == "bilinear" else {})).numpy()
    M = up > thr
    L = masks
    inter = np.einsum("nihw,nchw,nc->ic", M.astype(np.float64), L.astype(np.float64), ann.astype(np.float64))
    sm = np.einsum("nihw,nc->ic", M.astype(np.float64), ann.astype(np.float64))
    sl = np.einsum("nchw,nc->c", L.astype(np.float64), ann.astype(np.float64))
    union = sm + sl[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_streaming_equals_one_shot(mode):
    rng = np.random.default_rng(3)
    n, c, i = 14, 5, 4
    masks = rng.random((n, c, 8, 8)) < 0.3
    ann = rng.random((n, c)) < 0.8
    maps = rng.random((n, i, 4, 4)).astype(np.float32)
    ds = FakeDataset(masks, [Concept(f"c{k}", "x") for k in range(c)])
    tr, va = list(range(0, 8)), list(range(8, 14))
    thr = np.array([0.5, 0.6, 0.4, 0.7], np.float32)
    streamed = dissect(maps, ds, tr, va, threshold=thr, annotated=ann, batch_size=3, upsample=mode,
                       max_elements=100)  # also forces chunking over detectors
    whole = dissect(maps, ds, tr, va, threshold=thr, annotated=ann, batch_size=100, upsample=mode)
    exp_tr = _one_shot_iou(maps[tr], masks[tr], ann[tr], thr[None, :, None, None], mode)
    exp_va = _one_shot_iou(maps[va], masks[va], ann[va], thr[None, :, None, None], mode)
    np.testing.assert_allclose(streamed.iou_train, exp_tr, rtol=0, atol=1e-9)
    np.testing.assert_allclose(streamed.iou_val, exp_va, rtol=0, atol=1e-9)
    for name in ("iou_train", "iou_val", "precision", "recall", "f1", "ap", "val_iou"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=0, atol=1e-9)
    assert streamed.summary == pytest.approx(whole.summary, abs=1e-9)


def test_annotated_categories_exclude_images_from_the_union():
    # concept A ("object") present in both images; detector = A in image 0, A plus junk in image 1
    A0, A1 = _row(1, 1, 0, 0), _row(1, 0, 0, 0)
    masks = np.stack([np.stack([A0]), np.stack([A1])])  # (2, 1, 1, 4)
    maps = np.stack([np.stack([A0]), np.stack([_row(1, 1, 1, 1)])]).astype(np.float32)
    concepts = [Concept("A", "object")]
    full = dissect(maps, FakeDataset(masks, concepts), [0, 1], [0, 1])
    assert full.iou_train[0, 0] == pytest.approx((2 + 1) / (2 + 4), abs=1e-12)
    # category 'object' not annotated on image 1 -> image 1 does not count for A
    by_cat = FakeDataset(masks, concepts, annotated=[{"object"}, set()])
    res = dissect(maps, by_cat, [0, 1], [0, 1])
    assert res.iou_train[0, 0] == pytest.approx(1.0, abs=1e-12)
    res2 = dissect(maps, FakeDataset(masks, concepts), [0, 1], [0, 1], annotated=np.array([[True], [False]]))
    assert res2.iou_val[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert res2.precision[0] == pytest.approx(1.0, abs=1e-12)
    res3 = dissect(maps, FakeDataset(masks, concepts), [0, 1], [0, 1],
                   annotated=lambda i, s: np.array([i == 0]))
    assert res3.iou_train[0, 0] == pytest.approx(1.0, abs=1e-12)


def test_callable_detector_on_images_and_pairs_helper():
    from unveil import DirectionPairs
    ds, low = blocky_case(n=6, c=2)
    images = np.zeros((6, 16, 16, 3), np.uint8)
    images[..., 0] = ds.masks[:, 1] * 255  # red channel = concept 1
    images[..., 2] = ds.masks[:, 0] * 255  # blue channel = concept 0
    ds.images = images
    # features = the image itself (D = 3); decoders read red / blue with a sharp sigmoid
    pairs = DirectionPairs(torch.tensor([[20.0, 0, 0], [0, 0, 20.0]]), torch.tensor([10.0, 10.0]), torch.eye(3)[[0, 2]])
    det = detector_from_pairs(pairs, lambda im: im)
    res = dissect(det, ds, [0, 1, 2], [3, 4, 5], batch_size=2)
    assert res.labels.tolist() == [1, 0]
    np.testing.assert_allclose(res.val_iou, 1.0, rtol=0, atol=1e-12)


def test_top_activations_find_the_strongest_cell():
    rng = np.random.default_rng(0)
    maps = rng.random((10, 2, 4, 4)).astype(np.float32) * 0.5
    maps[7, 0, 2, 3] = 5.0
    maps[2, 0, 1, 1] = 4.0
    maps[4, 1, 0, 2] = 9.0
    ds = FakeDataset(rng.random((10, 1, 8, 8)) < 0.5, [Concept("c", "x")])
    res = dissect(maps, ds, range(5), range(5, 10), top_k=3, batch_size=4)
    top0 = res.top_activations(0)
    assert [t["index"] for t in top0[:2]] == [7, 2]
    assert (top0[0]["row"], top0[0]["col"]) == (2, 3)
    assert top0[0]["box"] == pytest.approx((0.5, 0.75, 0.75, 1.0), abs=1e-12)
    assert top0[0]["value"] == pytest.approx(5.0, abs=1e-6)
    assert res.top_activations(1, k=1)[0]["index"] == 4
    assert len(res.top_activations(1)) == 3


def test_fit_thresholds_top_quantile_exact():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(20, 3, 5, 5)).astype(np.float32)
    ds = FakeDataset(np.zeros((20, 1, 5, 5), bool), [Concept("c", "x")])
    tr = list(range(0, 16))
    thr = fit_thresholds_on_train(maps, ds, tr, quantile=0.99, batch_size=3)
    vals = maps[tr].transpose(1, 0, 2, 3).reshape(3, -1)
    m = int(np.ceil(0.01 * vals.shape[1]))  # 16 * 25 = 400 values -> m = 4
    assert m == 4
    for i in range(3):
        assert int((vals[i] > thr[i].item()).sum()) == m
        assert thr[i].item() == pytest.approx(np.sort(vals[i])[::-1][m], abs=1e-6)
    res = dissect(maps, ds, tr, range(16, 20), threshold=thr)
    assert res.config["threshold"] == pytest.approx(thr.tolist(), abs=1e-6)


def test_errors_have_clear_messages():
    ds, maps = hand_case()
    with pytest.raises(ValidationError, match="outside the dataset"):
        dissect(maps, ds, [0, 9], [2])
    with pytest.raises(ValidationError, match="val_indices is empty"):
        dissect(maps, ds, [0], [])
    with pytest.raises(ValidationError, match="one threshold per detector"):
        dissect(maps, ds, [0], [1], threshold=[0.5, 0.5])
    with pytest.raises(ValidationError, match="one map per dataset index"):
        dissect(maps[:3], ds, [0], [1])
    with pytest.raises(ValidationError, match="upsample must be"):
        dissect(maps, ds, [0], [1], upsample="cubic")
    with pytest.raises(ValidationError, match=r"expected \(2, I, h, w\)"):
        dissect(lambda im: torch.zeros(1, 3, 1, 4), ds, [0, 1], [2])
    bad = maps.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValidationError, match="NaN"):
        dissect(bad, ds, [0], [1])


def test_separate_validation_dataset_equals_one_dataset():
    ds, low = blocky_case(n=12)
    maps = low[:, [1, 0, 2]].astype(np.float32)
    one = dissect(maps, ds, range(6), range(6, 12), upsample="nearest")
    train = FakeDataset(ds.masks[:6], ds.concepts)
    val = FakeDataset(ds.masks[6:], ds.concepts)
    two = dissect(maps[:6], train, range(6), range(6), val_dataset=val, val_maps=maps[6:], upsample="nearest")
    for name in ("iou_train", "iou_val", "precision", "recall", "ap"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=0, atol=1e-12)
    assert {t["split"] for t in two.top_activations(0)} <= {"train", "val"}
    with pytest.raises(ValidationError, match="pass val_maps"):
        dissect(maps[:6], train, range(6), range(6), val_dataset=val)
    other = FakeDataset(ds.masks[6:], [Concept(f"x{i}", "object") for i in range(3)])
    with pytest.raises(ValidationError, match="other concepts"):
        dissect(maps[:6], train, range(6), range(6), val_dataset=other, val_maps=maps[6:])
