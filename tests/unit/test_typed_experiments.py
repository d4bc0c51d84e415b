"""Typed results of the synthetic benchmark and the shortcut experiment: round trip on real (tiny) runs,
schema versions, and validation errors that name the key."""
import copy
import json

import pytest

from unveil import CorruptFileError, ValidationError
from unveil.experiments import (ShortcutResult, SyntheticBenchmarkResult, load_shortcut_results,
                                load_synthetic_results)
from unveil.experiments.typed import (SHORTCUT_SCHEMA, SYNTHETIC_SCHEMA, EditRow, HeadRecord, MeanWorst,
                                      MethodResult, MethodSummary, SeedRecord, ShortcutCorrection,
                                      stamp_shortcut_results, stamp_synthetic_results)


@pytest.fixture(scope="module")
def synthetic():
    from unveil.experiments.synthetic import run_synthetic_benchmark
    return run_synthetic_benchmark(seeds=[0], methods=["pca", "eddp-init"], fast=True)


@pytest.fixture(scope="module")
def shortcut():
    """The smallest run (the sizes of test_edit_shortcut), with two activation-maximisation steps; as written."""
    from unveil.experiments.shortcut import run_shortcut_experiment
    res = run_shortcut_experiment(n_fit=7, n_val=7, n_test=7, n_concepts=8, n_random=1, actmax_steps=2)
    res["activation_maximization"].pop("images")  # a tensor: benchmarks/shortcut.py saves it as a png
    return res


