"""Untrusted stores, bundles and outputs: no code runs from a file, no path leaves its folder, no failed
write loses data, and every refusal is one clear line.

Each test plants one attack or one careless-user mistake and asserts the outcome: refused with a
message that says what to do, nothing outside the folder read, nothing of the user's deleted, the
previous bundle still loadable.
"""
import errno
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import unveil._io as io_mod
import unveil.capture.store as store_mod
from unveil import BusyError, CorruptFileError, DirectionPairs, HeadError, OutputExistsError
from unveil._io import folder_lock, save_bundle
from unveil.capture import ActivationStore, extract, head_for_store
from unveil.cli import main
from unveil.data.images import Preprocessing
from unveil.models import load_model, model_source

PRE = Preprocessing.imagenet(32)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def resnet():
    return load_model("resnet18", num_classes=3)[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv_imgs")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def clean_store(resnet, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("adv_store") / "store"
    extract(resnet, "layer3", images, out, batch_size=3, shard_size=3, preprocessing=PRE, model_id="resnet18",
            model_source=model_source("resnet18", num_classes=3), dtype="float32")
    return out


def _copy_store(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(store, fn):
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def _one_line(capsys, match):
    err = capsys.readouterr().err.strip().split("\r")[-1]
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    assert "internal error" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def reads(monkeypatch):
    """Every file path that numpy loads or that is hashed, so a test can assert what was read."""
    seen = []
    real_load, real_sha = np.load, io_mod.sha256_file

    def load(f, *a, **k):
        seen.append(os.path.realpath(f))
        return real_load(f, *a, **k)

    def sha(p):
        seen.append(os.path.realpath(p))
        return real_sha(p)
    monkeypatch.setattr(store_mod.np, "load", load)
    monkeypatch.setattr(store_mod, "sha256_file", sha)
    return seen


# ------------------------------------------------------------------------ code identity from files
def test_manifest_naming_an_importable_factory_runs_nothing(clean_store, tmp_path, monkeypatch, capsys):
    evil = tmp_path / "evilpkg_unveil_test.py"
    marker = tmp_path / "ran"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\ndef make(**kw):\n    raise SystemExit('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store = _copy_store(clean_store, tmp_path / "s")
    for name in ("evilpkg_unveil_test:make", "subprocess:run", "os:system"):
        _edit_manifest(store, lambda m: m.__setitem__("model", {"name": name, "options": {"args": "touch x"},
                                                               "weights": None, "weights_sha256": None}))
        with pytest.raises(HeadError, match="does not import code named in a file"):
            head_for_store(store)
        assert main(["fit", str(store), "--concepts", "2", "--out", str(tmp_path / "p")]) == 1
        _one_line(capsys, "unveil fit --model")
    assert not marker.exists() and "evilpkg_unveil_test" not in sys.modules


def test_caller_named_model_must_match_the_manifest(clean_store):
    with pytest.raises(HeadError, match="was extracted with model 'resnet18'"):
        head_for_store(clean_store, model_name="vit-tiny")


def test_model_options_of_the_wrong_type_are_refused(clean_store, tmp_path):
    store = _copy_store(clean_store, tmp_path / "s")
    for options in ({"num_classes": [3]}, {"__class__": 1}, ["num_classes", 3], {"num_classes": "x" * 500}):
        _edit_manifest(store, lambda m: m["model"].__setitem__("options", options))
        with pytest.raises(CorruptFileError, match="records model options"):
            head_for_store(store)


def test_weights_path_from_a_manifest_is_never_read(clean_store, tmp_path, reads, monkeypatch):
    store = _copy_store(clean_store, tmp_path / "s")
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not for you")
    _edit_manifest(store, lambda m: m["model"].update(weights=str(secret), weights_sha256="ab" * 32))
    import unveil.models as models_mod
    opened = []
    monkeypatch.setattr(models_mod, "_read_state_dict", lambda p: opened.append(p))
    with pytest.raises(HeadError, match="unveil reads only weights you name"):
        head_for_store(store)
    assert str(secret) not in reads and not opened
    with pytest.raises(HeadError, match="not the one the store was extracted with"):
        head_for_store(store, weights=secret)  # named by the caller: hashed, refused, never loaded
    assert not opened


# -------------------------------------------------------------------------- paths leaving a root
@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.npy", "shards/../../outside.npy",
                                   "shards/maps_00000.npy/../../../outside.npy", "shards/other.npy",
                                   "shards\\maps_00000.npy", 7, None])
def test_shard_entries_outside_the_store_are_refused(clean_store, tmp_path, reads, entry):
    store = _copy_store(clean_store, tmp_path / "s")
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros((3, 256, 2, 2), np.float32))
    _edit_manifest(store, lambda m: m["shards"][0].__setitem__("file", entry))
    with pytest.raises(CorruptFileError, match="shard 0's 'file' entry"):
        ActivationStore.open(store)
    assert str(outside) not in reads


