"""The demo's typed results: to_dict/from_dict round trip, schema version, validation errors that name the key,
and the report rendered from a loaded results.json."""
import copy
import json

import matplotlib
import pytest

matplotlib.use("Agg")

import unveil  # noqa: E402
from unveil import CorruptFileError, ValidationError  # noqa: E402
from unveil.experiments import load_results  # noqa: E402
from unveil.experiments.demo import DemoConfig, run_demo  # noqa: E402
from unveil.experiments.results import (RESULTS_SCHEMA, DemoResults, DissectionSummary,  # noqa: E402
                                        InfluenceSummary)
from unveil.report import build_report  # noqa: E402


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """A tiny demo run (no report): its folder and the dict run_demo returned."""
    cfg = DemoConfig.fast_config()
    cfg.n_train, cfg.n_val, cfg.n_concepts, cfg.n_explanations = 21, 14, 4, 2
    out = tmp_path_factory.mktemp("demo")
    doc = run_demo(out, config=cfg, progress=False, seed=0)
    return out, doc


def _write(tmp_path, doc):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    return path


def test_round_trip_equals_the_original(demo_out):
    out, doc = demo_out
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == RESULTS_SCHEMA == "unveil.demo-results/3" and "format" not in on_disk
    res = load_results(out / "results.json")
    assert isinstance(res, DemoResults)
    assert res.to_dict() == on_disk == doc  # key for key, value for value
    assert DemoResults.from_dict(res.to_dict()) == res
    assert load_results(out) == res  # the folder works too
    # typed attribute access all the way down
    assert isinstance(res.dissection["eddp"], DissectionSummary) and res.dissection["eddp"].S1 == doc["dissection"]["eddp"]["S1"]
    assert isinstance(res.influence, InfluenceSummary) and res.influence.result.sdc == res.influence.SDC
    assert res.influence.control.SDC == doc["influence"]["control"]["SDC"]
    assert [d.name for d in res.eddp.detectors] == [d["name"] for d in doc["eddp"]["detectors"]]
    assert res.shortcut is None and res.correction is None and res.activation_maximization is None
    assert res.timing.total_s > 0 and res.machine.loadavg_end == on_disk["machine"]["loadavg_end"]
    assert unveil.load_results is load_results


def test_frozen(demo_out):
    res = DemoResults.from_dict(demo_out[1])
    with pytest.raises(AttributeError):
        res.seed = 1
    with pytest.raises(AttributeError):
        res.model.test_acc = 1.0


@pytest.mark.parametrize("schema, match", [
    ("unveil.demo-results/1", "older than this unveil reads"),
    ("unveil.demo-results/4", "newer than this unveil reads.*upgrade unveil"),
    ("something.else/2", "key 'schema' must be 'unveil.demo-results/3'"),
    (2, "key 'schema' must be"),
])
def test_wrong_schema_version(demo_out, tmp_path, schema, match):
    doc = copy.deepcopy(demo_out[1])
    doc["schema"] = schema
    with pytest.raises(ValidationError, match=match):
        load_results(_write(tmp_path, doc))


def test_version_1_file_is_named_as_older(demo_out, tmp_path):
    doc = copy.deepcopy(demo_out[1])
    del doc["schema"]
    doc["format"] = "unveil.demo_results"
    with pytest.raises(ValidationError, match=r"older unveil \(schema version 1.*unveil demo"):
        load_results(_write(tmp_path, doc))
    with pytest.raises(ValidationError, match="key 'schema' is missing.*not a results.json"):
        load_results(_write(tmp_path, {"hello": 1}))


@pytest.mark.parametrize("path, expected", [
    (("influence",), "required key 'influence' is missing at the top level"),
    (("model", "test_acc"), "required key 'model.test_acc' is missing in 'model'"),
    (("influence", "control", "SDC"), "required key 'influence.control.SDC' is missing in 'influence.control'"),
    (("dissection", "eddp", "S1"), "required key 'dissection.eddp.S1' is missing"),
    (("timing",), "required key 'timing' is missing"),
])
def test_missing_required_key(demo_out, tmp_path, path, expected):
    doc = copy.deepcopy(demo_out[1])
    d = doc
    for k in path[:-1]:
        d = d[k]
    del d[path[-1]]
    with pytest.raises(ValidationError, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
        load_results(_write(tmp_path, doc))
    assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize("path, value, expected", [
    (("seed",), "0", "key 'seed' must be an integer, got str '0'"),
    (("model",), [1], "key 'model' must be an object (ModelInfo), got list"),
    (("influence", "SDC"), 1.5, "key 'influence.SDC' must be an integer, got float 1.5"),
    (("dissection", "eddp", "mF1"), "high", "key 'dissection.eddp.mF1' must be a number, got str"),
    (("data", "class_names"), "abc", "key 'data.class_names' must be a list of strings"),
    (("layers", "layer4", "main"), 1, "key 'layers.layer4.main' must be true or false, got int 1"),
    (("config", "fast"), None, "key 'config.fast' must be true or false, got null"),
    (("eddp", "detectors", 0, "interpretable"), "yes", r"key 'eddp.detectors\[0\].interpretable' must be true or false"),
    (("influence", "result", "score"), "x", "key 'influence.result' is not a valid Influence"),
])
def test_wrong_type(demo_out, tmp_path, path, value, expected):
    doc = copy.deepcopy(demo_out[1])
    d = doc
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    with pytest.raises(ValidationError, match=expected.replace("(", r"\(").replace(")", r"\)")
                       if "\\" not in expected else expected):
        load_results(_write(tmp_path, doc))


def test_not_json_or_missing(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not a JSON object"):
        load_results(tmp_path / "results.json")
    with pytest.raises(CorruptFileError, match="no demo results"):
        load_results(tmp_path / "nowhere.json")


def test_report_renders_from_a_loaded_result(demo_out):
    out, doc = demo_out
    res = load_results(out / "results.json")
    page = build_report(res)
    assert page.startswith("<!DOCTYPE html>") and "could not be drawn" not in page
    for title in ("EDDP vs baselines (Network Dissection)", "Concept → class influence (RCAV)", "<h2>Run</h2>",
                  "<h3>Counterfactuals</h3>"):
        assert title in page, title
    assert f"{res.dissection['eddp'].S1:.3f}" in page
    assert ("EDDP against supervised Pattern-CAVs (S³)" in page) == (res.pattern_cav is not None)
    # the dict of a results.json is validated on the way in
    assert build_report(doc) == page
    bad = copy.deepcopy(doc)
    del bad["model"]["name"]
    with pytest.raises(ValidationError, match="'model.name' is missing"):
        build_report(bad)
    with pytest.raises(ValidationError, match="results must be a DemoResults"):
        build_report([1, 2])