def _write(tmp_path, doc, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


# --------------------------------------------------------------------------- synthetic
def test_synthetic_round_trip(synthetic, tmp_path):
    assert "schema" not in synthetic  # the function's return value is unchanged
    res = SyntheticBenchmarkResult.from_dict(synthetic)
    assert res.to_dict() == synthetic and res.schema is None
    assert SyntheticBenchmarkResult.from_dict(res.to_dict()) == res
    pca = res.methods["pca"]
    assert isinstance(pca, MethodResult) and isinstance(pca.summary, MethodSummary)
    assert isinstance(pca.summary.mean_iou, MeanWorst)
    assert pca.summary.mean_iou.mean == synthetic["methods"]["pca"]["summary"]["mean_iou"]["mean"]
    rec = pca.per_seed[0]
    assert isinstance(rec, SeedRecord) and rec.ok and rec.seed == 0 and len(rec.matched_iou) == 3
    assert isinstance(res.heads[0], HeadRecord) and res.heads[0].data.n_concepts == 3
    assert res.heads[0].data.extra["n_per_class"] == 150  # setting-specific generation parameters, kept
    # the written form: schema stamped, then loaded back (file or folder)
    doc = stamp_synthetic_results(synthetic, strict=True)
    assert doc["schema"] == SYNTHETIC_SCHEMA == "unveil.synthetic-results/1"
    assert {k: v for k, v in doc.items() if k != "schema"} == json.loads(json.dumps(synthetic))
    (tmp_path / "synthetic.json").write_text(json.dumps(doc))
    loaded = load_synthetic_results(tmp_path)
    assert loaded.schema == SYNTHETIC_SCHEMA and loaded.to_dict() == doc
    assert loaded == load_synthetic_results(tmp_path / "synthetic.json")
    with pytest.raises(AttributeError):
        loaded.setting = "hard"


def test_synthetic_failed_seed_and_method(synthetic):
    doc = copy.deepcopy(synthetic)
    m = doc["methods"]["pca"]
    m["per_seed"] = [{"seed": 0, "error": "RuntimeError: boom"}]
    m["summary"] = {"n_seeds": 0, "n_failed": 1}
    del m["detection_rule"]
    res = SyntheticBenchmarkResult.from_dict(doc)
    assert res.to_dict() == doc
    rec = res.methods["pca"].per_seed[0]
    assert not rec.ok and rec.mean_iou is None and res.methods["pca"].summary.mean_iou is None
    # a null score of a successful seed (NaN) stays a present null
    doc = copy.deepcopy(synthetic)
    doc["methods"]["eddp-init"]["per_seed"][0]["rmse_overall"] = None
    assert SyntheticBenchmarkResult.from_dict(doc).to_dict() == doc


@pytest.mark.parametrize("schema, match", [
    ("unveil.synthetic-results/0", "older than this unveil reads"),
    ("unveil.synthetic-results/2", "newer than this unveil reads.*upgrade unveil"),
    ("unveil.demo-results/2", "key 'schema' must be 'unveil.synthetic-results/1'"),
    (1, "key 'schema' must be"),
])
def test_synthetic_wrong_schema(synthetic, tmp_path, schema, match):
    doc = {**copy.deepcopy(synthetic), "schema": schema}
    with pytest.raises(ValidationError, match=match):
        load_synthetic_results(_write(tmp_path, doc))
    with pytest.raises(ValidationError, match=match):
        SyntheticBenchmarkResult.from_dict(doc)


def _del(doc, path):
    *head, last = path
    for k in head:
        doc = doc[k]
    del doc[last]


def _set(doc, path, value):
    *head, last = path
    for k in head:
        doc = doc[k]
    doc[last] = value


@pytest.mark.parametrize("path, shown", [
    (("setting",), "'setting'"),
    (("methods", "pca", "summary", "mean_iou"), "'methods.pca.summary.mean_iou'"),
    (("methods", "pca", "per_seed", 0, "mean_iou"), r"'methods.pca.per_seed\[0\].mean_iou'"),
    (("heads", 0, "data", "n_images"), r"'heads\[0\].data.n_images'"),
    (("methods", "eddp-init", "summary", "iou_per_concept", "worst"),
     "'methods.eddp-init.summary.iou_per_concept.worst'"),
])
def test_synthetic_missing_key_is_named(synthetic, tmp_path, path, shown):
    doc = copy.deepcopy(synthetic)
    _del(doc, path)
    with pytest.raises(ValidationError, match=f"synthetic results: required key {shown} is missing"):
        SyntheticBenchmarkResult.from_dict(doc)
    with pytest.raises(ValidationError, match=f"results.json.*required key {shown} is missing"):
        load_synthetic_results(_write(tmp_path, doc))


@pytest.mark.parametrize("path, value, shown", [
    (("fast",), "yes", "'fast' must be true or false, got str"),
    (("seeds",), 0, "'seeds' must be a list of integers"),
    (("methods", "pca", "per_seed", 0, "matched_iou", 1), "high", r"'methods.pca.per_seed\[0\].matched_iou\[1\]' "
                                                                  "must be a number, got str 'high'"),
    (("methods", "pca", "summary", "n_seeds"), 1.5, "'methods.pca.summary.n_seeds' must be an integer"),
    (("methods", "pca", "summary", "rmse"), None, "'methods.pca.summary.rmse' must be an object, got null"),
    (("heads", 0, "accuracy"), None, r"'heads\[0\].accuracy' must be a number, got null"),
    (("methods", "pca", "description"), 3, "'methods.pca.description' must be a string"),
])
def test_synthetic_wrong_type_is_named(synthetic, path, value, shown):
    doc = copy.deepcopy(synthetic)
    _set(doc, path, value)
    with pytest.raises(ValidationError, match=f"synthetic results: key {shown}"):
        SyntheticBenchmarkResult.from_dict(doc)


def test_synthetic_other_documents_are_refused(synthetic, tmp_path):
    with pytest.raises(ValidationError, match="key 'benchmark' must be 'synthetic'"):
        SyntheticBenchmarkResult.from_dict({**synthetic, "benchmark": "other"})
    with pytest.raises(ValidationError, match="must be a JSON object"):
        SyntheticBenchmarkResult.from_dict([1, 2])
    with pytest.raises(CorruptFileError, match="no synthetic results at"):
        load_synthetic_results(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="is not a JSON object"):
        load_synthetic_results(tmp_path / "bad.json")
    # stamping: strict raises, the default keeps the numbers (no schema key) and warns
    broken = {k: v for k, v in synthetic.items() if k != "heads"}
    with pytest.raises(ValidationError, match="required key 'heads'"):
        stamp_synthetic_results(broken, strict=True)
    assert stamp_synthetic_results(broken) == json.loads(json.dumps(broken))


# --------------------------------------------------------------------------- shortcut
def test_shortcut_round_trip(shortcut, tmp_path):
    res = ShortcutResult.from_dict(shortcut)
    assert res.to_dict() == shortcut and res.schema is None
    assert isinstance(res.correction, ShortcutCorrection)
    assert isinstance(res.correction.rows["signal"], EditRow)
    assert res.correction.rows["signal"].strength == shortcut["correction"]["rows"]["signal"]["strength"]
    assert res.correction.true_mask["filter"].poisoned_acc_after == \
        shortcut["correction"]["true_mask"]["filter"]["poisoned_acc_after"]
    assert res.setup.n_fit == 7 and res.setup.seconds > 0
    assert res.activation_maximization is not None and "images" not in res.activation_maximization.extra
    # the written form, with the keys benchmarks/shortcut.py adds
    written = {**shortcut, "command": "python benchmarks/shortcut.py", "seconds_total": 1.0}
    doc = stamp_shortcut_results(written, strict=True)
    assert doc["schema"] == SHORTCUT_SCHEMA == "unveil.shortcut-results/1"
    path = _write(tmp_path, doc, "shortcut.json")
    loaded = load_shortcut_results(path)
    assert loaded.to_dict() == doc and loaded.extra == {"command": "python benchmarks/shortcut.py",
                                                        "seconds_total": 1.0}
    # without activation maximisation the section is absent, not null
    no_am = {k: v for k, v in shortcut.items() if k != "activation_maximization"}
    typed = ShortcutResult.from_dict(no_am)
    assert typed.activation_maximization is None and typed.to_dict() == no_am


@pytest.mark.parametrize("schema, match", [
    ("unveil.shortcut-results/2", "newer than this unveil reads"),
    ("unveil.shortcut-results/0", "older than this unveil reads"),
    ("unveil.synthetic-results/1", "key 'schema' must be 'unveil.shortcut-results/1'"),
])
def test_shortcut_wrong_schema(shortcut, tmp_path, schema, match):
    with pytest.raises(ValidationError, match=match):
        load_shortcut_results(_write(tmp_path, {**shortcut, "schema": schema}))


@pytest.mark.parametrize("path, value, shown", [
    (("correction", "rows", "signal", "strength"), None, "required key 'correction.rows.signal.strength' is missing"),
    (("setup", "seconds"), None, "required key 'setup.seconds' is missing"),
    (("correction", "poisoned_acc_after"), None, "required key 'correction.poisoned_acc_after' is missing"),
    (("correction", "rows", "filter", "detectors"), "all", "key 'correction.rows.filter.detectors' must be a list"),
    (("correction", "true_mask", "signal", "strength"), "k", "key 'correction.true_mask.signal.strength' must be a "
                                                              "number"),
    (("setup", "nonneg_layer"), 1, "key 'setup.nonneg_layer' must be true or false"),
    (("activation_maximization", "summary"), [], "key 'activation_maximization.summary' must be an object"),
])
def test_shortcut_bad_key_is_named(shortcut, path, value, shown):
    doc = copy.deepcopy(shortcut)
    if value is None:
        _del(doc, path)
    else:
        _set(doc, path, value)
    with pytest.raises(ValidationError, match=f"^shortcut results: {shown}"):
        ShortcutResult.from_dict(doc)