def test_symlinked_shard_pointing_outside_is_refused(clean_store, tmp_path, reads):
    store = _copy_store(clean_store, tmp_path / "s")
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros((3, 256, 2, 2), np.float32))
    shard = store / "shards" / "maps_00000.npy"
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(CorruptFileError, match="outside the folder"):
        ActivationStore.open(store)
    assert str(outside) not in reads


def test_positions_entry_outside_the_store_is_refused(resnet, images, tmp_path, reads):
    store = tmp_path / "sub"
    extract(resnet, "layer3", images, store, batch_size=3, shard_size=3, preprocessing=PRE, subsample=2)
    outside = tmp_path / "pos.npy"
    np.save(outside, np.zeros((3, 2), np.int32))
    _edit_manifest(store, lambda m: m["shards"][0].__setitem__("positions", str(outside)))
    with pytest.raises(CorruptFileError, match="'positions' entry"):
        ActivationStore.open(store).positions([0])
    assert str(outside) not in reads


@pytest.mark.parametrize("field,value,match", [
    ("n_maps", "6", "field 'n_maps'"), ("n_features", -1, "field 'n_features'"), ("map_shape", [2], "field 'map_shape'"),
    ("dtype", "object", "field 'dtype'"), ("image_ids", "abc", "field 'image_ids'"),
    ("labels", [0], "field 'labels'"), ("class_names", 3, "field 'class_names'"), ("layer", ["x"], "field 'layer'"),
    ("shards", {"0": 1}, "field 'shards'"), ("subsampled", "yes", "field 'subsampled'")])
def test_manifest_fields_of_the_wrong_type_are_one_clear_error(clean_store, tmp_path, field, value, match):
    store = _copy_store(clean_store, tmp_path / "s")
    _edit_manifest(store, lambda m: m.__setitem__(field, value))
    with pytest.raises(CorruptFileError, match=match):
        ActivationStore.open(store)


def test_shard_record_of_the_wrong_type_and_non_utf8_manifest(clean_store, tmp_path, capsys):
    store = _copy_store(clean_store, tmp_path / "s")
    _edit_manifest(store, lambda m: m["shards"].__setitem__(0, "maps_00000.npy"))
    with pytest.raises(CorruptFileError, match="shard record 0"):
        ActivationStore.open(store)
    (store / "manifest.json").write_bytes(b"\xff\xfe{not json")
    assert main(["fit", str(store), "--concepts", "2", "--out", str(tmp_path / "p")]) == 1
    _one_line(capsys, "is not valid JSON")


def test_modified_shard_of_the_same_shape_is_refused_before_use(clean_store, tmp_path):
    store = _copy_store(clean_store, tmp_path / "s")
    arr = np.load(store / "shards" / "maps_00001.npy")
    np.save(store / "shards" / "maps_00001.npy", arr + 1.0)
    opened = ActivationStore.open(store)                # cheap: shapes only
    assert opened.maps([0]).shape == (1, 256, 2, 2)     # shard 0 is intact and readable
    with pytest.raises(CorruptFileError, match="does not match its recorded checksum"):
        opened.maps([4])
    with pytest.raises(CorruptFileError, match="does not match its recorded checksum"):
        ActivationStore.open(store, verify="full")
    assert torch.allclose(ActivationStore.open(store, verify="none").maps([4]),
                          torch.from_numpy(arr[1:2] + 1.0), rtol=0, atol=0)


def test_tampered_shard_record_is_recomputed_not_trusted(resnet, images, tmp_path, reads):
    out = tmp_path / "s"
    kw = dict(batch_size=3, shard_size=3, preprocessing=PRE)
    full = extract(resnet, "layer3", images, out, **kw).maps(range(6))
    (out / "manifest.json").unlink()  # as if interrupted before the manifest
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros((3, 256, 2, 2), np.float16))
    rec = json.loads((out / "shards" / "shard_00000.json").read_text())
    rec["file"] = str(outside)
    (out / "shards" / "shard_00000.json").write_text(json.dumps(rec))
    resumed = extract(resnet, "layer3", images, out, **kw)
    assert str(outside) not in reads
    assert torch.equal(resumed.maps(range(6)), full)


# -------------------------------------------------------------------------------------- data loss
def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return DirectionPairs(torch.randn(2, 4, generator=g), torch.zeros(2), torch.randn(2, 4, generator=g))


