"""Typed results of ``unveil demo``: the content of ``DIR/results.json`` as frozen dataclasses.

:func:`~unveil.experiments.demo.run_demo` builds a :class:`DemoResults`, writes ``results.to_dict()`` to
``results.json`` and hands the object to the report; :func:`load_results` reads the file back, checks its
schema version and every required key's type, and returns the same object::

    >>> res = load_results("unveil-demo/results.json")  # doctest: +SKIP
    >>> res.dissection["eddp"].S1, res.influence.SDC, res.model.test_acc  # doctest: +SKIP

Every record's :meth:`~_Record.from_dict` checks that the keys its fields need are present and of the
declared type and raises :class:`~unveil.ValidationError` naming the key (as a dotted path, e.g.
``influence.control.SDC``) and what was expected. Sections the demo writes only sometimes are
``Optional`` (``None`` when absent: ``pattern_cav``, ``shortcut``, ``efficientnet``, ``applications``,
``correction``, ``activation_maximization``, ``shortcut_experiment``). Records whose content is produced by
other modules (the shortcut experiment, explanations, the run configuration) type the keys the report reads
and keep the remaining keys, unchecked, in their ``extra`` field, so a file round-trips key for key.

Parts that already have their own typed form are reused: ``influence.result`` is an
:class:`~unveil.evaluate.influence.Influence`, ``pattern_cav`` a
:class:`~unveil.evaluate.pattern_cav.PatternCAVComparison`.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .._errors import CorruptFileError, ValidationError
from ..evaluate.influence import Influence
from ..evaluate.pattern_cav import PatternCAVComparison

__all__ = ["RESULTS_SCHEMA", "RESULTS_SCHEMA_VERSION", "DemoResults", "DemoSettings", "ModelInfo", "DataInfo",
           "DissectionSummary", "NativeRuleSummary", "LayerSummary", "LayerInfluence", "DetectorRow", "EDDPInfo", "InfluenceControl",
           "InfluenceSummary", "WatermarkDetector", "ExplanationRecord", "CounterfactualRecord", "Applications",
           "Correction", "ActivationMaximization", "ShortcutSetup", "Timing", "Machine", "load_results",
           "is_demo_results"]

#: the ``schema`` field of ``results.json``: name and version (version 1 was ``"format": "unveil.demo_results"``)
RESULTS_SCHEMA_NAME = "unveil.demo-results"
RESULTS_SCHEMA_VERSION = 3
RESULTS_SCHEMA = f"{RESULTS_SCHEMA_NAME}/{RESULTS_SCHEMA_VERSION}"
_V1_FORMAT = "unveil.demo_results"

_MISSING = object()


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _omit(default=None):
    """A field that may be absent from the file (``None`` then) and is left out of ``to_dict`` when ``None``."""
    return field(default=default, metadata={"omit_if_none": True})


def _extra():
    """The keys of a section that its record does not type, kept as read (not validated)."""
    return field(default_factory=dict, metadata={"extra": True})


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{_describe(inner[0])} or null" if len(inner) == 1 else " or ".join(_describe(a) for a in inner)
    if origin in (list, List):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, Dict, Mapping):
        return f"an object (dict) of {_plural(args[1])}" if args else "an object (dict)"
    if isinstance(tp, type) and (issubclass(tp, _Record) or hasattr(tp, "from_dict")):
        return f"an object ({tp.__name__})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _plural(tp) -> str:
    d = _describe(tp)
    return {"an integer": "integers", "a number": "numbers", "a string": "strings",
            "true or false": "booleans", "any value": "values"}.get(d, d)


def _got(v) -> str:
    if v is None:
        return "null"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _bad(path: str, tp, v) -> ValidationError:
    return ValidationError(f"demo results: key {path!r} must be {_describe(tp)}, got {_got(v)}.")


def _load(v, tp, path: str):
    """Check ``v`` (parsed JSON) against the annotation ``tp``; returns the typed value."""
    if tp is Any:
        return v
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported annotation {tp}")  # pragma: no cover - a programming error
        if v is None:
            raise _bad(path, tp, v)
        return _load(v, inner[0], path)
    if origin in (list, List):
        if not isinstance(v, list):
            raise _bad(path, tp, v)
        return [_load(x, args[0], f"{path}[{i}]") for i, x in enumerate(v)] if args else list(v)
    if origin in (dict, Dict, Mapping):
        if not isinstance(v, dict):
            raise _bad(path, tp, v)
        for k in v:
            if not isinstance(k, str):
                raise ValidationError(f"demo results: key {path!r} must have string keys, got {_got(k)}.")
        return {k: _load(x, args[1], f"{path}.{k}") for k, x in v.items()} if args else dict(v)
    if isinstance(tp, type) and issubclass(tp, _Record):
        if not isinstance(v, dict):
            raise _bad(path, tp, v)
        return tp._from_dict(v, path)
    if isinstance(tp, type) and hasattr(tp, "from_dict"):  # Influence, PatternCAVComparison
        if not isinstance(v, dict):
            raise _bad(path, tp, v)
        try:
            return tp.from_dict(v)
        except ValidationError as exc:
            raise ValidationError(f"demo results: key {path!r} is not a valid {tp.__name__}: {exc}") from None
    ok = {bool: lambda x: isinstance(x, bool),
          int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          str: lambda x: isinstance(x, str)}.get(tp)
    if ok is None:
        raise TypeError(f"unsupported annotation {tp}")  # pragma: no cover - a programming error
    if not ok(v):
        raise _bad(path, tp, v)
    return v


def _dump(v):
    if isinstance(v, _Record):
        return v.to_dict()
    if hasattr(v, "to_dict") and not isinstance(v, (dict, list)):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    return v


class _Record:
    """Base of the typed sections: ``to_dict`` / ``from_dict`` driven by the dataclass fields' annotations."""

    @classmethod
    def _hints(cls) -> Dict[str, Any]:
        cache = cls.__dict__.get("_hints_cache")
        if cache is None:
            cache = typing.get_type_hints(cls, vars(sys.modules[__name__]))
            setattr(cls, "_hints_cache", cache)
        return cache

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-ready dict, key for key as in ``results.json``."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("extra"):
                out.update(_dump(v))
            elif v is None and f.metadata.get("omit_if_none"):
                continue
            else:
                out[_key(f)] = _dump(v)
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]):
        """Build from a parsed ``results.json`` section; a missing key or a wrong type raises
        :class:`~unveil.ValidationError` naming it."""
        if not isinstance(doc, Mapping):
            raise ValidationError(f"demo results: {cls.__name__} must be built from a dict, got {_got(doc)}.")
        return cls._from_dict(dict(doc), "")

    @classmethod
    def _from_dict(cls, doc: Dict[str, Any], path: str):
        hints = cls._hints()
        kwargs: Dict[str, Any] = {}
        known = set()
        extra_field = None
        for f in dataclasses.fields(cls):
            if f.metadata.get("extra"):
                extra_field = f
                continue
            key = _key(f)
            known.add(key)
            sub = f"{path}.{key}" if path else key
            v = doc.get(key, _MISSING)
            if v is _MISSING:
                if f.metadata.get("omit_if_none"):
                    kwargs[f.name] = None
                    continue
                where = f"in {path!r}" if path else "at the top level"
                raise ValidationError(f"demo results: required key {sub!r} is missing {where} "
                                      f"(expected {_describe(hints[f.name])}).")
            kwargs[f.name] = _load(v, hints[f.name], sub)
        if extra_field is not None:
            kwargs[extra_field.name] = {k: v for k, v in doc.items() if k not in known}
        return cls(**kwargs)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DissectionSummary(_Record):
    """Network Dissection summary of one method (``dissection[method]``)."""

    S1: float
    S2: float
    n_interpretable: int
    n_distinct: int
    mPrecision: float
    mRecall: float
    mAP: float
    mF1: float
    n_detectors: int


