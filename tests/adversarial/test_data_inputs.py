"""Untrusted data inputs: Broden folders, image folders, crafted images, CLI numbers and odd tensors.

Each test plants one attack or one careless-user mistake and asserts the outcome: refused with a
message that says what to do (one stderr line and exit code 1 for the CLI), nothing outside the
folder opened, nothing of the user's deleted, an earlier export still complete.
"""
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import unveil.data.broden as broden_mod
import unveil.data.images as images_mod
from unveil import EDDP, CorruptFileError, DirectionPairs, OutputExistsError, ValidationError
from unveil._validation import as_tensor, check_input_size, check_maps
from unveil.cli import main
from unveil.data.broden import MARKER, BrodenDataset, export_broden
from unveil.data.images import Preprocessing, load_batch, load_image, scan_images
from unveil.data.world import Concept, WorldSample


# ------------------------------------------------------------------------------------ helpers
class _Tiny:
    """Two concepts in two categories, 8 x 8 images: an export takes milliseconds."""

    concepts = [Concept("red", "color"), Concept("box", "object")]
    class_names = ["a", "b"]
    split = "train"

    def __init__(self, n=3, shade=0, fail_at=None):
        self.n, self.shade, self.fail_at = n, shade, fail_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("disk full (injected)")
        m = np.zeros((2, 8, 8), bool)
        m[0, : i + 1] = True
        m[1, :, 2:5] = True
        return WorldSample(np.full((8, 8, 3), self.shade + 10 * i, np.uint8), m, i % 2)


def _one_line(capsys, rc, pattern):
    """The CLI refused: exit 1, one stderr line matching ``pattern``, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _png(path, size=(8, 8), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def _bomb_png(path, width=100_000, height=100_000):
    """A 60-byte PNG whose header claims ``width x height`` pixels (its data is a stub)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def opened(monkeypatch):
    """Every path PIL opens during the test."""
    seen = []
    real = Image.open

    def spy(fp, *a, **k):
        seen.append(os.path.realpath(fp) if isinstance(fp, (str, os.PathLike)) else fp)
        return real(fp, *a, **k)
    monkeypatch.setattr(Image, "open", spy)
    return seen


@pytest.fixture()
def exported(tmp_path):
    return export_broden(_Tiny(), tmp_path / "broden")


@pytest.fixture()
def secret(tmp_path):
    return _png(tmp_path / "secret.png")


