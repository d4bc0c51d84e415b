"""WorldNet: architecture, determinism, checkpoint files, and the shipped checkpoints' accuracy."""
import json

import numpy as np
import pytest
import torch

from unveil import CorruptFileError, ValidationError
from unveil.data.world import ConceptWorld, WatermarkSpec
from unveil.models.worldnet import (SHORTCUT_WATERMARK, WorldNet, build_worldnet, checkpoint_path, evaluate_accuracy,
                                    load_worldnet, load_worldnet_file, save_worldnet, train_worldnet)


def test_architecture_shapes_and_names():
    m = build_worldnet(7)
    names = dict(m.named_children())
    assert list(names) == ["stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc"]
    feats = {}
    hooks = [getattr(m, n).register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o.shape))
             for n in ("layer1", "layer2", "layer3", "layer4")]
    try:
        out = m(torch.zeros(2, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert tuple(out.shape) == (2, 7)
    assert {k: tuple(v) for k, v in feats.items()} == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16),
                                                      "layer3": (2, 64, 8, 8), "layer4": (2, 128, 8, 8)}


def test_fx_traceable_and_equal():
    m = build_worldnet(7).eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)
    assert not any(getattr(mod, "inplace", False) for mod in m.modules())


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_worldnet(7, seed=1), build_worldnet(7, seed=1), build_worldnet(7, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.layer4.conv1.weight, b.layer4.conv1.weight)
    assert not torch.equal(a.layer4.conv1.weight, c.layer4.conv1.weight)
    with pytest.raises(ValidationError, match="widths must be 4 positive integers"):
        WorldNet(7, widths=(8, 16))


def test_training_is_deterministic():
    torch.set_num_threads(1)
    kw = dict(n_train=28, n_test=14, epochs=1, batch_size=14, seed=3)
    m1, met1 = train_worldnet(**kw)
    m2, met2 = train_worldnet(**kw)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert met1["history"] == met2["history"] and met1["test_accuracy"] == met2["test_accuracy"]
    assert not m1.training


def test_training_with_watermark_reports_poisoned_accuracy():
    spec = WatermarkSpec(target_class=0, fraction=1.0)
    _, met = train_worldnet(n_train=14, n_test=14, epochs=1, batch_size=14, watermark=spec)
    for k in ("watermarked_test_accuracy", "poisoned_test_accuracy", "poisoned_predicted_as_target"):
        assert 0.0 <= met[k] <= 1.0
    assert met["data"]["watermark"] == spec.to_dict()


def test_checkpoint_round_trip_and_corruption(tmp_path):
    m = build_worldnet(7, seed=5).eval()
    path = save_worldnet(m, tmp_path / "m.safetensors", {"note": "x"})
    m2, meta = load_worldnet_file(path)
    assert meta["note"] == "x" and meta["format"] == "unveil.worldnet" and "torch" in meta["versions"]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    blob = path.read_bytes()
    path.write_bytes(blob[:-10])
    with pytest.raises(CorruptFileError, match="does not match the sha256"):
        load_worldnet_file(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(CorruptFileError, match=r"m\.json' is missing"):
        load_worldnet_file(path)
    with pytest.raises(ValidationError, match="must end in .safetensors"):
        save_worldnet(m, tmp_path / "m.pt", {})


@pytest.mark.parametrize("shortcut", [False, True])
def test_shipped_checkpoint_files(shortcut):
    path = checkpoint_path(shortcut)
    assert path.stat().st_size <= 5 * 1024 * 1024
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["name"] == ("worldnet-shortcut" if shortcut else "worldnet")
    for k in ("test_accuracy", "seed", "data", "train_seconds"):
        assert k in meta["metrics"]
    assert "torch" in meta["versions"] and "numpy" in meta["versions"]
    if shortcut:
        assert meta["metrics"]["data"]["watermark"] == SHORTCUT_WATERMARK.to_dict()


def test_shipped_clean_checkpoint_reaches_recorded_accuracy():
    model, meta = load_worldnet(with_meta=True)
    recorded = meta["metrics"]["test_accuracy"]
    fresh = ConceptWorld(280, split="test", seed=12345)  # a test split never seen in training
    acc = evaluate_accuracy(model, fresh.images_tensor(), fresh.labels)
    # binomial standard error at n=280 is <= 0.03; allow ~2.5 SE
    assert acc == pytest.approx(recorded, abs=0.075)
    assert acc >= 0.75


def test_shipped_shortcut_checkpoint_uses_the_watermark():
    model, meta = load_worldnet(shortcut=True, with_meta=True)
    met = meta["metrics"]
    spec = WatermarkSpec(**met["data"]["watermark"])
    clean = ConceptWorld(280, split="test", seed=12345)
    poisoned = ConceptWorld(280, split="poisoned_test", seed=12345, watermark=spec)
    acc_clean = evaluate_accuracy(model, clean.images_tensor(), clean.labels)
    acc_poisoned = evaluate_accuracy(model, poisoned.images_tensor(), poisoned.labels)
    assert acc_clean == pytest.approx(met["test_accuracy"], abs=0.075)
    assert acc_poisoned == pytest.approx(met["poisoned_test_accuracy"], abs=0.075)
    assert acc_poisoned <= acc_clean - 0.15
    # the stamped images of other classes are pulled towards the watermark's class
    idx = np.flatnonzero(poisoned.watermarked)
    with torch.no_grad():
        pred = model(poisoned.images_tensor(idx)).argmax(1).numpy()
    assert (pred == spec.target_class).mean() >= 0.2
    if spec.fraction == 1.0:
        # never shown an unstamped class-0 image, the model reads class 0 from the watermark alone
        # (measured: 0 of 142 unstamped class-0 test images of seed 0 recognised)
        idx0 = np.flatnonzero(clean.labels == spec.target_class)
        with torch.no_grad():
            pred0 = model(clean.images_tensor(idx0)).argmax(1).numpy()
        assert len(idx0) >= 20 and (pred0 == spec.target_class).mean() <= 0.2
