"""Typed results of the synthetic benchmark and of the shortcut experiment, as frozen dataclasses.

The two experiments keep returning plain dicts (:func:`~unveil.experiments.synthetic.run_synthetic_benchmark`,
:func:`~unveil.experiments.shortcut.run_shortcut_experiment`); this module types them, with the machinery of
:mod:`~unveil.experiments.results` (the demo's ``results.json``)::

    >>> res = load_synthetic_results("unveil-synthetic/synthetic.json")  # doctest: +SKIP
    >>> res.methods["eddp"].summary.mean_iou.mean, res.heads[0].accuracy  # doctest: +SKIP
    >>> sc = load_shortcut_results("benchmarks/results/shortcut.json")  # doctest: +SKIP
    >>> sc.correction.poisoned_acc_after, sc.correction.rows["signal"].strength  # doctest: +SKIP

``X.from_dict(doc)`` checks that every key its fields need is present and of the declared type and raises
:class:`~unveil.ValidationError` naming the key as a dotted path (``methods.pca.per_seed[0].mean_iou``);
``X.from_dict(doc).to_dict() == doc`` key for key (keys a record does not type are kept, unchecked, in its
``extra`` field). The ``schema`` key (:data:`SYNTHETIC_SCHEMA`, :data:`SHORTCUT_SCHEMA`) is checked when
present; a document without one is the form the functions return, and the form the benchmark scripts and
unveil before this schema wrote, and is read as that. :func:`stamp_synthetic_results` /
:func:`stamp_shortcut_results` validate a result and return the JSON document to write, schema included.

Two records have keys that are present only sometimes, and null values that are meaningful when present:
a :class:`SeedRecord` carries the scores only when its fit succeeded (no ``error``), a
:class:`MethodSummary` the mean/worst metrics only when at least one seed succeeded (``n_seeds > 0``). Those
keys are required, possibly ``null``, in the one case and left out in the other.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .._errors import CorruptFileError, ValidationError
from .results import (ActivationMaximization, Correction, ShortcutSetup, _describe, _extra, _got, _key, _omit,
                      _Record, check_schema_version)

__all__ = ["SYNTHETIC_SCHEMA", "SHORTCUT_SCHEMA", "SyntheticBenchmarkResult", "MethodResult", "SeedRecord",
           "MethodSummary", "MeanWorst", "PerConcept", "HeadRecord", "HeadData", "ShortcutResult",
           "ShortcutCorrection", "EditRow", "TrueMaskRow", "ShortcutExperimentSetup", "load_synthetic_results",
           "load_shortcut_results", "stamp_synthetic_results", "stamp_shortcut_results"]

log = logging.getLogger("unveil")

SYNTHETIC_SCHEMA_NAME, SYNTHETIC_SCHEMA_VERSION = "unveil.synthetic-results", 1
SYNTHETIC_SCHEMA = f"{SYNTHETIC_SCHEMA_NAME}/{SYNTHETIC_SCHEMA_VERSION}"
SHORTCUT_SCHEMA_NAME, SHORTCUT_SCHEMA_VERSION = "unveil.shortcut-results", 1
SHORTCUT_SCHEMA = f"{SHORTCUT_SCHEMA_NAME}/{SHORTCUT_SCHEMA_VERSION}"

_DEMO_PREFIX = "demo results: "


class _Typed(_Record):
    """A :class:`_Record` whose annotations resolve in its own module, whose messages name its experiment,
    and which may declare a group of keys present only sometimes (``_GROUP``, see the module docstring)."""

    _WHAT = "results"
    _GROUP: Tuple[str, ...] = ()

    @classmethod
    def _hints(cls) -> Dict[str, Any]:
        cache = cls.__dict__.get("_hints_cache")
        if cache is None:
            cache = typing.get_type_hints(cls)  # each class's annotations in its own module
            setattr(cls, "_hints_cache", cache)
        return cache

    @classmethod
    def _group_expected(cls, doc: Mapping[str, Any]) -> bool:
        """Whether ``doc`` (a parsed section) must carry every key of ``_GROUP``."""
        return False

    def _group_present(self) -> bool:
        return False

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]):
        """Build from a parsed section; a missing key or a wrong type raises :class:`~unveil.ValidationError`
        naming it."""
        try:
            return super().from_dict(doc)
        except ValidationError as exc:
            raise _renamed(exc, cls._WHAT) from None

    @classmethod
    def _from_dict(cls, doc: Dict[str, Any], path: str):
        if cls._GROUP and cls._group_expected(doc):
            hints = cls._hints()
            by_key = {_key(f): f for f in dataclasses.fields(cls)}
            for name in cls._GROUP:
                key = _key(by_key[name])
                if key not in doc:
                    sub = f"{path}.{key}" if path else key
                    where = f"in {path!r}" if path else "at the top level"
                    raise ValidationError(f"{cls._WHAT}: required key {sub!r} is missing {where} "
                                          f"(expected {_describe(hints[name])}).")
        return super()._from_dict(doc, path)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        if self._GROUP and self._group_present():  # present keys whose value is null
            by_name = {f.name: f for f in dataclasses.fields(self)}
            for name in self._GROUP:
                out.setdefault(_key(by_name[name]), None)
        return out


def _renamed(exc: ValidationError, what: str) -> ValidationError:
    msg = str(exc)
    if msg.startswith(_DEMO_PREFIX):
        msg = f"{what}: {msg[len(_DEMO_PREFIX):]}"
    return ValidationError(msg)


# --------------------------------------------------------------------------- synthetic benchmark
class _Syn(_Typed):
    _WHAT = "synthetic results"


@dataclass(frozen=True)
class MeanWorst(_Syn):
    """A summary metric over seeds: mean and worst (null when every seed's value was NaN)."""

    mean: Optional[float]
    worst: Optional[float]


@dataclass(frozen=True)
class PerConcept(_Syn):
    """Matched IoU per true concept: mean and worst over seeds."""

    mean: List[Optional[float]]
    worst: List[Optional[float]]


_SUMMARY_GROUP = ("mean_iou", "off_diagonal_iou", "rmse", "encoder_cosine", "decoder_cosine", "fit_seconds",
                  "iou_per_concept")


@dataclass(frozen=True)
class MethodSummary(_Syn):
    """``methods[m].summary`` (:func:`~unveil.experiments.synthetic.summarize`); the metrics only when
    ``n_seeds > 0``."""

    n_seeds: int
    n_failed: int
    mean_iou: Optional[MeanWorst] = _omit()
    off_diagonal_iou: Optional[MeanWorst] = _omit()
    rmse: Optional[MeanWorst] = _omit()
    encoder_cosine: Optional[MeanWorst] = _omit()
    decoder_cosine: Optional[MeanWorst] = _omit()
    fit_seconds: Optional[MeanWorst] = _omit()
    iou_per_concept: Optional[PerConcept] = _omit()

    _GROUP = _SUMMARY_GROUP

    @classmethod
    def _group_expected(cls, doc):
        return isinstance(doc.get("n_seeds"), int) and doc["n_seeds"] > 0

    def _group_present(self):
        return self.n_seeds > 0

    @classmethod
    def _from_dict(cls, doc, path):
        res = super()._from_dict(doc, path)
        if res.n_seeds > 0:
            for name in _SUMMARY_GROUP:  # present (checked above) and not null
                if getattr(res, name) is None:
                    sub = f"{path}.{name}" if path else name
                    raise ValidationError(f"{cls._WHAT}: key {sub!r} must be an object, got null "
                                          f"(n_seeds is {res.n_seeds}).")
        return res


_SCORE_GROUP = ("fit_seconds", "matched_iou", "off_diagonal_iou", "assignment", "iou_matrix", "encoder_cosine",
                "decoder_cosine", "rmse", "rmse_overall", "rmse_raw_overall", "n_unmatched", "notes", "mean_iou",
                "mean_encoder_cosine", "mean_decoder_cosine", "meta")


@dataclass(frozen=True)
class SeedRecord(_Syn):
    """One method on one seed (``methods[m].per_seed[i]``): the :class:`~unveil.evaluate.recovery.RecoveryReport`
    numbers, the fit's seconds and the pairs' ``meta``; or, when the fit failed, ``error`` (and whatever was
    recorded before the failure). Per-concept lists follow the true concepts; NaN is null."""

    seed: int
    error: Optional[str] = _omit()
    fit_seconds: Optional[float] = _omit()
    matched_iou: Optional[List[Optional[float]]] = _omit()
    off_diagonal_iou: Optional[float] = _omit()
    assignment: Optional[List[int]] = _omit()
    iou_matrix: Optional[List[List[Optional[float]]]] = _omit()
    encoder_cosine: Optional[List[Optional[float]]] = _omit()
    decoder_cosine: Optional[List[Optional[float]]] = _omit()
    rmse: Optional[List[Optional[float]]] = _omit()
    rmse_overall: Optional[float] = _omit()
    rmse_raw_overall: Optional[float] = _omit()
    n_unmatched: Optional[int] = _omit()
    notes: Optional[Dict[str, str]] = _omit()
    mean_iou: Optional[float] = _omit()
    mean_encoder_cosine: Optional[float] = _omit()
    mean_decoder_cosine: Optional[float] = _omit()
    meta: Optional[Dict[str, Any]] = _omit()
    extra: Dict[str, Any] = _extra()

    _GROUP = _SCORE_GROUP

    @classmethod
    def _group_expected(cls, doc):
        return "error" not in doc

    def _group_present(self):
        return self.error is None

    @property
    def ok(self) -> bool:
        """The fit and its scoring succeeded."""
        return self.error is None


@dataclass(frozen=True)
class MethodResult(_Syn):
    """``methods[m]``: the method's description, its detection rule (absent when every seed failed), one
    :class:`SeedRecord` per seed and the :class:`MethodSummary`."""

    description: str
    per_seed: List[SeedRecord]
    summary: MethodSummary
    detection_rule: Optional[str] = _omit()


@dataclass(frozen=True)
class HeadData(_Syn):
    """``heads[i].data``: the seed's data size; ``extra``: its generation parameters (setting-specific)."""

    n_images: int
    n_features: int
    patches: int
    n_concepts: int
    n_distractors: int
    n_classes: int
    noise: float
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class HeadRecord(_Syn):
    """``heads[i]``: the head f⁺ trained on one seed's data."""

    seed: int
    accuracy: float
    epochs: int
    seconds: float
    data: HeadData


@dataclass(frozen=True)
class SyntheticBenchmarkResult(_Syn):
    """What :func:`~unveil.experiments.synthetic.run_synthetic_benchmark` returns and ``unveil synthetic``
    writes to ``synthetic.json`` (``schema`` only in the file)."""

    benchmark: str
    setting: str
    seeds: List[int]
    fast: bool
    versions: Dict[str, str]
    heads: List[HeadRecord]
    methods: Dict[str, MethodResult]
    skipped: Dict[str, str]
    scoring: Dict[str, str]
    schema: Optional[str] = _omit()
    extra: Dict[str, Any] = _extra()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "SyntheticBenchmarkResult":
        """Validate and type a result (or a parsed ``synthetic.json``): its schema, when present, first."""
        if not isinstance(doc, Mapping):
            raise ValidationError(f"{cls._WHAT} must be a JSON object (dict), got {_got(doc)}.")
        _check_schema(doc, SYNTHETIC_SCHEMA_NAME, SYNTHETIC_SCHEMA_VERSION, cls._WHAT, "unveil synthetic")
        res = super().from_dict(doc)
        if res.benchmark != "synthetic":
            raise ValidationError(f"{cls._WHAT}: key 'benchmark' must be 'synthetic', got {_got(res.benchmark)}.")
        missing = [s for s in res.seeds if s not in {h.seed for h in res.heads}]
        if missing:
            raise ValidationError(f"{cls._WHAT}: key 'heads' has no record of seed(s) {missing} listed in 'seeds'.")
        return res


# --------------------------------------------------------------------------- shortcut experiment
class _Sc(_Typed):
    _WHAT = "shortcut results"


@dataclass(frozen=True)
class EditRow(_Sc):
    """``correction.rows[direction]``: the detectors one edit direction corrects, its strength (chosen on
    held-out data) and its test accuracies; ``table`` the strength search, ``selection`` the greedy choice of
    detectors (null unless ``detectors="select"``)."""

    strength: float
    detectors: List[int]
    val_poisoned_acc: float
    val_clean_acc: float
    clean_acc_after: float
    poisoned_acc_after: float
    table: List[Dict[str, Any]]
    selection: Optional[List[Dict[str, Any]]]
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class TrueMaskRow(_Sc):
    """``correction.true_mask[direction]``: the best detector's direction with the true watermark cells as
    the mask."""

    strength: float
    val_poisoned_acc: float
    poisoned_acc_after: float
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True, kw_only=True)
class ShortcutCorrection(_Sc, Correction):
    """``correction``: the demo's :class:`~unveil.experiments.results.Correction` with every row typed and the
    keys the demo's record leaves untyped."""

    rows: Dict[str, EditRow]
    true_mask: Optional[Dict[str, TrueMaskRow]]
    grid: List[float]
    signal_detectors: List[int]
    union_precision: Optional[float]
    pattern_cav_image_detectors: Optional[List[int]]
    mean_difference_detectors: Optional[List[int]]