def _set_index_cell(root, row, column, value):
    lines = (root / "index.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row + 1].split(",")
    cells[header.index(column)] = value
    lines[row + 1] = ",".join(cells)
    (root / "index.csv").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------- 1. Broden paths stay inside
@pytest.mark.parametrize("column", ["image", "color"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "backslash"])
def test_broden_index_paths_outside_images_are_refused(exported, secret, opened, column, kind):
    value = {"dotdot": "../../secret.png", "absolute": str(secret), "backslash": "..\\..\\secret.png"}[kind]
    _set_index_cell(exported, 1, column, value)
    why = {"dotdot": "holds '..'", "absolute": "is absolute", "backslash": "holds a backslash"}[kind]
    with pytest.raises(CorruptFileError, match=rf"index\.csv' line 3: the {column} path .* {re.escape(why)}"):
        BrodenDataset(exported)
    assert str(secret) not in opened


@pytest.mark.parametrize("column", ["image", "object"])
def test_broden_symlinks_leading_outside_are_refused(exported, secret, opened, column):
    # a file link and a folder link inside images/, both pointing outside the data set
    cell = "world/000000.png" if column == "image" else "world/000000_object.png"
    target = exported / "images" / cell
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(CorruptFileError, match=r"line 2: the .* path .* leads outside the images folder through a "
                                               r"symbolic link"):
        BrodenDataset(exported)
    target.unlink()
    _png(target)
    (exported / "images" / "evil").symlink_to(secret.parent, target_is_directory=True)
    _set_index_cell(exported, 0, column, "evil/secret.png")
    with pytest.raises(CorruptFileError, match=r"line 2: .*symbolic link"):
        BrodenDataset(exported)
    assert str(secret) not in opened


def test_broden_link_swapped_after_loading_is_refused_at_read(exported, secret, opened):
    ds = BrodenDataset(exported)
    victim = exported / "images" / "world" / "000001.png"
    victim.unlink()
    victim.symlink_to(secret)
    with pytest.raises(CorruptFileError, match=r"line 3: the image path 'world/000001.png' leads outside"):
        ds[1]
    assert str(secret) not in opened


def test_broden_links_inside_images_and_a_linked_images_folder_work(exported, tmp_path):
    ref = BrodenDataset(exported)[0]
    img = exported / "images" / "world" / "000000.png"
    (exported / "images" / "copy.png").write_bytes(img.read_bytes())
    img.unlink()
    img.symlink_to(exported / "images" / "copy.png")
    np.testing.assert_array_equal(BrodenDataset(exported)[0].image, ref.image)
    # the images folder itself may be a link (the usual way to share one copy of Broden's images)
    (exported / "images").rename(tmp_path / "shared_images")
    (exported / "images").symlink_to(tmp_path / "shared_images", target_is_directory=True)
    np.testing.assert_array_equal(BrodenDataset(exported)[0].masks, ref.masks)


def test_broden_category_column_with_a_path_is_refused(exported):
    text = (exported / "index.csv").read_text().replace(",color,", ",../../etc/color,", 1)
    (exported / "index.csv").write_text(text)
    with pytest.raises(CorruptFileError, match=r"category column '\.\./\.\./etc/color' that is not a plain name"):
        BrodenDataset(exported)


def test_broden_bomb_image_is_refused_and_bomb_label_skipped(exported):
    _bomb_png(exported / "images" / "world" / "000002.png")
    _bomb_png(exported / "images" / "world" / "000001_color.png")
    ds = BrodenDataset(exported)
    with pytest.raises(CorruptFileError, match=r"000002\.png.*too large to decode"):
        ds[2]
    assert not ds[1].masks[0].any()
    assert len(ds.skipped) == 1 and "too large to decode" in ds.skipped[0].reason


# ------------------------------------------------------------ 2. export: never a half one, never theirs
def test_export_refuses_a_folder_of_user_files_even_with_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "index.csv").write_text("my own index\n")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"is not empty .* not a Broden export written by unveil"):
            export_broden(_Tiny(), out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "index.csv").read_text() == "my own index\n"
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no staging folder left behind


