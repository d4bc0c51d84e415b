"""The procedural concept world: determinism, exact masks under occlusion, class rules, watermark."""
import numpy as np
import pytest
import torch

from unveil import ValidationError
from unveil.data import world as W
from unveil.data.world import (CLASS_RULES, COLOR_NAMES, Concept, ConceptWorld, WatermarkSpec, concept_statistics,
                               rule_satisfied)

PARTS_OF = {"crown": {"tree"}, "trunk": {"tree"}, "roof": {"house"}, "facade": {"house"}, "door": {"house"},
            "window": {"house", "car"}, "body": {"car"}, "wheel": {"car"}}


@pytest.fixture(scope="module")
def world():
    return ConceptWorld(n_images=70, split="val", seed=3)


def _channels(concepts, category):
    return [i for i, c in enumerate(concepts) if c.category == category]


def test_protocol_shapes_and_types(world):
    s = world[0]
    assert isinstance(s, W.WorldSample)
    assert s.image.dtype == np.uint8 and s.image.shape == (64, 64, 3)
    assert s.masks.dtype == bool and s.masks.shape == (len(world.concepts), 64, 64)
    assert isinstance(s.label, int) and 0 <= s.label < len(world.class_names)
    assert world.categories == ["color", "texture", "material", "object", "part"]
    assert all(isinstance(c, Concept) and c.category in world.categories for c in world.concepts)
    assert [c.name for c in world.concepts[:11]] == list(COLOR_NAMES)
    assert world.labels.dtype == np.int64 and world.labels.shape == (70,)
    assert len(world) == 70 and world[-1].label == world.labels[69]
    with pytest.raises(IndexError, match="out of range"):
        world[70]


def test_images_tensor_matches_samples(world):
    x = world.images_tensor([2, 5])
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 64, 64)
    ref = world[5].image.transpose(2, 0, 1).astype(np.float32) / 255.0
    np.testing.assert_allclose(x[1].numpy(), ref, rtol=0, atol=1e-7)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_same_seed_same_bytes_and_prefix_stable():
    a, b = ConceptWorld(12, seed=5), ConceptWorld(20, seed=5)
    for i in range(12):
        assert a[i].image.tobytes() == b[i].image.tobytes()
        assert a[i].masks.tobytes() == b[i].masks.tobytes()
        assert a[i].label == b[i].label
    c = ConceptWorld(12, seed=6)
    assert any(a[i].image.tobytes() != c[i].image.tobytes() for i in range(12))
    d = ConceptWorld(12, seed=5, split="test")
    assert any(a[i].image.tobytes() != d[i].image.tobytes() for i in range(12))


def test_labels_balanced():
    ds = ConceptWorld(7 * 20, seed=1)
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=7), np.full(7, 20))


def test_constructed_occlusion_case():
    """A later-drawn object removes the earlier ones' labels where it covers them."""
    n = 32
    canvas = W._Canvas(n, len(W._BASE_CONCEPTS))
    red, blue = W._COL["red"], W._COL["blue"]
    ball = W._disc(n, 10, 16, 8)
    box = W._rect(n, 12, 4, 28, 28)
    canvas.paint_plain(ball, W._COLOR_RGB[red], red, [W._OBJ["ball"], W._FINISH_CH["metal"]])
    canvas.paint_plain(box, W._COLOR_RGB[blue], blue, [W._OBJ["box"]])
    m = canvas.masks
    np.testing.assert_array_equal(m[W._OBJ["ball"]], ball & ~box)
    np.testing.assert_array_equal(m[W._OBJ["box"]], box)
    np.testing.assert_array_equal(m[red], ball & ~box)
    np.testing.assert_array_equal(m[blue], box)
    np.testing.assert_array_equal(m[W._FINISH_CH["metal"]], ball & ~box)  # finish label removed too
    assert (ball & box).sum() > 20  # the case really overlaps
    np.testing.assert_array_equal(canvas.image[box], np.broadcast_to(W._COLOR_RGB[blue], (box.sum(), 3)))


def test_masks_consistent_with_pixels_and_structure():
    """Every pixel: exactly one colour, at most one object, one part, one finish; parts lie on their
    objects; pixel colours (noise off, materials aside) lie within the jitter of their colour label."""
    ds = ConceptWorld(40, seed=11, noise=0.0, watermark=WatermarkSpec(target_class=2, fraction=1.0))
    C = ds.concepts
    col, obj, part = _channels(C, "color"), _channels(C, "object"), _channels(C, "part")
    fin = _channels(C, "texture") + _channels(C, "material")
    mat = _channels(C, "material")
    name_ch = {(c.category, c.name): i for i, c in enumerate(C)}
    for i in range(len(ds)):
        s = ds[i]
        m = s.masks
        np.testing.assert_array_equal(m[col].sum(0), 1)
        np.testing.assert_array_equal(m[obj + [len(C) - 1]].sum(0), 1)  # background objects cover the rest
        assert m[part].sum(0).max() <= 1 and m[fin].sum(0).max() <= 1
        for pname, owners in PARTS_OF.items():
            pm = m[name_ch[("part", pname)]]
            allowed = np.zeros_like(pm)
            for o in owners:
                allowed |= m[name_ch[("object", o)]]
            assert not (pm & ~allowed).any(), (i, pname)
        plain = ~m[mat].any(0)
        for ci in col:
            sel = m[ci] & plain
            if sel.any():
                dev = np.abs(s.image[sel].astype(np.float32) - W._COLOR_RGB[ci])
                assert dev.max() <= 14.0 + 0.5 + 1e-6, (i, C[ci].name, dev.max())


