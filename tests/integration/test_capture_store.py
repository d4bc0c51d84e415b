"""ActivationStore on disk: equals in-memory capture, resumes after a failure, refuses bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import unveil.capture.store as store_mod
from unveil import CorruptFileError, DirectionPairs, HeadError, ValidationError
from unveil._errors import OutputExistsError
from unveil.capture import ActivationStore, capture, extract, head_for_store
from unveil.data.images import Preprocessing, load_batch, scan_images
from unveil.models import load_model, model_source


PRE = Preprocessing.imagenet(32)


@pytest.fixture(scope="module")
def resnet():
    model, _, model_id = load_model("resnet18", num_classes=3)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "b" / "notes.md").write_text("not an image")
    return root


def _run(model, folder, out, **kw):
    args = dict(batch_size=3, shard_size=4, preprocessing=PRE, model_id="resnet18",
                model_source=model_source("resnet18", num_classes=3))
    args.update(kw)
    return extract(model, "layer3", folder, out, **args)


def test_store_equals_in_memory_capture(resnet, folder, tmp_path):
    store = _run(resnet, folder, tmp_path / "s", dtype="float32")
    imgs, kept, _ = load_batch(scan_images(folder), range(11), PRE)
    ref = capture(resnet, "layer3", imgs)
    assert len(store) == 10 and store.n_features == 256 and store.map_shape == (2, 2) and not store.subsampled
    assert torch.allclose(store.maps(range(10)), ref, rtol=1e-5, atol=1e-5)
    batches = list(store.iter_maps(4))
    assert [b.shape[0] for b in batches] == [4, 4, 2] and all(b.is_contiguous() and b.dtype == torch.float32 for b in batches)
    assert torch.equal(torch.cat(batches), store.maps(np.arange(10)))
    shuffled = list(store.iter_maps(3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(torch.cat(shuffled).sum(0), ref.sum(0), rtol=1e-4, atol=1e-3)
    assert torch.equal(store.maps([7, 2]), torch.stack([store.maps([7])[0], store.maps([2])[0]]))
    assert store.image_ids[0] == "a/0.png" and store.class_names == ["a", "b"]
    assert store.labels.tolist() == [0] * 5 + [1] * 5
    m = store.manifest
    assert {s["path"] for s in m["skipped"]} == {"a/broken.jpg", "b/notes.md"} and m["n_skipped"] == 2
    assert m["layer"] == "layer3" and m["dtype"] == "float32" and m["preprocessing"]["size"] == 32
    assert m["versions"]["torch"] == torch.__version__ and len(m["data"]["fingerprint"]) == 64
    assert isinstance(store._array(0), np.memmap)  # memory-mapped reading
    store.verify()


def test_float16_store_is_close(resnet, folder, tmp_path):
    s16 = _run(resnet, folder, tmp_path / "h", dtype="float16")
    s32 = _run(resnet, folder, tmp_path / "f", dtype="float32")
    a, b = s16.maps(range(10)), s32.maps(range(10))
    assert a.dtype == torch.float32
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


def test_interrupted_extraction_resumes_to_the_same_store(resnet, folder, tmp_path, monkeypatch):
    full = _run(resnet, folder, tmp_path / "full", subsample=3, seed=5)
    real = store_mod._extract_shard
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt("injected failure after 2 shards")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "_extract_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(resnet, folder, tmp_path / "part", subsample=3, seed=5)
    with pytest.raises(CorruptFileError, match=r"incomplete .*2 shard\(s\) finished.*resume"):
        ActivationStore.open(tmp_path / "part")
    monkeypatch.setattr(store_mod, "_extract_shard", real)

    done = []
    monkeypatch.setattr(store_mod, "_extract_shard", lambda *a, **k: done.append(a[2]) or real(*a, **k))
    resumed = _run(resnet, folder, tmp_path / "part", subsample=3, seed=5)
    assert done == [2]  # only the missing shard was computed
    assert resumed.subsampled and resumed.map_shape == (3, 1)
    assert torch.equal(resumed.maps(range(len(full))), full.maps(range(len(full))))
    assert torch.equal(resumed.positions(range(10)), full.positions(range(10)))
    strip = lambda m: {k: v for k, v in m.items() if k != "versions"}  # noqa: E731
    assert strip(resumed.manifest) == strip(full.manifest)
    # a finished store: running again computes nothing and returns it
    done.clear()
    again = _run(resnet, folder, tmp_path / "part", subsample=3, seed=5)
    assert done == [] and len(again) == 10


def test_subsample_picks_real_positions(resnet, folder, tmp_path):
    full = _run(resnet, folder, tmp_path / "full", dtype="float32")
    sub = _run(resnet, folder, tmp_path / "sub", dtype="float32", subsample=2, seed=1)
    pos = sub.positions(range(10))
    flat = full.maps(range(10)).flatten(2)
    expect = torch.gather(flat, 2, pos[:, None, :].expand(-1, 256, -1))[..., None]
    assert torch.equal(sub.maps(range(10)), expect)
    with pytest.raises(HeadError, match="subsampled"):
        head_for_store(sub)
    with pytest.raises(ValidationError, match=r"subsample=5 is larger than the 2×2 = 4 positions"):
        _run(resnet, folder, tmp_path / "sub5", subsample=5)


def test_head_for_store_reproduces_logits(resnet, folder, tmp_path):
    store = _run(resnet, folder, tmp_path / "s", dtype="float32")
    head = head_for_store(store)  # rebuilt from the manifest (same seeded random init)
    imgs, _, _ = load_batch(scan_images(folder), range(11), PRE)
    with torch.no_grad():
        assert torch.allclose(head(store.maps(range(10))), resnet(imgs), rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_clear_errors(resnet, folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValidationError, match="no images found"):
        _run(resnet, empty, tmp_path / "o1")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(ValidationError, match=r"none of the 3 image files could be decoded"):
        _run(resnet, corrupt, tmp_path / "o2")
    _run(resnet, folder, tmp_path / "taken")
    with pytest.raises(OutputExistsError, match="holds a different extraction"):
        _run(resnet, folder, tmp_path / "taken", dtype="float32")
    assert _run(resnet, folder, tmp_path / "taken", dtype="float32", overwrite=True).manifest["dtype"] == "float32"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not empty and is not an activation store"):
        _run(resnet, folder, tmp_path / "other")
    with pytest.raises(ValidationError, match="dtype must be one of"):
        _run(resnet, folder, tmp_path / "o3", dtype="int8")


def test_damaged_store_is_detected(resnet, folder, tmp_path):
    _run(resnet, folder, tmp_path / "s")
    with pytest.raises(CorruptFileError, match="no activation store"):
        ActivationStore.open(tmp_path / "missing")
    (tmp_path / "s" / "shards" / "maps_00001.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(CorruptFileError, match="maps_00001.npy"):
        ActivationStore.open(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        ActivationStore.open(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(CorruptFileError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(ValidationError, match=r"indices must be in \[0, 10\)"):
        _run(resnet, folder, tmp_path / "t").maps([10])


def test_pairs_of_another_width_are_refused_through_the_store(resnet, folder, tmp_path):
    narrow = _run(resnet, folder, tmp_path / "l3")                        # D = 256
    wide = extract(resnet, "layer4", folder, tmp_path / "l4", preprocessing=PRE, batch_size=4)  # D = 512
    pairs = DirectionPairs(torch.eye(256)[:4], torch.zeros(4), torch.eye(256)[:4], meta={"layer": "layer3"})
    assert pairs.detect(next(narrow.iter_maps(4))).shape == (4, 4, 2, 2)
    with pytest.raises(ValidationError, match=r"has 512 channels, but these direction pairs \(layer 'layer3'\) expect 256"):
        pairs.detect(next(wide.iter_maps(4)))


def test_tensor_images_and_vit_store(tmp_path):
    model, _, _ = load_model("vit-tiny")
    x = torch.rand(5, 3, 32, 32)
    store = extract(model, "blocks.2", x, tmp_path / "v", dtype="float32", shard_size=2, labels=[0, 1, 0, 1, 1],
                    model_id="vit-tiny", model_source=model_source("vit-tiny"))
    assert store.map_shape == (8, 8) and store.labels.tolist() == [0, 1, 0, 1, 1]
    assert store.manifest["tokens"]["kind"] == "tokens"
    head = head_for_store(store)
    with torch.no_grad():
        assert torch.allclose(head(store.maps(range(5))), model(x), rtol=1e-4, atol=1e-4)
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["data"]["kind"] == "tensor" and manifest["image_ids"] == ["0", "1", "2", "3", "4"]
