"""DirectionPairs as a value object: copies, read-only fields, new values, equality, the detection
rule as a field, one loader for every saved format (old files included)."""
import copy
import json

import numpy as np
import pytest
import torch

from unveil import CorruptFileError, DirectionPairs, OutputExistsError, ValidationError
from unveil._io import save_bundle
from unveil.directions.pairs import ArgmaxPairs


def _threshold(meta=None):
    g = torch.Generator().manual_seed(0)
    return DirectionPairs(torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.randn(3, 4, generator=g),
                          torch.randn(4, generator=g), names=["a", "b", "c"],
                          meta=meta if meta is not None else {"layer": "layer4", "levels": [1, 2], "nested": {"k": [1]}})


def _argmax():
    mu = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    return DirectionPairs(mu, torch.zeros(3), mu, torch.zeros(2), meta={"method": "kmeans"}, detection_rule="argmax",
                          score_weights=2 * mu, score_offsets=-(mu ** 2).sum(1))


# ------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize("field", ["decoders", "biases", "encoders", "mean"])
def test_writing_the_callers_tensor_does_not_change_the_pairs(field):
    args = {"decoders": torch.ones(2, 3), "biases": torch.zeros(2), "encoders": torch.ones(2, 3),
            "mean": torch.zeros(3)}
    assert args[field].is_contiguous()  # .contiguous() would hand back this very tensor
    p = DirectionPairs(**args)
    before = getattr(p, field).clone()
    args[field].add_(5.0)
    torch.testing.assert_close(getattr(p, field), before, atol=0, rtol=0)


def test_numpy_inputs_and_score_tensors_are_copied_too():
    W = np.ones((2, 3), dtype=np.float32)  # torch.from_numpy would share this memory
    A, c = torch.eye(2, 3), torch.zeros(2)
    p = DirectionPairs(W, np.zeros(2, np.float32), W, detection_rule="argmax", score_weights=A, score_offsets=c)
    W[:] = 7.0
    A.add_(1.0)
    c.add_(1.0)
    torch.testing.assert_close(p.decoders, torch.ones(2, 3), atol=0, rtol=0)
    torch.testing.assert_close(p.encoders, torch.ones(2, 3), atol=0, rtol=0)
    torch.testing.assert_close(p.score_weights, torch.eye(2, 3), atol=0, rtol=0)
    torch.testing.assert_close(p.score_offsets, torch.zeros(2), atol=0, rtol=0)


def test_changing_the_callers_names_or_meta_does_not_change_the_pairs():
    names, meta = ["a", "b", "c"], {"levels": [1, 2], "nested": {"k": [1]}}
    p = _threshold(meta=meta).with_names(names)
    names[0] = "z"
    meta["levels"].append(3)
    meta["nested"]["k"].append(2)
    meta["new"] = 1
    assert p.names == ["a", "b", "c"]
    assert p.meta == {"levels": [1, 2], "nested": {"k": [1]}}


# ---------------------------------------------------------------------------------- read-only
@pytest.mark.parametrize("change", [
    lambda p: p.names.__setitem__(0, "z"),
    lambda p: p.names.append("d"),
    lambda p: p.names.extend(["d"]),
    lambda p: p.names.sort(),
    lambda p: p.meta.__setitem__("layer", "layer3"),
    lambda p: p.meta.update(layer="layer3"),
    lambda p: p.meta.setdefault("model_id", "x"),
    lambda p: p.meta.pop("layer"),
    lambda p: p.meta.clear(),
    lambda p: p.meta["levels"].append(3),
    lambda p: p.meta["nested"].__setitem__("k", 0),
    lambda p: p.meta["nested"]["k"].__setitem__(0, 5),
], ids=["names[i]=", "names.append", "names.extend", "names.sort", "meta[k]=", "meta.update", "meta.setdefault",
        "meta.pop", "meta.clear", "nested list", "nested dict", "list in nested dict"])
def test_names_and_meta_refuse_changes_in_place(change):
    p = _threshold()
    with pytest.raises(TypeError, match="with_names.*with_meta"):
        change(p)
    assert p == _threshold()


@pytest.mark.parametrize("field", ["names", "meta", "decoders", "biases", "encoders", "mean", "detection_rule"])
def test_fields_cannot_be_rebound(field):
    p = _threshold()
    with pytest.raises(AttributeError, match="immutable"):
        setattr(p, field, getattr(p, field))
    with pytest.raises(AttributeError, match="immutable"):
        delattr(p, field)


