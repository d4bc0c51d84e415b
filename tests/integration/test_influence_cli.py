"""`unveil influence` end to end on the shipped worldnet model at layer3, with a few world images."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from unveil import DirectionPairs
from unveil.cli import main
from unveil.data.world import CLASS_RULES, ConceptWorld
from unveil.evaluate.influence import Influence

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("influence")
    g = torch.Generator().manual_seed(0)
    S = torch.randn(3, 64, generator=g)
    pairs = DirectionPairs(torch.randn(3, 64, generator=g), torch.zeros(3), S / S.norm(dim=1, keepdim=True),
                           names=["a", "b", "c"], meta={"layer": "layer3", "model_id": "worldnet"})
    pairs.save(root / "pairs")
    ds = ConceptWorld(12, split="test", seed=5)
    for i in range(len(ds)):
        s = ds[i]
        sub = root / "images" / CLASS_RULES[s.label][0]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(sub / f"{i}.png")
    return root


def test_influence_writes_json_and_png(setup, capsys):
    root = setup
    out = root / "out"
    rc = main(["influence", "--model", "worldnet", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--images", str(root / "images"), "--out", str(out), "--n-null", "5", "--batch-size", "8",
               "--statistic", "sign", "--test", "empirical", "--random-null", "0"])
    assert rc == 0
    doc = json.loads((out / "influence.json").read_text())
    res = Influence.from_dict({k: v for k, v in doc.items() if k not in ("model", "layer", "pairs", "images",
                                                                         "n_images", "versions")})
    assert res.score.shape == (3, len(CLASS_RULES))
    assert res.class_names == tuple(c[0] for c in CLASS_RULES)
    assert doc["n_images"] == 12 == int(res.class_counts.sum())
    finite = np.isfinite(res.score)
    assert np.all(np.abs(res.score[finite]) <= 1.0)
    assert doc["config"]["null"] == "permutation" and doc["config"]["n_null"] == 5
    assert doc["config"]["statistic"] == "sign" and doc["config"]["random_null"] == 0
    assert (out / "influence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "influence.png").stat().st_size > 2000
    assert '"sdc"' in capsys.readouterr().out


def test_influence_bad_input_is_one_line(setup, capsys):
    root = setup
    rc = main(["influence", "--model", "worldnet", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--images", str(root / "images" / "nope"), "--out", str(root / "o2"), "--n-null", "-1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("unveil influence: error:") and "--n-null" in err and len(err.strip().splitlines()) == 1


def test_influence_defaults_reach_the_result(setup):
    root = setup
    out = root / "out_logit"
    rc = main(["influence", "--model", "worldnet", "--layer", "layer3", "--pairs", str(root / "pairs"),
               "--images", str(root / "images"), "--out", str(out), "--n-null", "5", "--batch-size", "8"])
    assert rc == 0
    doc = json.loads((out / "influence.json").read_text())
    # the defaults: log-odds contrast, t-test, as many random unit directions as noise vectors
    assert doc["config"]["statistic"] == "logit" and doc["config"]["random_null"] == 5
    assert doc["config"]["test"].startswith("prediction-interval t")
    scores = np.array([[np.nan if v is None else v for v in row] for row in doc["score"]])
    assert np.nanmax(np.abs(scores)) > 1.0  # a log-odds contrast, not a mean sign
