"""Broden format: export -> read round trip, label PNG coding, missing/corrupt files."""
import csv
import logging

import numpy as np
import pytest

from unveil import CorruptFileError, ValidationError
from unveil.data.broden import BrodenDataset, decode_label_png, encode_label_png, export_broden
from unveil.data.world import Concept, ConceptWorld, WatermarkSpec, WorldSample


@pytest.fixture(scope="module")
def world():
    return ConceptWorld(n_images=10, split="val", seed=7, watermark=WatermarkSpec(target_class=1, fraction=1.0))


@pytest.fixture()
def exported(world, tmp_path):
    return export_broden(world, tmp_path / "broden")


def test_round_trip_equals_original(world, exported):
    ds = BrodenDataset(exported)
    assert len(ds) == len(world)
    assert ds.concepts == world.concepts
    assert ds.categories == world.categories
    assert ds.class_names == world.class_names
    np.testing.assert_array_equal(ds.labels, world.labels)
    for i in range(len(world)):
        a, b = world[i], ds[i]
        np.testing.assert_array_equal(b.masks, a.masks)
        np.testing.assert_array_equal(b.image, a.image)
        assert b.label == a.label
    assert ds.skipped == []
    x = ds.images_tensor([0, 3])
    np.testing.assert_allclose(x.numpy(), world.images_tensor([0, 3]).numpy(), rtol=0, atol=1e-7)


def test_layout_follows_broden(world, exported):
    with open(exported / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["image", "split", "ih", "iw", "sh", "sw"]
    assert rows[0]["split"] == "val" and rows[0]["ih"] == "64"
    assert rows[0]["color"].endswith("_color.png")
    with open(exported / "label.csv") as f:
        labels = list(csv.DictReader(f))
    assert labels[0]["number"] == "1" and labels[0]["name"] == "black"
    assert labels[0]["category"].startswith("color(")
    with open(exported / "category.csv") as f:
        cats = {r["name"]: r for r in csv.DictReader(f)}
    assert set(cats) == {"color", "texture", "material", "object", "part", "shortcut", "scene"}
    assert int(cats["color"]["count"]) == 11
    # colour labels of image 0 decode to the original colour channels through R + 256 * G
    lab = decode_label_png(exported / "images" / rows[0]["color"])
    masks = world[0].masks
    for ch in range(11):
        np.testing.assert_array_equal(lab == ch + 1, masks[ch])
    # the scene column is the class label number
    with open(exported / "c_scene.csv") as f:
        scene = list(csv.DictReader(f))
    assert scene[world.labels[0]]["number"] == rows[0]["scene"]


def test_label_png_codes_numbers_above_255(tmp_path):
    lab = np.array([[0, 1, 255], [256, 300, 65535]])
    (tmp_path / "x.png").write_bytes(encode_label_png(lab))
    np.testing.assert_array_equal(decode_label_png(tmp_path / "x.png"), lab)
    with pytest.raises(ValidationError, match="numbers in"):
        encode_label_png(np.array([[70000]]))


class _Overlapping:
    """Two concepts of one category that overlap: export must write two label layers."""

    concepts = [Concept("a", "object"), Concept("b", "object"), Concept("c", "color")]
    class_names = []
    split = "train"

    def __len__(self):
        return 2

    def __getitem__(self, i):
        m = np.zeros((3, 8, 8), bool)
        m[0, :5] = True
        m[1, 3:] = True
        m[2, :, i:] = True
        return WorldSample(np.full((8, 8, 3), 40 * i, np.uint8), m, -1)


def test_overlapping_labels_round_trip(tmp_path):
    src = _Overlapping()
    out = export_broden(src, tmp_path / "b")
    with open(out / "index.csv") as f:
        row = next(csv.DictReader(f))
    assert len(row["object"].split(";")) == 2
    ds = BrodenDataset(out)
    assert ds.class_names == [] and ds.labels.tolist() == [-1, -1]
    for i in range(2):
        np.testing.assert_array_equal(ds[i].masks, src[i].masks)


def test_missing_mask_file_is_skipped_and_listed(world, exported, caplog):
    victim = exported / "images" / "world" / "000002_part.png"
    victim.unlink()
    with caplog.at_level(logging.WARNING, logger="unveil"):
        ds = BrodenDataset(exported)
    assert [(s.index, s.category, s.reason) for s in ds.skipped] == [(2, "part", "file is missing")]
    assert str(victim) in caplog.text and "skipping label file" in caplog.text
    s = ds[2]
    part = [i for i, c in enumerate(ds.concepts) if c.category == "part"]
    other = [i for i, c in enumerate(ds.concepts) if c.category != "part"]
    assert not s.masks[part].any()
    np.testing.assert_array_equal(s.masks[other], world[2].masks[other])


def test_corrupt_mask_file_is_skipped_and_listed(world, exported, caplog):
    victim = exported / "images" / "world" / "000004_color.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = BrodenDataset(exported)
    assert ds.skipped == []  # found when the image is read
    with caplog.at_level(logging.WARNING, logger="unveil"):
        s = ds[4]
    assert len(ds.skipped) == 1 and ds.skipped[0].index == 4 and ds.skipped[0].category == "color"
    assert "unreadable" in ds.skipped[0].reason and "000004_color.png" in caplog.text
    assert not s.masks[:11].any() and s.masks[11:].any()
    ds[4]
    assert len(ds.skipped) == 1  # listed once


def test_broken_index_raises_naming_the_file(exported):
    idx = exported / "index.csv"
    text = idx.read_text().splitlines()
    parts = text[2].split(",")
    parts[2] = "sixty-four"
    idx.write_text("\n".join(text[:2] + [",".join(parts)] + text[3:]) + "\n")
    with pytest.raises(CorruptFileError, match=r"index\.csv' line 3 is malformed"):
        BrodenDataset(exported)
    idx.write_text("image,split\nworld/000000.png,val\n")
    with pytest.raises(CorruptFileError, match=r"index\.csv' lacks the column\(s\) \['ih', 'iw', 'sh', 'sw'\]"):
        BrodenDataset(exported)
    idx.unlink()
    with pytest.raises(CorruptFileError, match=r"index\.csv' is missing"):
        BrodenDataset(exported)


def test_missing_image_raises(exported):
    (exported / "images" / "world" / "000001.png").unlink()
    ds = BrodenDataset(exported)
    with pytest.raises(CorruptFileError, match=r"000001\.png.*cannot be read"):
        ds[1]


def test_categories_and_resize(world, exported):
    ds = BrodenDataset(exported, categories=["object", "scene"], image_size=32)
    assert [c.category for c in ds.concepts].count("object") == 15
    assert ds.concepts[-1].category == "scene" and len(ds.concepts) == 15 + 7
    s = ds[0]
    assert s.image.shape == (32, 32, 3) and s.masks.shape == (22, 32, 32)
    np.testing.assert_array_equal(s.masks[15 + world.labels[0]], True)
    # nearest-neighbour downsampling keeps every other pixel (the second of each pair: pixel centres)
    obj = [i for i, c in enumerate(world.concepts) if c.category == "object"]
    np.testing.assert_array_equal(s.masks[:15], world[0].masks[obj][:, 1::2, 1::2])
    with pytest.raises(ValidationError, match=r"categories \['colour'\] are not columns"):
        BrodenDataset(exported, categories=["colour"])
