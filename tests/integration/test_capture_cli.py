"""`unveil layers` / `extract` / `fit` end to end, and their one-line errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from unveil import DirectionPairs
from unveil.capture import ActivationStore
from unveil.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_imgs")
    rng = np.random.default_rng(1)
    for c in ("x", "y"):
        (root / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def _one_line_error(capsys, match):
    err = capsys.readouterr().err.strip().split("\r")[-1]  # what a terminal shows after a cleared tqdm bar
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    return err


def test_layers_lists_names_shapes_and_cuts(capsys):
    assert main(["layers", "--model", "resnet18", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["layer4"][1:] == ["Sequential", "512x2x2", "yes"]
    assert rows["layer1.0.conv1"][-1] == "no"


def test_extract_then_fit(images, tmp_path, capsys):
    store_dir, pairs_dir = tmp_path / "store", tmp_path / "pairs"
    assert main(["extract", "--model", "resnet18", "--image-size", "32", "--layer", "layer3", "--images",
                 str(images), "--out", str(store_dir), "--batch-size", "3", "--shard-size", "3"]) == 0
    assert "stored 8 maps (256x2x2, float16)" in capsys.readouterr().out
    store = ActivationStore.open(store_dir)
    assert store.manifest["model"]["options"] == {"image_size": 32} and store.class_names == ["x", "y"]
    assert main(["fit", str(store_dir), "--concepts", "3", "--out", str(pairs_dir), "--epochs-scale", "0.02"]) == 0
    assert "saved 3 direction pairs (D = 256" in capsys.readouterr().out
    pairs = DirectionPairs.load(pairs_dir)
    assert pairs.meta["model_id"] == "resnet18" and pairs.meta["layer"] == "layer3" and pairs.meta["head"] is True
    assert pairs.detect(store.maps([0, 1])).shape == (2, 3, 2, 2)


def test_fit_on_subsampled_store_runs_without_head(images, tmp_path, capsys):
    assert main(["extract", "--model", "resnet18", "--image-size", "32", "--layer", "layer2", "--images",
                 str(images), "--out", str(tmp_path / "s"), "--subsample", "4"]) == 0
    capsys.readouterr()
    assert main(["fit", str(tmp_path / "s"), "--concepts", "2", "--out", str(tmp_path / "p"),
                 "--epochs-scale", "0.02"]) == 0
    assert "subsampled (4 positions per image): fitting without a head" in capsys.readouterr().out
    assert DirectionPairs.load(tmp_path / "p").meta["head"] is False
    # levels of granularity from the command line
    assert main(["fit", str(tmp_path / "s"), "--concepts", "6", "--levels", "2,4", "--out", str(tmp_path / "q"),
                 "--epochs-scale", "0.02"]) == 0
    capsys.readouterr()
    assert DirectionPairs.load(tmp_path / "q").meta["levels"] == [2, 4]
    assert main(["fit", str(tmp_path / "s"), "--concepts", "6", "--levels", "2,x", "--out", str(tmp_path / "r")]) == 1
    _one_line_error(capsys, "--levels must be 'auto', 'none' or comma-separated sizes")
    assert main(["fit", str(tmp_path / "s"), "--concepts", "6", "--levels", "2,3", "--out", str(tmp_path / "r")]) == 1
    _one_line_error(capsys, "the level sizes [2, 3] must sum to n_concepts = 6")
    assert not (tmp_path / "r").exists()


def test_cli_errors_are_one_line_exit_1(images, tmp_path, capsys):
    base = ["extract", "--model", "resnet18", "--image-size", "32", "--images", str(images), "--out"]
    assert main(base + [str(tmp_path / "a"), "--layer", "layer44"]) == 1
    _one_line_error(capsys, "no layer named 'layer44' in ResNet (67 layers). Did you mean 'layer4'")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["extract", "--model", "resnet18", "--layer", "layer4", "--images", str(empty), "--out",
                 str(tmp_path / "b")]) == 1
    _one_line_error(capsys, "no images found in")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.jpg").write_bytes(b"nope")
    (bad / "1.png").write_bytes(b"nope")
    assert main(["extract", "--model", "resnet18", "--layer", "layer4", "--images", str(bad), "--out",
                 str(tmp_path / "c")]) == 1
    _one_line_error(capsys, "none of the 2 image files could be decoded")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "w.pt")
    assert main(["layers", "--model", "resnet18", "--weights", str(tmp_path / "w.pt")]) == 1
    _one_line_error(capsys, "does not match ResNet: 121 missing keys (conv1.weight")
    assert main(["fit", str(tmp_path / "nowhere"), "--concepts", "2", "--out", str(tmp_path / "p")]) == 1
    _one_line_error(capsys, "no activation store at")
    assert main(["layers", "--model", "efficientnet-lite9"]) == 1
    _one_line_error(capsys, "unknown model 'efficientnet-lite9'")