@dataclass(frozen=True, kw_only=True)
class ShortcutExperimentSetup(_Sc, ShortcutSetup):
    """``setup``: the experiment's settings (the demo's :class:`~unveil.experiments.results.ShortcutSetup`) and
    its seconds."""

    cav_cover: float
    nonneg_layer: bool
    fit_seconds: float
    eddp_params: Dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class ShortcutActivationMaximization(_Sc, ActivationMaximization):
    """``activation_maximization`` (as the demo's; the in-memory result's ``images`` tensor, if present, is
    kept unchecked in ``extra``)."""


@dataclass(frozen=True)
class ShortcutResult(_Sc):
    """What :func:`~unveil.experiments.shortcut.run_shortcut_experiment` returns (with ``images`` popped, as
    ``benchmarks/shortcut.py`` writes it); ``extra``: the keys a writer adds (``command``, ``seconds_total``)."""

    correction: ShortcutCorrection
    setup: ShortcutExperimentSetup
    activation_maximization: Optional[ShortcutActivationMaximization] = _omit()
    schema: Optional[str] = _omit()
    extra: Dict[str, Any] = _extra()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "ShortcutResult":
        """Validate and type a result (or a parsed json): its schema, when present, first."""
        if not isinstance(doc, Mapping):
            raise ValidationError(f"{cls._WHAT} must be a JSON object (dict), got {_got(doc)}.")
        _check_schema(doc, SHORTCUT_SCHEMA_NAME, SHORTCUT_SCHEMA_VERSION, cls._WHAT, "benchmarks/shortcut.py")
        return super().from_dict(doc)