@dataclass(frozen=True)
class NativeRuleSummary(DissectionSummary):
    """A baseline dissected with its own label-free rule (``dissection_native_rules[method]``)."""

    rule: str


@dataclass(frozen=True)
class LayerInfluence(_Record):
    """RCAV at one layer (``layers[layer].influence``): the EDDP directions and the two controls."""

    SDC: int
    SCDP: int
    n_maps: int
    n_null: int
    random_null: int
    control_SDC: int
    control_SCDP: int
    control_random_SDC: int
    control_random_SCDP: int


@dataclass(frozen=True)
class LayerSummary(DissectionSummary):
    """EDDP's dissection at one layer (``layers[layer]``), and its RCAV when it was measured there."""

    category_counts: Dict[str, int]
    map_shape: List[int]
    main: bool
    influence: Optional[LayerInfluence] = _omit()


@dataclass(frozen=True)
class DetectorRow(_Record):
    """One EDDP detector (``eddp.detectors[i]``: :meth:`DissectionResult.table` row)."""

    detector: int
    name: str
    label: Optional[str]
    category: Optional[str]
    train_iou: float
    val_iou: float
    precision: float
    recall: float
    f1: float
    ap: float
    interpretable: bool


@dataclass(frozen=True)
class EDDPInfo(_Record):
    n_concepts: int
    levels: List[int]
    layer: str
    map_shape: List[int]
    detectors: List[DetectorRow]
    history_seconds: Optional[float]