def test_every_concept_appears():
    ds = ConceptWorld(140, seed=0, watermark=WatermarkSpec(target_class=0, fraction=0.5))
    stats = concept_statistics(ds)
    assert len(stats) == len(ds.concepts) == 43
    missing = [k for k, v in stats.items() if v["image_frequency"] == 0]
    assert missing == []
    # the colour masks partition every image
    assert sum(v["pixel_fraction"] for k, v in stats.items() if k.startswith("color/")) == pytest.approx(1.0, abs=1e-9)
    # no concept is rare: each is in at least 2% of the images
    assert min(v["image_frequency"] for v in stats.values()) >= 0.02


def test_class_rules_hold_on_masks(world):
    rules = world.class_rules
    min_px = max(8, int(round(0.004 * 64 ** 2)))
    for i in range(len(world)):
        s = world[i]
        name = world.class_names[s.label]
        # the class's own concepts are visible ...
        for o in rules[name]:
            assert s.masks[world.concept_index(o, "object")].sum() >= min_px, (i, name, o)
        # ... and no other class's rule holds, even counting single pixels
        assert rule_satisfied(s.masks, world.concepts, min_pixels=1) == [name]


def test_no_single_concept_decides_the_class():
    keys = {}
    for name, ground, ks in CLASS_RULES:
        for c in (ground,) + ks:
            keys.setdefault(c, set()).add(name)
    assert all(len(v) >= 2 for v in keys.values()), keys
    # key objects of other classes do occur as distractors
    ds = ConceptWorld(70, seed=2)
    own = 0
    for i in range(len(ds)):
        s = ds[i]
        rule = set(ds.class_rules[ds.class_names[s.label]])
        present = {c.name for k, c in enumerate(ds.concepts) if c.name in W._KEY_OBJECTS and s.masks[k].any()}
        own += len(present - rule)
    assert own >= 20


def test_watermark_masks_where_stamped():
    spec = WatermarkSpec(target_class=3, fraction=0.5)
    ds = ConceptWorld(140, seed=4, watermark=spec)
    assert ds.concepts[-1] == Concept("watermark", "shortcut") and ds.categories[-1] == "shortcut"
    wm = ds.concept_index("watermark")
    stamped = ds.watermarked
    assert not stamped[ds.labels != 3].any()
    assert 0.25 <= stamped[ds.labels == 3].mean() <= 0.75
    for i in range(len(ds)):
        m = ds[i].masks[wm]
        if stamped[i]:
            ys, xs = np.nonzero(m)
            assert m.sum() == (4 * 4 - 1 + 2) * 7  # "rook": (4 glyphs * 4 px - 1 + 2 px border) x 7 rows
            assert ys.min() >= 64 - 7 - 3 and xs.min() >= 64 - 17 - 3  # bottom-right corner
        else:
            assert not m.any()
    poisoned = ConceptWorld(140, seed=4, split="poisoned_test", watermark=spec)
    clean = ConceptWorld(140, seed=4, split="test")
    np.testing.assert_array_equal(poisoned.labels, clean.labels)
    assert poisoned.watermarked[poisoned.labels != 3].all() and not poisoned.watermarked[poisoned.labels == 3].any()
    i = int(np.flatnonzero(poisoned.watermarked)[0])
    p, c = poisoned[i], clean[i]
    inside = p.masks[-1]
    np.testing.assert_array_equal(p.image[~inside], c.image[~inside])  # same picture, stamp added
    np.testing.assert_array_equal(p.masks[:-1, ~inside], c.masks[:, ~inside])


def test_image_size_96():
    ds = ConceptWorld(7, seed=0, image_size=96)
    s = ds[3]
    assert s.image.shape == (96, 96, 3) and s.masks.shape == (42, 96, 96)
    assert rule_satisfied(s.masks, ds.concepts) == [ds.class_names[s.label]]


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "holdout"}, "split must be one of"),
    ({"split": "poisoned_test"}, "needs watermark"),
    ({"n_images": 0}, "n_images must be an integer >= 1"),
    ({"image_size": 16}, "image_size must be an integer >= 32"),
    ({"watermark": "rook"}, "watermark must be a WatermarkSpec"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        ConceptWorld(**{"n_images": 4, **kwargs})


def test_bad_watermark_spec():
    with pytest.raises(ValidationError, match="letters"):
        WatermarkSpec(text="rook!")
    with pytest.raises(ValidationError, match="target_class must be < 7"):
        WatermarkSpec(target_class=7)
    with pytest.raises(ValidationError, match="fraction must be <= 1.0"):
        WatermarkSpec(fraction=1.5)


def test_plot_helpers_return_axes(world):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ax = W.plot_sample(world[0], world.concepts, channel=world.concept_index("sky"))
    assert ax.get_title() == "object/sky"
    fig = W.plot_samples(world, [0, 1])
    assert len(fig.axes) == 2 * 5
    plt.close("all")