def test_read_only_meta_still_reads_like_a_dict_and_serialises():
    p = _threshold()
    assert isinstance(p.meta, dict) and isinstance(p.names, list)
    assert {**p.meta, "x": 1}["x"] == 1 and dict(p.meta)["layer"] == "layer4"
    assert json.loads(json.dumps(p.meta)) == {"layer": "layer4", "levels": [1, 2], "nested": {"k": [1]}}
    assert json.loads(json.dumps(p.names)) == ["a", "b", "c"]
    q = copy.deepcopy(p)
    assert q == p
    with pytest.raises(TypeError):
        q.meta["layer"] = "x"


# ----------------------------------------------------------------------------------- new values
def test_with_names_returns_new_pairs_and_keeps_the_old():
    p = _threshold()
    q = p.with_names(["x", "y", "z"])
    assert q is not p and q.names == ["x", "y", "z"] and p.names == ["a", "b", "c"]
    assert q.meta == p.meta and torch.equal(q.decoders, p.decoders)
    with pytest.raises(ValidationError, match="one entry per concept"):
        p.with_names(["x"])


def test_with_meta_merges_into_new_pairs_and_keeps_the_old():
    p = _threshold()
    q = p.with_meta({"layer": "layer3"}, model_id="resnet18")
    assert q.meta == {"layer": "layer3", "model_id": "resnet18", "levels": [1, 2], "nested": {"k": [1]}}
    assert p.meta == {"layer": "layer4", "levels": [1, 2], "nested": {"k": [1]}}
    assert q.names == p.names and torch.equal(q.biases, p.biases)


def test_new_values_keep_the_detection_rule():
    p = _argmax()
    for q in (p.with_names(["x", "y", "z"]), p.with_meta(layer="l"), p.to("cpu"), p.replace(biases=torch.ones(3))):
        assert q.detection_rule == "argmax" and torch.equal(q.score_weights, p.score_weights)
        torch.testing.assert_close(q.detect(torch.tensor([[3.5, 0.2]])), torch.tensor([[0.0, 1.0, 0.0]]),
                                   atol=0, rtol=0)
    plain = p.replace(detection_rule="threshold")
    assert plain.detection_rule == "threshold" and plain.score_weights is None
    with pytest.raises(ValidationError, match="cannot replace"):
        p.replace(colour="red")


# ------------------------------------------------------------------------------------- equality
def test_equality_is_exact_on_tensors_names_meta_and_rule():
    p = _threshold()
    assert p == _threshold() and not (p != _threshold())
    nudged = p.decoders.clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(float("inf")))  # one ulp
    assert p != p.replace(decoders=nudged)
    assert p != p.replace(mean=p.mean + 1e-3)
    assert p != p.with_names(["a", "b", "d"])
    assert p != p.with_meta(layer="layer3")
    assert p != p.replace(detection_rule="argmax", score_weights=p.decoders, score_offsets=torch.zeros(3))
    assert _argmax() != _argmax().replace(score_offsets=torch.ones(3))
    assert p != "pairs" and p != p.decoders
    with pytest.raises(TypeError):
        hash(p)


# ------------------------------------------------------------------------------ detection rule
def test_argmax_rule_is_a_field_of_direction_pairs():
    p = _argmax()
    assert type(p) is DirectionPairs and p.detection_rule == "argmax"
    X = torch.tensor([[0.5, 0.0], [3.0, 1.0], [0.0, 3.5]])
    det = p.detect(X)
    torch.testing.assert_close(det, torch.eye(3), atol=0, rtol=0)
    torch.testing.assert_close(p.decision_function(X) > 0, det > 0.5, atol=0, rtol=0)
    maps = X.T.reshape(1, 2, 3, 1)
    torch.testing.assert_close(p.detect(maps)[0, :, :, 0], torch.eye(3), atol=0, rtol=0)
    # the threshold rule on the same directions is a different detector
    torch.testing.assert_close(p.replace(detection_rule="threshold").detect(X), torch.sigmoid(X @ p.decoders.T),
                               atol=0, rtol=0)