@dataclass(frozen=True)
class ModelInfo(_Record):
    name: str
    id: str
    layer: str
    test_acc: float
    test_acc_split: str
    checkpoint_metrics: Dict[str, float]


@dataclass(frozen=True)
class DataInfo(_Record):
    world: str
    n_train: int
    n_val: int
    seed: int
    n_concepts: int
    watermark: Optional[Dict[str, Any]]
    class_names: List[str]


@dataclass(frozen=True)
class DemoSettings(_Record):
    """``config``: the :class:`~unveil.experiments.demo.DemoConfig` fields and the run's arguments."""

    n_concepts: int
    layer: str
    fast: bool
    model: str
    quantile: float
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class InfluenceControl(_Record):
    what: str
    SDC: int
    SCDP: int
    mean_abs_score: float


@dataclass(frozen=True, eq=False)
class InfluenceSummary(_Record):
    """RCAV influence of the EDDP directions (``influence``); ``result`` is the full :class:`Influence`."""

    SDC: int
    SCDP: int
    null: str
    statistic: str
    test: str
    n_null: int
    random_null: int
    max_patches: int
    n_maps: int
    pooled_head_fast_path: bool
    alpha: Optional[float]
    bonferroni_level: Optional[float]
    mean_abs_score: float
    control: InfluenceControl
    control_random: InfluenceControl
    top_concepts: Dict[str, Any]
    result: Influence

    def __eq__(self, other):  # Influence holds arrays: compare the serialised forms
        return type(other) is type(self) and self.to_dict() == other.to_dict()


@dataclass(frozen=True)
class WatermarkDetector(_Record):
    """``shortcut`` (``--shortcut``): the EDDP detector of highest validation IoU with the watermark."""

    concept: str
    detector: int
    iou_val: float
    iou_train: float
    label: Optional[str]
    baselines_best_iou: Dict[str, float]
    rcav_scores: Dict[str, Optional[float]]
    rcav_significant: Dict[str, bool]


@dataclass(frozen=True)
class ExplanationRecord(_Record):
    """One gallery image (``applications.explanations[i]``); ``extra``: the rest of ``Explanation.to_dict``."""

    val_index: int
    true_class: str
    watermarked: bool
    class_name: Optional[str]
    probability: float
    top: List[Dict[str, Any]]
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class CounterfactualRecord(_Record):
    val_index: int
    gallery_position: int
    concept: int
    name: str
    probs_before: List[float]
    probs_after: List[float]
    p_drop: float
    pred_before: str
    pred_after: str
    class_names: List[str]


