"""`unveil world` end to end: export -> Broden reader, show, a tiny train run."""
import numpy as np

from unveil.cli import main
from unveil.data.broden import BrodenDataset
from unveil.data.world import ConceptWorld
from unveil.models.worldnet import load_worldnet_file


def test_world_export_reads_back(tmp_path, capsys):
    out = tmp_path / "broden"
    assert main(["world", "export", "--out", str(out), "--n-images", "6", "--split", "val", "--seed", "2"]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    ds, ref = BrodenDataset(out), ConceptWorld(6, split="val", seed=2)
    assert ds.concepts == ref.concepts and ds.class_names == ref.class_names
    for i in range(6):
        np.testing.assert_array_equal(ds[i].masks, ref[i].masks)
        assert ds[i].label == ref[i].label


def test_world_export_poisoned_has_watermark_channel(tmp_path):
    out = tmp_path / "p"
    assert main(["world", "export", "--out", str(out), "--n-images", "7", "--split", "poisoned_test"]) == 0
    ds = BrodenDataset(out)
    assert ds.concepts[-1].name == "watermark"
    assert sum(ds[i].masks[-1].any() for i in range(7)) == 6  # every image except the target class's


def test_world_show_writes_png(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["world", "show", "--out", str(out), "--rows", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_world_train_tiny(tmp_path, capsys):
    out = tmp_path / "wn.safetensors"
    assert main(["world", "train", "--n-train", "14", "--n-test", "7", "--epochs", "1", "--out", str(out)]) == 0
    assert "test_accuracy" in capsys.readouterr().out
    model, meta = load_worldnet_file(out)
    assert meta["name"] == "worldnet" and meta["metrics"]["data"]["n_train"] == 14
    assert model.num_classes == 7


def test_world_export_bad_folder_is_one_line_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["world", "export", "--out", str(f), "--n-images", "2"]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