def test_detection_rule_is_validated():
    W = torch.eye(2)
    with pytest.raises(ValidationError, match="detection_rule must be one of"):
        DirectionPairs(W, torch.zeros(2), W, detection_rule="nearest")
    with pytest.raises(ValidationError, match="needs score_weights"):
        DirectionPairs(W, torch.zeros(2), W, detection_rule="argmax")
    with pytest.raises(ValidationError, match="only with detection_rule='argmax'"):
        DirectionPairs(W, torch.zeros(2), W, score_weights=W, score_offsets=torch.zeros(2))
    with pytest.raises(ValidationError, match=r"score_weights must be \(2, 2\)"):
        DirectionPairs(W, torch.zeros(2), W, detection_rule="argmax", score_weights=torch.eye(3),
                       score_offsets=torch.zeros(2))


def test_argmax_pairs_name_is_a_factory_for_compatibility():
    p = _argmax()
    q = ArgmaxPairs(p.decoders, p.biases, p.encoders, p.mean, meta=p.meta, score_weights=p.score_weights,
                    score_offsets=p.score_offsets)
    assert type(q) is DirectionPairs and q == p
    assert isinstance(q, ArgmaxPairs) and not isinstance(_threshold(), ArgmaxPairs)


# ---------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("make", [_threshold, _argmax], ids=["threshold", "argmax"])
def test_one_load_for_every_saved_format(make, tmp_path):
    p = make()
    p.save(tmp_path / "p")
    q = DirectionPairs.load(tmp_path / "p")
    assert q == p and q.detection_rule == p.detection_rule


def test_saved_format_names_are_stable(tmp_path):
    _threshold().save(tmp_path / "t")
    _argmax().save(tmp_path / "a")
    assert json.loads((tmp_path / "t" / "pairs.json").read_text())["format"] == "unveil.pairs"
    assert json.loads((tmp_path / "a" / "argmax_pairs.json").read_text())["format"] == "unveil.argmax_pairs"
    assert not (tmp_path / "a" / "pairs.json").exists()


def test_files_in_the_earlier_layout_still_load(tmp_path):
    """Bundles written exactly as the earlier ``DirectionPairs.save`` / ``ArgmaxPairs.save`` wrote them."""
    t, a = _threshold(), _argmax()
    save_bundle(tmp_path / "t", "pairs", {"decoders": t.decoders, "biases": t.biases, "encoders": t.encoders,
                                          "mean": t.mean},
                {"n_concepts": 3, "n_features": 4, "names": ["a", "b", "c"],
                 "meta": {"layer": "layer4", "levels": [1, 2], "nested": {"k": [1]}}})
    save_bundle(tmp_path / "a", "argmax_pairs", {"decoders": a.decoders, "biases": a.biases, "encoders": a.encoders,
                                                 "mean": a.mean, "score_weights": a.score_weights,
                                                 "score_offsets": a.score_offsets},
                {"n_concepts": 3, "n_features": 2, "names": list(a.names), "meta": {"method": "kmeans"}})
    assert DirectionPairs.load(tmp_path / "t") == t
    assert DirectionPairs.load(tmp_path / "a") == a
    assert ArgmaxPairs.load(tmp_path / "a") == a
    with pytest.raises(CorruptFileError, match="load them with DirectionPairs.load"):
        ArgmaxPairs.load(tmp_path / "t")


def test_saving_the_other_rule_replaces_saved_pairs_only_with_overwrite(tmp_path):
    _threshold().save(tmp_path / "p")
    with pytest.raises(OutputExistsError, match="already holds saved pairs"):
        _argmax().save(tmp_path / "p", overwrite=False)
    assert DirectionPairs.load(tmp_path / "p") == _threshold()
    _argmax().save(tmp_path / "p")
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["argmax_pairs.json", "argmax_pairs.safetensors"]
    assert DirectionPairs.load(tmp_path / "p") == _argmax()


def test_a_folder_with_both_formats_is_refused(tmp_path):
    _threshold().save(tmp_path / "t")
    _argmax().save(tmp_path / "a")
    for f in (tmp_path / "a").iterdir():
        f.rename(tmp_path / "t" / f.name)
    with pytest.raises(CorruptFileError, match="holds two sets of saved pairs"):
        DirectionPairs.load(tmp_path / "t")


def test_round_trip_equality_with_tuples_in_meta(tmp_path):
    p = _threshold(meta={"kappa": (0.5, 0.9), "params": {"steps": (1, 2)}})
    assert p.meta["kappa"] == [0.5, 0.9]  # stored as JSON stores it
    p.save(tmp_path / "p")
    assert DirectionPairs.load(tmp_path / "p") == p