@dataclass(frozen=True)
class Applications(_Record):
    layer: str
    contribution: str
    explanations: List[ExplanationRecord]
    counterfactuals: List[CounterfactualRecord]
    counterfactual_selection: str


@dataclass(frozen=True)
class Correction(_Record):
    """``correction`` (``--shortcut``): the shortcut experiment's edits, accuracies before and after."""

    poisoned_acc_before: float
    poisoned_acc_after: float
    clean_acc_before: float
    clean_acc_after: float
    filter_acc_after: float
    filter_clean_acc_after: float
    filter_strength: float
    strength: float
    random_acc_after: Optional[float]
    random_acc_after_max: Optional[float]
    random_clean_acc_after: Optional[float]
    pattern_cav_acc_after: Optional[float]
    pattern_cav_clean_acc_after: Optional[float]
    pattern_cav_strength: Optional[float]
    pattern_cav_image_acc_after: Optional[float]
    pattern_cav_image_clean_acc_after: Optional[float]
    pattern_cav_image_strength: Optional[float]
    mean_difference_acc_after: Optional[float]
    mean_difference_clean_acc_after: Optional[float]
    mean_difference_strength: Optional[float]
    oracle_poisoned_acc: Optional[float]
    watermark_iou: float
    watermark_detector: int
    second_best_iou: Optional[float]
    detectors_rule: str
    watermark_detectors: List[int]
    watermark_detectors_iou: List[float]
    union_iou: Optional[float]
    union_recall: Optional[float]
    detector_precision: Optional[float]
    detector_recall: Optional[float]
    rows: Dict[str, Dict[str, Any]]
    signal_value_removal: Optional[Dict[str, Optional[float]]]
    true_mask: Optional[Dict[str, Dict[str, Any]]]
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class ActivationMaximization(_Record):
    """``activation_maximization`` (``--shortcut``): cosines of Δx with ŝ, w and a Pattern-CAV."""

    cos_signal: Optional[float]
    cos_filter: Optional[float]
    cos_pattern_cav: Optional[float]
    summary: Dict[str, Any]
    watermark_detector: Optional[Dict[str, Optional[float]]]
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class ShortcutSetup(_Record):
    """``shortcut_experiment`` (``--shortcut``): the experiment's settings."""

    model: str
    layer: str
    n_concepts: int
    n_fit: int
    n_val: int
    n_test: int
    seed: int
    val_seed: int
    n_random: int
    max_clean_drop: float
    min_iou: float
    detectors: str
    watermark: Dict[str, Any]
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class Timing(_Record):
    stages_s: Dict[str, float]
    total_s: float
    loadavg_start: Optional[List[float]]
    loadavg_end: Optional[List[float]]


@dataclass(frozen=True)
class Machine(_Record):
    cpu_count: Optional[int]
    torch_threads: int
    platform: str
    loadavg_start: Optional[List[float]]
    loadavg_end: Optional[List[float]]


@dataclass(frozen=True, eq=False)
class DemoResults(_Record):
    """The whole ``results.json`` of ``unveil demo`` (see the module docstring)."""

    schema: str
    seed: int
    model: ModelInfo
    data: DataInfo
    config: DemoSettings
    dissection: Dict[str, DissectionSummary]
    dissection_native_rules: Dict[str, NativeRuleSummary]
    detection_rules: Dict[str, str]
    category_counts: Dict[str, Dict[str, int]]
    eddp: EDDPInfo
    influence: InfluenceSummary
    pattern_cav: Optional[PatternCAVComparison]
    shortcut: Optional[WatermarkDetector]
    efficientnet: Optional[Dict[str, Any]]
    applications: Optional[Applications]
    layers: Dict[str, LayerSummary]
    versions: Dict[str, str]
    machine: Machine
    timing: Timing
    correction: Optional[Correction] = _omit()
    activation_maximization: Optional[ActivationMaximization] = _omit()
    shortcut_experiment: Optional[ShortcutSetup] = _omit()

    def __eq__(self, other):  # some parts hold arrays: compare the serialised forms
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "DemoResults":
        """Validate and type a parsed ``results.json``: its schema version first, then every section."""
        if not isinstance(doc, Mapping):
            raise ValidationError(f"demo results must be a JSON object (dict), got {_got(doc)}.")
        check_schema(doc)
        return cls._from_dict(dict(doc), "")


