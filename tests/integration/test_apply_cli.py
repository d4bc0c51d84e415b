"""`unveil explain` and `unveil correct` end to end on the shipped worldnet-shortcut model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from unveil import DirectionPairs
from unveil.cli import main
from unveil.data.world import CLASS_RULES, ConceptWorld
from unveil.edit import CorrectedModel
from unveil.models import load_model
from unveil.models.worldnet import SHORTCUT_WATERMARK

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("apply")
    g = torch.Generator().manual_seed(0)
    S = torch.randn(3, 64, generator=g)
    pairs = DirectionPairs(torch.randn(3, 64, generator=g), torch.zeros(3), S / S.norm(dim=1, keepdim=True),
                           names=["a", "b", "c"], meta={"layer": "layer3", "model_id": "worldnet-shortcut"})
    pairs.save(root / "pairs")
    ds = ConceptWorld(7, split="poisoned_test", seed=3, watermark=SHORTCUT_WATERMARK)
    files = []
    for i in range(len(ds)):
        s = ds[i]
        sub = root / "held" / CLASS_RULES[s.label][0]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(sub / f"{i}.png")
        files.append(sub / f"{i}.png")
    return root, files


def test_explain_writes_png_and_json(setup, capsys):
    root, files = setup
    out = root / "expl"
    rc = main(["explain", str(files[0]), str(files[1]), "--model", "worldnet-shortcut", "--layer", "layer3",
               "--pairs", str(root / "pairs"), "--out", str(out), "--top-k", "2"])
    assert rc == 0
    for f in files[:2]:
        doc = json.loads((out / f"{f.stem}.json").read_text())
        assert doc["class_name"] in [c[0] for c in CLASS_RULES]
        assert len(doc["top"]) == 2 and len(doc["contributions"]) == 3
        assert np.array(doc["maps"]).shape == (3, 8, 8)
        assert (out / f"{f.stem}.png").stat().st_size > 1000
    assert "top concepts" in capsys.readouterr().out


def test_correct_with_strength_and_choose_on(setup, capsys):
    root, files = setup
    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "1", "2", "--strength", "3.5", "--direction", "signal", "--out", str(root / "corr")])
    assert rc == 0
    model, pre, _ = load_model("worldnet-shortcut")
    fixed = CorrectedModel.load(root / "corr", model)
    assert fixed.concepts == [1, 2] and fixed.strength == pytest.approx(3.5) and fixed.model_id == "worldnet-shortcut"
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() / 255 for f in files])
    ref = CorrectedModel(model, "layer3", DirectionPairs.load(root / "pairs"), [1, 2], 3.5, direction="signal")
    torch.testing.assert_close(fixed(x), ref(x), atol=0, rtol=0)

    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "0", "--choose-on", str(root / "held"), "--out", str(root / "corr2")])
    assert rc == 0
    text = capsys.readouterr().out
    doc = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert doc["table"][0]["strength"] == 0.0 and len(doc["table"]) == 11
    assert doc["accuracy"] >= doc["accuracy_base"]
    saved = CorrectedModel.load(root / "corr2", model)
    assert saved.strength == pytest.approx(doc["strength"])

    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "0", "--choose-on", str(root / "held"), "--direction", "mean-difference",
               "--out", str(root / "corr3")])
    assert rc == 0
    capsys.readouterr()
    md = CorrectedModel.load(root / "corr3", model)
    assert md.direction_kind == "mean_difference"
    from unveil.capture import capture
    from unveil.edit import mean_difference_directions
    held = sorted((root / "held").rglob("*.png"))
    xh = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() / 255 for f in held])
    ref = mean_difference_directions(capture(model, "layer3", xh), DirectionPairs.load(root / "pairs"), [0])
    torch.testing.assert_close(md._directions, ref, atol=1e-5, rtol=1e-4)

    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "2", "0", "--choose-on", str(root / "held"), "--select", "--out", str(root / "corr4")])
    assert rc == 0
    text = capsys.readouterr().out
    doc = json.loads(text[text.index("{"):text.rindex("}") + 1])
    steps = doc["selection"]
    assert [s["concept"] for s in steps] == [2, 0] and steps[0]["kept"]
    kept = [s["concept"] for s in steps if s["kept"]]
    sel = CorrectedModel.load(root / "corr4", model)
    assert sel.concepts == kept and sel.strength == pytest.approx(doc["strength"])


def test_cli_errors_are_one_line(setup, capsys):
    root, files = setup
    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "9", "--direction", "signal", "--out", str(root / "bad")])
    err = capsys.readouterr().err
    assert rc == 1 and "unknown concept index 9" in err and len(err.strip().splitlines()) == 1
    rc = main(["explain", str(files[0]), "--model", "worldnet-shortcut", "--layer", "layer4", "--pairs",
               str(root / "pairs"), "--out", str(root / "e2")])
    err = capsys.readouterr().err
    assert rc == 1 and "has 128 channels, but these direction pairs" in err
    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "0", "--choose-on", str(root / "pairs"), "--out", str(root / "bad2")])
    assert rc == 1 and "no images found" in capsys.readouterr().err
    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "0", "--direction", "mean-difference", "--strength", "2", "--out", str(root / "bad3")])
    assert rc == 1 and "pass --choose-on DIR" in capsys.readouterr().err
    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "0", "1", "--select", "--strength", "2", "--out", str(root / "bad4")])
    assert rc == 1 and "--select chooses concepts on held-out images" in capsys.readouterr().err


def test_correct_defaults_to_the_mean_difference_measured_on_reference_images(setup, capsys):
    root, files = setup
    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "0", "--strength", "2", "--reference", str(root / "held"), "--out", str(root / "ref")])
    assert rc == 0 and "direction mean-difference" in capsys.readouterr().out
    model, _, _ = load_model("worldnet-shortcut")
    saved = CorrectedModel.load(root / "ref", model)
    assert saved.direction_kind == "mean_difference" and saved.strength == pytest.approx(2.0)
    from unveil.capture import capture
    from unveil.edit import mean_difference_directions
    held = sorted((root / "held").rglob("*.png"))
    xh = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() / 255 for f in held])
    ref = mean_difference_directions(capture(model, "layer3", xh), DirectionPairs.load(root / "pairs"), [0])
    torch.testing.assert_close(saved._directions, ref, atol=1e-5, rtol=1e-4)
    rc = main(["correct", "--model", "worldnet-shortcut", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--concepts", "0", "--strength", "2", "--direction", "signal", "--reference", str(root / "held"),
               "--out", str(root / "bad")])
    err = capsys.readouterr().err
    assert rc == 1 and "--reference is used to measure the mean difference only" in err
    assert len(err.strip().splitlines()) == 1
