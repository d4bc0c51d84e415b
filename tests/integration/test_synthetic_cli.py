"""`unveil synthetic` end to end on a tiny setting, and the runner behind it."""
import json
import sys

import pytest

from unveil.cli import main
from unveil.experiments.synthetic import format_table, run_synthetic_benchmark, summarize

METHODS = ["pca", "sae-0.1", "pattern-cav"]


def test_cli_runs_end_to_end_and_writes_valid_json(tmp_path, capsys):
    rc = main(["synthetic", "--seeds", "0", "1", "--fast", "--head-epochs", "50", "--no-progress",
               "--out", str(tmp_path), "--methods", *METHODS])
    assert rc == 0
    out = capsys.readouterr().out
    assert "synthetic benchmark, setting=paper, seeds=[0, 1] (fast)" in out
    for m in METHODS:
        assert f"\n{m} " in out
    doc = json.loads((tmp_path / "synthetic.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert doc["seeds"] == [0, 1] and doc["setting"] == "paper" and doc["fast"] is True
    assert set(doc["methods"]) == set(METHODS)
    assert [h["seed"] for h in doc["heads"]] == [0, 1]
    assert all(0.5 < h["accuracy"] <= 1.0 for h in doc["heads"])
    assert doc["heads"][0]["data"]["n_images"] == 450 and doc["heads"][0]["data"]["n_features"] == 16
    assert doc["versions"]["unveil"]
    for name, m in doc["methods"].items():
        assert m["detection_rule"]
        assert [r["seed"] for r in m["per_seed"]] == [0, 1]
        for r in m["per_seed"]:
            assert "error" not in r, r.get("error")
            assert len(r["matched_iou"]) == 3 and sorted(r["assignment"]) == [0, 1, 2]
            assert all(0 <= v <= 1 for v in r["matched_iou"] + r["encoder_cosine"] + r["decoder_cosine"])
            assert r["fit_seconds"] >= 0 and r["rmse_overall"] >= 0
        s = m["summary"]
        assert s["n_seeds"] == 2
        ious = [r["mean_iou"] for r in m["per_seed"]]
        assert s["mean_iou"]["mean"] == pytest.approx(sum(ious) / 2, abs=1e-12)
        assert s["mean_iou"]["worst"] == pytest.approx(min(ious), abs=1e-12)
    # supervised Pattern-CAV detects the concepts; PCA cannot find the non-orthogonal encoders
    assert doc["methods"]["pattern-cav"]["summary"]["mean_iou"]["worst"] > 0.9
    assert doc["methods"]["pca"]["summary"]["encoder_cosine"]["mean"] < 0.75


def test_cli_hard_setting_single_method(tmp_path, capsys):
    rc = main(["synthetic", "--seeds", "3", "--setting", "hard", "--fast", "--head-epochs", "20", "--no-progress",
               "--out", str(tmp_path), "--methods", "pca"])
    assert rc == 0
    doc = json.loads((tmp_path / "synthetic.json").read_text())
    r = doc["methods"]["pca"]["per_seed"][0]
    assert len(r["matched_iou"]) == 8  # make_hard_synthetic's default number of concepts
    assert "IoU " in capsys.readouterr().out


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["synthetic", "--methods", "tsne", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "invalid choice: 'tsne'" in capsys.readouterr().err
    rc = main(["synthetic", "--seeds", "1", "1", "--fast", "--no-progress", "--out", str(tmp_path),
               "--methods", "pca"])
    assert rc == 1
    assert "seeds must be distinct, got [1, 1]" in capsys.readouterr().err
    assert not (tmp_path / "synthetic.json").exists()


def test_eddp_is_skipped_with_a_warning_when_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "unveil.directions.eddp", None)  # import raises ImportError
    with caplog.at_level("WARNING", logger="unveil"):
        res = run_synthetic_benchmark(seeds=[0], methods=["eddp", "pca"], fast=True, head_epochs=5)
    assert "eddp" in res["skipped"] and list(res["methods"]) == ["pca"]
    assert "skipping eddp" in caplog.text
    assert "skipped eddp" in format_table(res)


def test_a_failing_method_is_recorded_not_fatal(monkeypatch):
    from unveil.directions import baselines

    def boom(self, X):
        raise RuntimeError("planted failure")
    monkeypatch.setattr(baselines.KMeansBaseline, "fit", boom)
    res = run_synthetic_benchmark(seeds=[0], methods=["kmeans", "pca"], fast=True, head_epochs=5)
    assert res["methods"]["kmeans"]["per_seed"][0]["error"] == "RuntimeError: planted failure"
    assert res["methods"]["kmeans"]["summary"] == {"n_seeds": 0, "n_failed": 1}
    assert res["methods"]["pca"]["summary"]["n_seeds"] == 1
    assert "failed" in format_table(res)


def test_summarize_mean_and_worst_directions():
    recs = [{"mean_iou": 0.9, "off_diagonal_iou": 0.0, "rmse_overall": 0.2, "mean_encoder_cosine": 0.8,
             "mean_decoder_cosine": 0.7, "fit_seconds": 1.0, "matched_iou": [0.9, 0.9]},
            {"mean_iou": 0.5, "off_diagonal_iou": 0.1, "rmse_overall": 0.6, "mean_encoder_cosine": 0.9,
             "mean_decoder_cosine": 0.5, "fit_seconds": 3.0, "matched_iou": [0.4, 0.6]},
            {"error": "x"}]
    s = summarize(recs)
    assert s["n_seeds"] == 2 and s["n_failed"] == 1
    assert s["mean_iou"] == {"mean": pytest.approx(0.7, abs=1e-12), "worst": 0.5}
    assert s["rmse"]["worst"] == 0.6 and s["encoder_cosine"]["worst"] == 0.8
    assert s["iou_per_concept"]["worst"] == [0.4, 0.6]


def test_cli_scale_setting_small_with_supervised_ceiling(tmp_path, capsys):
    """The scale setting's code path at smoke size (--fast: D=64, 8 images per class)."""
    rc = main(["synthetic", "--seeds", "0", "--setting", "scale", "--n-concepts", "8", "--fast", "--head-epochs", "5",
               "--no-progress", "--out", str(tmp_path), "--methods", "supervised", "pca"])
    assert rc == 0
    doc = json.loads((tmp_path / "synthetic.json").read_text())
    assert doc["setting"] == "scale"
    data = doc["heads"][0]["data"]
    assert data["n_concepts"] == 8 and data["n_distractors"] == 4 and data["n_classes"] == 8
    assert data["patches"] == 4 and data["n_features"] == 64 and data["noise"] > 0
    sup = doc["methods"]["supervised"]["per_seed"][0]
    assert "error" not in sup, sup.get("error")
    assert len(sup["matched_iou"]) == 8
    # the supervised ceiling detects the planted concepts far better than PCA
    assert sup["mean_iou"] > 0.8 > doc["methods"]["pca"]["per_seed"][0]["mean_iou"]
    assert doc["methods"]["supervised"]["detection_rule"] == "sigmoid(w^T x - b) > 0.5"