def check_schema(doc: Mapping[str, Any]) -> None:
    """Raise :class:`~unveil.ValidationError` unless ``doc["schema"]`` is :data:`RESULTS_SCHEMA`."""
    schema = doc.get("schema", _MISSING)
    if schema is _MISSING:
        if doc.get("format") == _V1_FORMAT or {"timing", "versions", "config"} <= set(doc):
            raise ValidationError(f"demo results: key 'schema' is missing: the file was written by an older unveil "
                                  f"(schema version 1, format {_V1_FORMAT!r}); this unveil reads {RESULTS_SCHEMA!r}. "
                                  f"Run `unveil demo` again to rewrite it.")
        raise ValidationError(f"demo results: key 'schema' is missing (expected {RESULTS_SCHEMA!r}); this is not a "
                              f"results.json written by `unveil demo`.")
    check_schema_version(schema, RESULTS_SCHEMA_NAME, RESULTS_SCHEMA_VERSION, "demo results", "`unveil demo`",
                         not_ours="; this is not a results.json of `unveil demo` this unveil can read")


def check_schema_version(schema: Any, name: str, version: int, what: str, writer: str, not_ours: str = "") -> None:
    """Raise :class:`~unveil.ValidationError` unless ``schema`` is ``name/version``: one line that says
    whether the file is older (rerun ``writer``), newer (upgrade unveil) or not one of ``name``'s."""
    expected = f"{name}/{version}"
    if schema == expected:
        return
    base, _, ver = schema.partition("/") if isinstance(schema, str) else ("", "", "")
    if base == name and ver.isdigit():
        if int(ver) > version:
            raise ValidationError(f"{what}: key 'schema' is {schema!r}, newer than this unveil reads "
                                  f"({expected!r}); upgrade unveil.")
        raise ValidationError(f"{what}: key 'schema' is {schema!r}, older than this unveil reads ({expected!r}); "
                              f"run {writer} again to rewrite it.")
    raise ValidationError(f"{what}: key 'schema' must be {expected!r}, got {_got(schema)}{not_ours}.")


def is_demo_results(doc: Mapping[str, Any]) -> bool:
    """A results.json the demo wrote (this schema or an older or newer one): the demo may replace it."""
    schema = doc.get("schema")
    if isinstance(schema, str) and schema.startswith(RESULTS_SCHEMA_NAME + "/"):
        return True
    return doc.get("format") == _V1_FORMAT or ("timing" in doc and "versions" in doc and "config" in doc)


def load_results(path) -> DemoResults:
    """Read ``results.json`` of ``unveil demo`` (or the folder holding it), validate it, return :class:`DemoResults`.

    Raises :class:`~unveil.CorruptFileError` when the file is missing or not JSON and
    :class:`~unveil.ValidationError` when its schema version is not :data:`RESULTS_SCHEMA` or a key is
    missing or of the wrong type (the message names the key).

    Examples
    --------
    >>> res = load_results("unveil-demo")  # doctest: +SKIP
    >>> res.dissection["eddp"].S1  # doctest: +SKIP
    """
    from .._io import read_json_object
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise CorruptFileError(f"no demo results at {str(path)!r}: expected the results.json that `unveil demo` "
                               f"writes into its --out folder.")
    doc = read_json_object(path)
    if doc is None:
        raise CorruptFileError(f"{str(path)!r} is not a JSON object (invalid JSON, unreadable or a symbolic link); "
                               f"the file is corrupt. Run `unveil demo` again.")
    try:
        return DemoResults.from_dict(doc)
    except ValidationError as exc:
        raise ValidationError(f"{str(path)!r}: {exc}") from None