def test_failed_save_leaves_the_old_bundle_loadable(tmp_path, monkeypatch):
    old = _pairs(0)
    old.save(tmp_path / "p")
    bad = _pairs(1).with_meta(obj=object())  # not JSON
    with pytest.raises(CorruptFileError, match="not JSON-serialisable"):
        bad.save(tmp_path / "p")
    assert torch.equal(DirectionPairs.load(tmp_path / "p").decoders, old.decoders)

    real = os.fsync
    calls = {"n": 0}

    def full_disk(fd):  # the second staged file (the json) hits a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(io_mod.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _pairs(2).save(tmp_path / "p")
    monkeypatch.undo()
    assert torch.equal(DirectionPairs.load(tmp_path / "p").decoders, old.decoders)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["pairs.json", "pairs.safetensors"]


def test_save_never_replaces_files_it_did_not_write(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "pairs.json").write_text('{"my": "own file"}')
    with pytest.raises(OutputExistsError, match="that unveil did not write"):
        _pairs().save(folder)
    assert json.loads((folder / "pairs.json").read_text()) == {"my": "own file"}
    _pairs().save(tmp_path / "ours")
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        _pairs(1).save(tmp_path / "ours", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        save_bundle(tmp_path / "file", "pairs", {}, {})


def test_fit_out_refuses_to_replace_pairs_without_overwrite(clean_store, tmp_path, capsys):
    out = tmp_path / "pairs"
    args = ["fit", str(clean_store), "--concepts", "2", "--out", str(out), "--no-head", "--epochs-scale", "0.05"]
    assert main(args) == 0
    before = (out / "pairs.safetensors").read_bytes()
    assert main(args + ["--seed", "1"]) == 1
    _one_line(capsys, "--overwrite")
    assert (out / "pairs.safetensors").read_bytes() == before
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert (out / "pairs.safetensors").read_bytes() != before


def test_overwrite_never_deletes_user_files(resnet, images, tmp_path):
    kw = dict(batch_size=3, shard_size=3, preprocessing=PRE)
    # a folder holding only shards/ with the user's files is not a store
    user = tmp_path / "user"
    (user / "shards").mkdir(parents=True)
    (user / "shards" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match="not an activation store"):
        extract(resnet, "layer3", images, user, overwrite=True, **kw)
    assert (user / "shards" / "thesis.tex").read_text() == "precious"
    # our store with a user file dropped into shards/: --overwrite deletes only our files
    ours = tmp_path / "ours"
    extract(resnet, "layer3", images, ours, **kw)
    (ours / "shards" / "notes.txt").write_text("keep me")
    (ours / "README").write_text("keep me too")
    store = extract(resnet, "layer3", images, ours, overwrite=True, dtype="float32", **kw)
    assert store.manifest["dtype"] == "float32"
    assert (ours / "shards" / "notes.txt").read_text() == "keep me" and (ours / "README").read_text() == "keep me too"


def test_symlinked_shards_folder_is_refused_not_followed(resnet, images, tmp_path):
    kw = dict(batch_size=3, shard_size=3, preprocessing=PRE)
    out = tmp_path / "s"
    extract(resnet, "layer3", images, out, **kw)
    elsewhere = tmp_path / "elsewhere"
    (out / "shards").rename(elsewhere)
    (out / "shards").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    with pytest.raises(OutputExistsError, match="symbolic link"):
        extract(resnet, "layer3", images, out, overwrite=True, dtype="float32", **kw)
    assert sorted(p.name for p in elsewhere.iterdir()) == before


def test_second_writer_of_a_store_is_refused(resnet, images, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    with folder_lock(out, "activation store"):  # another extraction is running
        with pytest.raises(BusyError, match="another process is writing"):
            extract(resnet, "layer3", images, out, batch_size=3, preprocessing=PRE)
        assert main(["extract", "--model", "resnet18", "--image-size", "32", "--layer", "layer3",
                     "--images", str(images), "--out", str(out)]) == 1
        _one_line(capsys, "another process is writing")
    assert not (out / "manifest.json").exists()
    assert len(extract(resnet, "layer3", images, out, batch_size=3, preprocessing=PRE)) == 6  # lock released


# ----------------------------------------------------------------------------------- bundles
def test_pairs_and_correction_with_fields_of_the_wrong_type(tmp_path):
    from unveil._io import write_checked
    p = _pairs()
    tensors = {"decoders": p.decoders, "biases": p.biases, "encoders": p.encoders, "mean": p.mean}
    for doc, match in (({"names": {"a": 1}}, "'names' is a dict"), ({"meta": [1, 2]}, "'meta' is a list"),
                       ({"names": ["only one"]}, "inconsistent")):
        (tmp_path / "p").mkdir(exist_ok=True)
        write_checked(tmp_path / "p" / "pairs.safetensors", tmp_path / "p" / "pairs.json", tensors, doc, "pairs")
        with pytest.raises(CorruptFileError, match=match):
            DirectionPairs.load(tmp_path / "p")
    doc = json.loads((tmp_path / "p" / "pairs.json").read_text())
    doc["format_version"] = "1"
    (tmp_path / "p" / "pairs.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptFileError, match="format_version of type str"):
        DirectionPairs.load(tmp_path / "p")

    from unveil.edit import CorrectedModel
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1))
    fixed = CorrectedModel(net, "0", _pairs(), [0], 1.0, direction="signal")
    fixed.save(tmp_path / "c")
    for key, value in (("strength", "inf"), ("layer", ["0"]), ("concepts", [True]), ("tokens", "evil")):
        doc = json.loads((tmp_path / "c" / "correction.json").read_text())
        good = doc[key]
        doc[key] = value
        (tmp_path / "c" / "correction.json").write_text(json.dumps(doc))
        with pytest.raises(CorruptFileError, match=f"field '{key}'"):
            CorrectedModel.load(tmp_path / "c", net)
        doc[key] = good
        (tmp_path / "c" / "correction.json").write_text(json.dumps(doc))
    assert CorrectedModel.load(tmp_path / "c", net).strength == 1.0


# --------------------------------------------------------------------------------- CLI one line
@pytest.mark.parametrize("extra,match", [
    (["--device", "warp-drive"], "is not a torch device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "CUDA"),
    (["--epochs-scale", "inf"], "--epochs-scale must be a finite number"),
    (["--epochs-scale", "nan"], "--epochs-scale must be a finite number"),
    (["--epochs-scale", "-1"], "--epochs-scale must be a finite number"),
])
def test_fit_flags_are_checked_before_work(clean_store, tmp_path, capsys, extra, match):
    assert main(["fit", str(clean_store), "--concepts", "2", "--out", str(tmp_path / "p")] + extra) == 1
    _one_line(capsys, match)
    assert not (tmp_path / "p").exists()


def test_extract_device_flag(images, tmp_path, capsys):
    base = ["extract", "--model", "resnet18", "--image-size", "32", "--layer", "layer3", "--images", str(images)]
    assert main(base + ["--out", str(tmp_path / "a"), "--device", "not-a-device"]) == 1
    _one_line(capsys, "is not a torch device")
    assert main(base + ["--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert len(ActivationStore.open(tmp_path / "b")) == 6


def test_os_errors_are_one_line(clean_store, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(io_mod, "_stage_bytes", full)
    assert main(["fit", str(clean_store), "--concepts", "2", "--out", str(tmp_path / "p"), "--no-head",
                 "--epochs-scale", "0.05"]) == 1
    _one_line(capsys, "No space left on device")
    assert not (tmp_path / "p" / "pairs.json").exists()
    assert main(["fit", str(tmp_path / "missing"), "--concepts", "2", "--out", str(tmp_path / "q")]) == 1
    _one_line(capsys, "no activation store")


def test_token_layout_of_the_wrong_type(clean_store, tmp_path):
    store = _copy_store(clean_store, tmp_path / "s")
    for tokens in ("map", {"kind": "evil"}, {"kind": "tokens", "grid": "ab"}, {"kind": "tokens", "n_tokens": [1]}):
        _edit_manifest(store, lambda m: m.__setitem__("tokens", tokens))
        with pytest.raises(CorruptFileError, match="field 'tokens'"):
            head_for_store(store)


def test_worldnet_checkpoint_with_a_huge_or_odd_architecture_is_refused(tmp_path):
    from unveil.models.worldnet import WorldNet, load_worldnet_file, save_worldnet
    path = tmp_path / "w.safetensors"
    save_worldnet(WorldNet(3, (4, 4, 4, 4)), path, {"name": "test"})
    for widths in ([10 ** 9, 4, 4, 4], "abcd", [4, 4, 4]):
        doc = json.loads(path.with_suffix(".json").read_text())
        doc["widths"] = widths
        path.with_suffix(".json").write_text(json.dumps(doc))
        with pytest.raises(CorruptFileError, match="four stage widths"):
            load_worldnet_file(path)


def test_demo_and_synthetic_refuse_to_replace_the_users_results(tmp_path, capsys):
    for cmd, name in ((["demo", "--fast"], "results.json"), (["synthetic", "--fast", "--seeds", "0"], "synthetic.json")):
        out = tmp_path / cmd[0]
        out.mkdir()
        (out / name).write_text('{"mine": true}')
        assert main(cmd + ["--out", str(out)]) == 1
        _one_line(capsys, "that unveil did not write")
        assert json.loads((out / name).read_text()) == {"mine": True}
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "report.html").write_text("<p>my report</p>")
    assert main(["demo", "--fast", "--out", str(lone)]) == 1
    _one_line(capsys, "not ours")
    assert (lone / "report.html").read_text() == "<p>my report</p>"


@pytest.mark.parametrize("size,match", [("100000", "would make one input image"), ("2", "at least 8 pixels")])
def test_layers_input_size_is_guarded(capsys, size, match):
    assert main(["layers", "--model", "resnet18", "--input-size", size]) == 1
    _one_line(capsys, match)