# --------------------------------------------------------------------------- schema, loading, writing
def _check_schema(doc: Mapping[str, Any], name: str, version: int, what: str, writer: str) -> None:
    """``doc["schema"]``, when present, must be ``name/version``."""
    if "schema" in doc:
        check_schema_version(doc["schema"], name, version, what, writer)


def _load_file(path, default_name: Optional[str], cls, writer: str):
    from .._io import read_json_object
    path = Path(path)
    if path.is_dir() and default_name is not None:
        path = path / default_name
    if not path.is_file():
        raise CorruptFileError(f"no {cls._WHAT} at {str(path)!r}: expected the json that {writer} writes.")
    doc = read_json_object(path)
    if doc is None:
        raise CorruptFileError(f"{str(path)!r} is not a JSON object (invalid JSON, unreadable or a symbolic link); "
                               f"the file is corrupt. Run {writer} again.")
    try:
        return cls.from_dict(doc)
    except ValidationError as exc:
        raise ValidationError(f"{str(path)!r}: {exc}") from None


def load_synthetic_results(path) -> SyntheticBenchmarkResult:
    """Read ``synthetic.json`` of ``unveil synthetic`` (or the folder holding it), validate it, return
    :class:`SyntheticBenchmarkResult`.

    Raises :class:`~unveil.CorruptFileError` when the file is missing or not JSON and
    :class:`~unveil.ValidationError` when its schema is not :data:`SYNTHETIC_SCHEMA` (a file without one is read
    as this version) or a key is missing or of the wrong type (the message names the key).
    """
    return _load_file(path, "synthetic.json", SyntheticBenchmarkResult, "`unveil synthetic`")


