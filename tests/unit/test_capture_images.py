"""Image folders and preprocessing (PIL + torch)."""
import numpy as np
import pytest
import torch
from PIL import Image

from unveil import ValidationError
from unveil.data.images import Preprocessing, load_batch, load_image, scan_images


def test_preprocessing_resize_crop_normalise(tmp_path):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 40:] = 255  # left half black, right half white
    Image.fromarray(arr).save(tmp_path / "a.png")
    pre = Preprocessing(size=16, resize=20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    t = load_image(tmp_path / "a.png", pre)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    # shorter side 40 -> 20 (width 40); centre crop columns 12..28 straddle the edge at 20
    assert torch.allclose(t[:, :, 0], torch.full((3, 16), -1.0), atol=1e-6)
    assert torch.allclose(t[:, :, -1], torch.full((3, 16), 1.0), atol=1e-6)
    assert Preprocessing.imagenet(64).resize == 73
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValidationError, match="resize"):
        Preprocessing(size=32, resize=16)


def test_modes_are_converted_to_rgb(tmp_path):
    pre = Preprocessing(size=8, resize=8, mean=(0, 0, 0), std=(1, 1, 1))
    gray = np.full((8, 8), 128, dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    Image.fromarray(gray, mode="L").convert("P").save(tmp_path / "p.bmp")
    Image.fromarray(np.full((8, 8, 4), 200, dtype=np.uint8), mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 3), 60, dtype=np.uint8)).save(tmp_path / "c.webp", lossless=True)
    for name, val in (("g.png", 128), ("p.bmp", 128), ("a.png", 200), ("c.webp", 60)):
        t = load_image(tmp_path / name, pre)
        assert t.shape == (3, 8, 8)
        assert torch.allclose(t, torch.full((3, 8, 8), val / 255), atol=1.5 / 255), name


def test_scan_classes_skips_and_errors(tmp_path):
    for c in ("dog", "cat"):
        (tmp_path / c / "sub").mkdir(parents=True)
        Image.new("RGB", (9, 9)).save(tmp_path / c / "x.jpg")
        Image.new("RGB", (9, 9)).save(tmp_path / c / "sub" / "y.JPEG")
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "cat" / "readme.txt").write_text("hi")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / ".hidden" / "z.png")
    folder = scan_images(tmp_path)
    assert folder.class_names == ["cat", "dog"]
    assert folder.files == ["cat/broken.png", "cat/sub/y.JPEG", "cat/x.jpg", "dog/sub/y.JPEG", "dog/x.jpg"]
    assert folder.labels == [0, 0, 0, 1, 1]
    assert folder.skipped == [{"path": "cat/readme.txt", "reason": "not an image file (extension '.txt')"}]
    batch, kept, skipped = load_batch(folder, range(5), Preprocessing(size=8, resize=8))
    assert batch.shape == (4, 3, 8, 8) and kept == [1, 2, 3, 4]
    assert skipped[0]["path"] == "cat/broken.png" and "cannot be decoded" in skipped[0]["reason"]


def test_no_labels_without_class_folders_and_empty_folder(tmp_path):
    Image.new("RGB", (9, 9)).save(tmp_path / "a.png")
    folder = scan_images(tmp_path)
    assert folder.labels is None and folder.class_names is None
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValidationError, match=r"no images found in .*empty.*1 other files were skipped"):
        scan_images(empty)
    with pytest.raises(ValidationError, match="does not exist or is not a folder"):
        scan_images(tmp_path / "nope")