def test_export_into_an_empty_folder_and_over_its_own_export(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    export_broden(_Tiny(2), out)
    assert json.loads((out / MARKER).read_text())["n_images"] == 2
    with pytest.raises(OutputExistsError, match="already holds a Broden export; pass overwrite=True"):
        export_broden(_Tiny(3), out)
    assert len(BrodenDataset(out)) == 2
    export_broden(_Tiny(3, shade=100), out, overwrite=True)
    ds = BrodenDataset(out)
    assert len(ds) == 3 and int(ds[0].image[0, 0, 0]) == 100
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_export_overwrite_keeps_a_user_file_added_to_an_export(exported):
    (exported / "README.txt").write_text("my notes")
    (exported / "images" / "world" / "extra.jpg").write_bytes(b"user data")
    with pytest.raises(OutputExistsError, match=r"also 2 file\(s\) unveil did not write .*README\.txt"):
        export_broden(_Tiny(1), exported, overwrite=True)
    assert (exported / "README.txt").read_text() == "my notes"
    assert (exported / "images" / "world" / "extra.jpg").read_bytes() == b"user data"
    assert len(BrodenDataset(exported)) == 3


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_export_failing_midway_leaves_the_earlier_export_complete(exported, monkeypatch, swap):
    if swap == "two renames":
        monkeypatch.setattr(broden_mod, "_exchange", lambda a, b: False)
    before = {p: p.read_bytes() for p in exported.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="injected"):
        export_broden(_Tiny(5, fail_at=3), exported, overwrite=True)
    assert {p: p.read_bytes() for p in exported.rglob("*") if p.is_file()} == before
    ds = BrodenDataset(exported)
    assert len(ds) == 3 and ds[2].masks[0, :3].all()
    assert os.listdir(exported.parent) == ["broden"]
    export_broden(_Tiny(4), exported, overwrite=True)  # the fallback path also swaps
    assert len(BrodenDataset(exported)) == 4 and os.listdir(exported.parent) == ["broden"]


def test_export_failing_into_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device (injected)")
    monkeypatch.setattr(broden_mod, "encode_label_png", boom)
    with pytest.raises(OSError, match="injected"):
        export_broden(_Tiny(), tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_export_refuses_categories_that_would_be_paths(tmp_path):
    class Evil(_Tiny):
        concepts = [Concept("x", "../../escape")]
    with pytest.raises(ValidationError, match=r"category '\.\./\.\./escape' cannot be exported"):
        export_broden(Evil(), tmp_path / "e")
    assert os.listdir(tmp_path) == []


def test_cli_world_export_refuses_user_folder_and_overwrites_its_own(tmp_path, capsys):
    out = tmp_path / "w"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc = main(["world", "export", "--out", str(out), "--n-images", "2"])
    _one_line(capsys, rc, r"is not empty .* left alone\. Choose a new or empty folder")
    assert (out / "thesis.tex").read_text() == "years of work"
    out2 = tmp_path / "w2"
    assert main(["world", "export", "--out", str(out2), "--n-images", "2"]) == 0
    capsys.readouterr()
    rc = main(["world", "export", "--out", str(out2), "--n-images", "3"])
    _one_line(capsys, rc, r"already holds a Broden export; pass overwrite=True \(CLI: --overwrite\)")
    assert main(["world", "export", "--out", str(out2), "--n-images", "3", "--overwrite"]) == 0
    assert len(BrodenDataset(out2)) == 3


# ---------------------------------------------------------------- 3 + 8. CLI numbers and outputs
@pytest.mark.parametrize("argv, pattern", [
    (["world", "show", "--rows", "0"], r"--rows must be an integer >= 1, got 0"),
    (["world", "show", "--rows", "-3"], r"--rows must be an integer >= 1, got -3"),
    (["world", "show", "--rows", "1000"], r"--rows must be at most 100"),
    (["world", "show", "--out", "grid.jpg"], r"--out must be a file name ending in \.png"),
    (["world", "show", "--image-size", "100000"], r"--image-size = 100000 would make one input image 120 GB"),
    (["world", "show", "--seed", "-1"], r"--seed must be an integer >= 0"),
    (["world", "stats", "--n-images", "0"], r"--n-images must be an integer >= 1, got 0"),
    (["world", "export", "--n-images", "-5"], r"--n-images must be an integer >= 1"),
    (["world", "export", "--image-size", "4"], r"--image-size must be at least 8 pixels"),
    (["world", "train", "--epochs", "0"], r"--epochs must be an integer >= 1"),
    (["world", "train", "--threads", "0"], r"--threads must be an integer >= 1"),
    (["world", "train", "--n-train", "0"], r"--n-train must be an integer >= 1"),
    (["world", "train", "--out", "model.pt"], r"--out must be a checkpoint file path ending in \.safetensors"),
])
def test_cli_world_bad_numbers_are_one_line(tmp_path, capsys, argv, pattern):
    if "--out" not in argv and argv[1] in ("show", "export"):
        argv = argv + ["--out", str(tmp_path / ("g.png" if argv[1] == "show" else "exp"))]
    rc = main(argv)
    _one_line(capsys, rc, pattern)
    assert os.listdir(tmp_path) == []


def test_cli_world_show_out_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "grid.png"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    rc = main(["world", "show", "--out", str(folder), "--rows", "1"])
    _one_line(capsys, rc, r"--out .* is an existing folder; pass a file path")
    assert os.listdir(folder) == ["keep.txt"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(0)
    pairs = DirectionPairs(torch.randn(2, 64, generator=g), torch.zeros(2), torch.randn(2, 64, generator=g),
                           meta={"layer": "layer3"})
    pairs.save(root / "pairs")
    _png(root / "ok.png", size=(64, 64))
    return root


def _apply_argv(command, root, *extra):
    base = ["--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs")]
    if command == "explain":
        return ["explain", str(root / "ok.png"), *base, "--out", str(root / "expl"), *extra]
    return ["correct", *base, "--concepts", "0", "--out", str(root / "corr"), *extra]


@pytest.mark.parametrize("command, extra, pattern", [
    ("explain", ["--top-k", "0"], r"--top-k must be an integer >= 1, got 0"),
    ("explain", ["--batch-size", "0"], r"--batch-size must be an integer >= 1, got 0"),
    ("explain", ["--image-size", "100000"], r"--image-size = 100000 would make one input image"),
    ("explain", ["--strength", "-1"], r"--strength must be >= 0"),
    ("explain", ["--strength", "nan"], r"--strength must be a finite number"),
    ("correct", ["--batch-size", "-2"], r"--batch-size must be an integer >= 1"),
    ("correct", ["--max-clean-drop", "2"], r"--max-clean-drop must be <= 1"),
    ("correct", ["--concepts", "-1"], r"--concepts \(each index\) must be an integer >= 0, got -1"),
])
def test_cli_apply_bad_numbers_are_one_line(pairs_dir, capsys, command, extra, pattern):
    rc = main(_apply_argv(command, pairs_dir, *extra))
    _one_line(capsys, rc, pattern)


def test_cli_explain_out_is_a_file(pairs_dir, capsys, tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    argv = _apply_argv("explain", pairs_dir)
    argv[argv.index("--out") + 1] = str(f)
    _one_line(capsys, main(argv), r"--out .* exists and is not a folder")
    assert f.read_text() == "mine"


# --------------------------------------------------------- 4. file names and permissions in a folder
def test_non_utf8_file_name_is_skipped_with_a_reason(tmp_path):
    good = _png(tmp_path / "good.png")
    try:
        bad = os.path.join(os.fsencode(tmp_path), b"bad\xff.png")
        with open(bad, "wb") as f:
            f.write(good.read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    folder = scan_images(tmp_path)
    assert folder.files == ["good.png"]
    assert folder.skipped == [{"path": "bad\\xff.png", "reason": "file name is not valid UTF-8; rename the file"}]
    json.dumps(folder.skipped, ensure_ascii=False).encode("utf-8")  # the manifest stays UTF-8 JSON
    assert re.fullmatch(r"[0-9a-f]{64}", folder.fingerprint())


def test_unreadable_file_is_skipped_with_a_reason(tmp_path):
    _png(tmp_path / "good.png")
    locked = _png(tmp_path / "locked.png")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running with rights that read any file (root)")
        folder = scan_images(tmp_path)
        assert folder.files == ["good.png"]
        assert folder.skipped == [{"path": "locked.png", "reason": "file cannot be read (permission denied)"}]
        folder.fingerprint()
    finally:
        locked.chmod(0o644)


def test_unreadable_file_is_skipped_also_for_root(tmp_path, monkeypatch):
    _png(tmp_path / "good.png")
    _png(tmp_path / "locked.png")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).endswith("locked.png") and real(p, mode))
    folder = scan_images(tmp_path)
    assert folder.files == ["good.png"] and folder.skipped[0]["reason"] == "file cannot be read (permission denied)"


def test_file_vanishing_after_the_scan_does_not_crash(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", color=(0, 0, 9))
    folder = scan_images(tmp_path)
    before = folder.fingerprint()
    (tmp_path / "b.png").unlink()
    assert folder.fingerprint() != before
    batch, kept, skipped = load_batch(folder, [0, 1], Preprocessing(8, 8))
    assert kept == [0] and batch.shape == (1, 3, 8, 8)
    assert skipped[0]["path"] == "b.png" and "FileNotFoundError" in skipped[0]["reason"]


# ------------------------------------------------------------------------ 5. decompression bombs
def test_bomb_in_a_folder_is_skipped_without_decoding(tmp_path):
    _png(tmp_path / "a.png")
    _bomb_png(tmp_path / "bomb.png")
    folder = scan_images(tmp_path)
    batch, kept, skipped = load_batch(folder, [0, 1], Preprocessing(8, 8))
    assert kept == [0] and len(skipped) == 1
    assert skipped[0]["path"] == "bomb.png" and "too large to decode" in skipped[0]["reason"]


def test_image_over_our_pixel_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValidationError, match=r"claims 16 x 16 = 256 pixels, more than the limit of 100"):
        load_image(_png(tmp_path / "x.png", size=(16, 16)), Preprocessing(8, 8))
    load_image(_png(tmp_path / "y.png", size=(10, 10)), Preprocessing(8, 8))


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 200_000)
    strip = _png(tmp_path / "strip.png", size=(100_000, 1))
    with pytest.raises(ValidationError, match=r"1 pixels would be resized to 800000 x 8 before the centre crop, "
                                              r"more than the limit of 200000 pixels"):
        load_image(strip, Preprocessing(8, 8))


def test_cli_explain_bomb_is_one_line(pairs_dir, capsys, tmp_path):
    argv = _apply_argv("explain", pairs_dir)
    argv[1] = str(_bomb_png(tmp_path / "bomb.png"))
    _one_line(capsys, main(argv), r"bomb\.png' is too large to decode")


# ----------------------------------------------------------------------- 6. input size guard
def test_check_input_size():
    assert check_input_size(224, "--input-size") == 224
    with pytest.raises(ValidationError, match=r"--input-size = 100000 would make one input image 120 GB .* limit is "
                                              r"8192 pixels"):
        check_input_size(100_000, "--input-size")
    with pytest.raises(ValidationError, match="at least 8 pixels, got 7"):
        check_input_size(7, "--input-size")
    with pytest.raises(ValidationError, match="must be an integer number of pixels"):
        check_input_size(True, "--input-size")


# ------------------------------------------------------------------------------ 7. maps and numerics
@pytest.mark.parametrize("shape", [(2, 0, 3, 3), (2, 4, 0, 3), (2, 4, 3, 0), (5, 0)])
def test_maps_with_an_empty_axis_are_refused(shape):
    with pytest.raises(ValidationError, match=r"zero-sized axis; expected at least one channel and one position"):
        check_maps(torch.zeros(shape))


def test_odd_tensors_are_refused_with_a_reason():
    with pytest.raises(ValidationError, match="meta device, which holds no data"):
        check_maps(torch.empty(2, 3, 4, 4, device="meta"))
    with pytest.raises(ValidationError, match="must hold real numbers, got dtype torch.complex64"):
        check_maps(torch.zeros(2, 3, dtype=torch.complex64))
    with pytest.raises(ValidationError, match="sparse_coo tensor; expected a dense tensor"):
        check_maps(torch.zeros(2, 3).to_sparse())
    with pytest.raises(ValidationError, match="numpy array of dtype object"):
        as_tensor(np.array([[1, "a"]], dtype=object))
    t = as_tensor(np.arange(6, dtype=">f4").reshape(2, 3))  # big-endian data is read correctly
    assert t.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_maps_requiring_grad_are_detached_for_data_and_kept_for_pairs():
    X = torch.rand(2, 3, 2, 2, requires_grad=True)
    assert not check_maps(X).requires_grad
    pairs = DirectionPairs(torch.randn(2, 3), torch.zeros(2), torch.randn(2, 3))
    pairs.detect(X).sum().backward()
    assert X.grad is not None and X.grad.abs().sum() > 0
    # an estimator fits on the values (its own optimisation used to backpropagate into X and fail)
    est = EDDP(2, n_init=1, init_rounds=1, steps={"b": 5, "d": 5}, random_state=0).fit(X)
    assert est.pairs_.n_features == 3 and torch.isfinite(est.pairs_.decoders).all()


def test_gradients_flow_through_a_corrected_model():
    from unveil.edit import edit_maps
    X = torch.rand(1, 3, 2, 2, requires_grad=True)
    pairs = DirectionPairs(torch.eye(3), torch.zeros(3), torch.eye(3))
    edit_maps(X, pairs, [0], strength=1.0).sum().backward()
    assert X.grad is not None


def test_pairs_on_activations_near_the_float32_limit():
    pairs = DirectionPairs(torch.tensor([[2.0, -2.0], [1.0, 1.0]]), torch.tensor([0.5, 0.0]),
                           torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    X = torch.full((1, 2, 3, 3), 3e38)  # float32 gives 6e38 - 6e38 = inf - inf = NaN for concept 0
    det = pairs.detect(X)
    assert torch.isfinite(det).all()
    assert torch.allclose(det[0, 0], torch.sigmoid(torch.tensor(-0.5)), rtol=0, atol=1e-6)
    assert torch.allclose(det[0, 1], torch.ones(3, 3), rtol=0, atol=0)
    first = DirectionPairs(pairs.decoders[:1], pairs.biases[:1], pairs.encoders[:1])
    assert torch.allclose(first.decision_function(X), torch.full((1, 1, 3, 3), -0.5), rtol=0, atol=1e-6)
    assert torch.allclose(first.signal_values(X), torch.zeros(1, 1, 3, 3), rtol=0, atol=1e-6)
    with pytest.raises(ValidationError, match=r"decision values .* reach 6e\+38, beyond the float32 range"):
        pairs.decision_function(X)
    with pytest.raises(ValidationError, match=r"signal values reach 6e\+38, beyond the float32 range"):
        pairs.signal_values(X)