def load_shortcut_results(path) -> ShortcutResult:
    """Read the json of the shortcut experiment (``benchmarks/shortcut.py`` writes ``<out>.json``), validate
    it, return :class:`ShortcutResult`. Errors as :func:`load_synthetic_results`."""
    return _load_file(path, None, ShortcutResult, "benchmarks/shortcut.py")


def _stamp(result: Mapping[str, Any], cls, schema: str, strict: bool) -> Dict[str, Any]:
    from .._io import _json_default
    doc = json.loads(json.dumps(result, default=_json_default))  # the form the file holds
    doc.pop("schema", None)
    try:
        typed = cls.from_dict(doc)
        again = typed.to_dict()
        if again != doc:  # pragma: no cover - a record that drops or changes a key is a bug here
            diff = sorted(k for k in set(doc) | set(again) if doc.get(k, KeyError) != again.get(k, KeyError))
            raise ValidationError(f"{cls._WHAT}: the typed form does not round-trip key(s) {diff}.")
    except ValidationError as exc:
        if strict:
            raise
        log.warning("%s do not match their schema %s (%s); writing them without a schema key", cls._WHAT, schema,
                    exc)
        return doc
    return {**doc, "schema": schema}


def stamp_synthetic_results(result: Mapping[str, Any], strict: bool = False) -> Dict[str, Any]:
    """The JSON document to write for a :func:`~unveil.experiments.synthetic.run_synthetic_benchmark` result:
    validated through :class:`SyntheticBenchmarkResult` and with ``schema`` set to :data:`SYNTHETIC_SCHEMA`.

    When validation fails: ``strict`` raises the :class:`~unveil.ValidationError`; otherwise (so that a long
    run's numbers are never lost) a warning is logged and the document is returned without ``schema``.
    """
    return _stamp(result, SyntheticBenchmarkResult, SYNTHETIC_SCHEMA, strict)


def stamp_shortcut_results(result: Mapping[str, Any], strict: bool = False) -> Dict[str, Any]:
    """As :func:`stamp_synthetic_results`, for a :func:`~unveil.experiments.shortcut.run_shortcut_experiment`
    result (its ``activation_maximization.images`` tensor must have been popped)."""
    return _stamp(result, ShortcutResult, SHORTCUT_SCHEMA, strict)
