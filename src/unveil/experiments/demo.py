"""``unveil demo``: the whole method end to end on the concept world (the HTML report is written by the caller's
``write_report``: :func:`unveil.run_demo` and the command line pass :func:`unveil.report.write_report`).

Pipeline (each stage timed and shown with a progress bar)::

    draw world train/val  ->  load the shipped WorldNet  ->  capture one layer  ->  head f⁺
    ->  EDDP  +  baselines (PCA, ICA, NMF, k-means, SAE) on the same activations
    ->  Network Dissection of every method (labels from train, scores on val)
    ->  RCAV influence of the EDDP directions on the classes (against permuted-label noise directions)
    ->  EDDP's detectors against supervised Pattern-CAVs, concept by concept (S³)
    ->  DIR/results.json (atomic) + DIR/eddp_pairs/ (+ DIR/report.html, self-contained, by write_report)

Detection rules (all label-free, stated in the report and in ``results.json``):

* EDDP: ``σ(wᵀx − b) > 0.5`` (its own hyperplane).
* Baselines, primary rule: the NetDissect top-quantile rule of
  :func:`~unveil.evaluate.dissection.fit_thresholds_on_train` — per component, the threshold above
  which the top ``1 − quantile`` (default 0.5 %) of its train-split map values lie, applied to the
  component score ``decision_function`` (``wᵀx − b``; k-means: own score minus the best other).
* Baselines, secondary rule (reported next to it): the method's own label-free rule
  (``pairs_.detect > 0.5``: Otsu threshold for PCA/ICA/NMF/SAE, nearest centroid for k-means).

The world's train split is drawn from the same random stream as WorldNet's training images (the
dissection may use them: it labels detectors, it does not test the model); the model's accuracy is
measured on the validation split, which WorldNet never saw.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .._device import limit_threads
from .._errors import ValidationError
from .._progress import progress as _progress
from .._validation import check_positive_int

__all__ = ["DemoConfig", "run_demo", "compare_pretrained_random", "BASELINES"]

logger = logging.getLogger("unveil")

#: baselines run by the demo, in table order
BASELINES = ("pca", "ica", "nmf", "kmeans", "sae")
_WORLD_MODELS = ("worldnet", "worldnet-shortcut")


@dataclass
class DemoConfig:
    """Sizes and budgets of one demo run (``fast`` shrinks everything to a smoke test)."""

    n_train: int = 1000
    n_val: int = 400
    n_concepts: Optional[int] = None  # None: 2 x world concepts, at most 64
    layer: Optional[str] = None  # None: 'layer4' (the last conv stage)
    eddp_steps: Dict[str, int] = field(default_factory=lambda: {"b": 100, "d": 150})
    eddp_n_init: int = 4
    eddp_init_rounds: int = 3
    eddp_max_init_patches: int = 20_000
    eddp_levels: Any = "auto"  # concepts at several granularities (EDDP(levels=...)); None = one level
    kmeans_n_init: int = 3
    sae_epochs: int = 15
    decomposition_max_iter: int = 300
    max_baseline_patches: int = 20_000
    quantile: float = 0.995
    # influence (unveil.influence, its defaults): the class-specific log-odds change, the per-direction t-test,
    # significant against the paper's permuted-label null and as many random unit directions (the calibration
    # benchmark: the one configuration that keeps the error rate on both kinds of noise); n_null noise classifiers
    # per direction on balanced subsets of <= influence_max_patches patches (the paper: 100 and 5000; 1000 keeps
    # the stage short on one thread)
    influence_statistic: str = "logit"
    influence_test: str = "t"
    influence_null: int = 100
    influence_random_null: int = 100
    influence_max_patches: int = 1000
    # RCAV where the head is not pool -> linear (other layers): the whole head runs on every shifted map, so a
    # class-balanced subset of the validation maps and at most rcav_null_full_head vectors in each reference
    rcav_max_maps_full_head: int = 70
    rcav_null_full_head: int = 20
    influence_extra_layers: bool = True  # RCAV at the extra layers too (the whole head runs on every shifted map)
    pattern_cav: bool = True  # the S³ table: EDDP's detectors against supervised Pattern-CAVs
    pattern_cav_cover: float = 0.5
    top_k: int = 8
    n_report_detectors: int = 24
    # torch threads of the dissection stages (torch-only, integer counts: the results do not depend on it;
    # 2 threads cut them by about a third on an idle 2-core machine); capped at the CPU count
    dissect_threads: int = 2
    extra_layers: tuple = ("layer3",)  # EDDP, dissection and RCAV (no baselines), for a layer table
    n_explanations: int = 4  # explanation gallery (validation images)
    n_counterfactuals: int = 2  # of the gallery images: the top concept removed
    # --shortcut only: keyword arguments of unveil.experiments.shortcut.run_shortcut_experiment (the layer and
    # number of concepts of benchmarks/results/shortcut.md, fewer fit/held-out/test images)
    shortcut_experiment: Dict[str, Any] = field(default_factory=lambda: {
        "layer": "layer2", "n_concepts": 64, "n_fit": 1000, "n_val": 500, "n_test": 800, "n_random": 10,
        "actmax_steps": 96})

    @classmethod
    def fast_config(cls) -> "DemoConfig":
        return cls(n_train=56, n_val=28, n_concepts=8, eddp_steps={"b": 5, "d": 5}, eddp_n_init=1,
                   eddp_init_rounds=1, eddp_max_init_patches=2000, kmeans_n_init=1, sae_epochs=2,
                   decomposition_max_iter=100, max_baseline_patches=2000, influence_null=10,
                   influence_random_null=10, top_k=4,
                   n_report_detectors=6, extra_layers=(), n_explanations=3,
                   shortcut_experiment={"layer": "layer2", "n_concepts": 4, "n_fit": 28, "n_val": 14, "n_test": 14,
                                        "n_random": 2, "actmax_steps": 2,
                                        "eddp_params": {"steps": {"b": 5, "d": 5}, "n_init": 1, "init_rounds": 1,
                                                        "max_init_patches": 2000}})


# --------------------------------------------------------------------------- data held in memory
class _Materialized:
    """A concept data set drawn once and kept in memory (images, masks, labels).

    Follows the dataset protocol of :mod:`unveil.data.world` (``len``, ``ds[i]``, ``concepts``,
    ``categories``, ``class_names``), so :func:`~unveil.evaluate.dissection.dissect` can read it
    repeatedly without redrawing.
    """

    def __init__(self, ds, progress: bool = False, desc: str = "drawing"):
        from ..data.world import WorldSample
        self._sample_cls = WorldSample
        n = len(ds)
        first = ds[0]
        h, w = first.image.shape[:2]
        self.images = np.empty((n, h, w, 3), np.uint8)
        self.masks = np.empty((n,) + first.masks.shape, bool)
        for i in _progress(range(n), enabled=progress, desc=desc, unit="img"):
            s = first if i == 0 else ds[i]
            self.images[i] = s.image
            self.masks[i] = s.masks
        self.labels = np.array(ds.labels, dtype=np.int64)  # a writable copy
        self.concepts = list(ds.concepts)
        self.categories = list(ds.categories)
        self.class_names = list(ds.class_names)
        self.watermarked = np.array(getattr(ds, "watermarked", np.zeros(n, bool)), dtype=bool)
        self.source = repr(ds)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        i = int(i)
        return self._sample_cls(image=self.images[i], masks=self.masks[i], label=int(self.labels[i]))

    def images_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)


# --------------------------------------------------------------------------- timing
class _Timer:
    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        logger.info("demo: %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            logger.info("demo: %s done in %.1f s", name, self.seconds[name])


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover - platform without getloadavg
        return None


# --------------------------------------------------------------------------- pieces
def _default_n_concepts(n_world_concepts: int) -> int:
    return int(min(64, 2 * n_world_concepts))


def _fit_baselines(train_maps: torch.Tensor, n_concepts: int, cfg: DemoConfig, seed: int, progress: bool,
                   timer: _Timer) -> Dict[str, Any]:
    """Fit every baseline on (a seeded random subsample of) the train patches; returns name -> pairs."""
    from ..directions.baselines import (ICABaseline, KMeansBaseline, NMFBaseline, PCABaseline,
                                       SparseAutoencoder)
    P = train_maps.permute(0, 2, 3, 1).reshape(-1, train_maps.shape[1])
    if P.shape[0] > cfg.max_baseline_patches:
        g = torch.Generator().manual_seed(int(seed))
        P = P[torch.randperm(P.shape[0], generator=g)[:cfg.max_baseline_patches]]
    P = P.contiguous()
    makers = {
        "pca": lambda: PCABaseline(n_concepts, random_state=seed),
        "ica": lambda: ICABaseline(n_concepts, random_state=seed, max_iter=cfg.decomposition_max_iter),
        "nmf": lambda: NMFBaseline(n_concepts, random_state=seed, max_iter=cfg.decomposition_max_iter),
        "kmeans": lambda: KMeansBaseline(n_concepts, random_state=seed, n_init=cfg.kmeans_n_init),
        "sae": lambda: SparseAutoencoder(n_concepts, epochs=cfg.sae_epochs, random_state=seed),
    }
    out = {}
    bar = _progress(BASELINES, enabled=progress, desc="baselines")
    for name in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)
        with timer.stage(f"fit_{name}"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence warnings of the capped iteration budgets
                out[name] = makers[name]().fit(P).pairs_
    return out


def _balanced_subset(labels: np.ndarray, n_max: int) -> np.ndarray:
    """At most ``n_max`` indices, the first ``ceil(n_max / K)`` of each class (sorted)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per = max(1, -(-int(n_max) // max(len(classes), 1)))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per] for c in classes]))


def _dissect_summary(res) -> Dict[str, Any]:
    keys = ("S1", "S2", "n_interpretable", "n_distinct", "mPrecision", "mRecall", "mAP", "mF1", "n_detectors")
    return {k: res.summary[k] for k in keys}


def _category_counts(res) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for c, ok in zip(res.labels, res.interpretable):
        if ok:
            cat = res.concept_categories[int(c)]
            counts[cat] = counts.get(cat, 0) + 1
    return counts


def _resolve_model(model: str, shortcut: bool):
    if model not in _WORLD_MODELS:
        raise ValidationError(f"the demo runs on the concept world, so model must be one of {_WORLD_MODELS}, "
                              f"got {model!r}. For other models use `unveil capture`.")
    if shortcut or model == "worldnet-shortcut":
        return "worldnet-shortcut", True
    return "worldnet", False


def _gallery_indices(val: "_Materialized", n: int, shortcut: bool) -> List[int]:
    """Up to ``n`` validation images of distinct classes (with --shortcut, first a watermarked one)."""
    chosen: List[int] = []
    if shortcut and val.watermarked.any():
        chosen.append(int(np.flatnonzero(val.watermarked)[0]))
    seen = {int(val.labels[i]) for i in chosen}
    for i in range(len(val)):
        if len(chosen) >= n:
            break
        if int(val.labels[i]) not in seen and i not in chosen:
            chosen.append(i)
            seen.add(int(val.labels[i]))
    for i in range(len(val)):  # fewer classes than n: fill with the next images
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def _explanations(net, layer, pairs, val, x_val, cfg: DemoConfig, shortcut: bool):
    """Explanation gallery and counterfactuals on validation images; returns (report objects, json doc)."""
    from ..edit import counterfactual
    from ..explain import explain
    idx = _gallery_indices(val, cfg.n_explanations, shortcut) if cfg.n_explanations > 0 else []
    if not idx:
        return {}, None
    images = x_val[torch.as_tensor(idx)]
    expl = explain(net, layer, pairs, images, top_k=5, class_names=val.class_names)
    doc: Dict[str, Any] = {"layer": layer, "explanations": [], "counterfactuals": [],
                           "contribution": "logit_c - logit_c(concept removed with its signal value), c = predicted"}
    for n, (i, e) in enumerate(zip(idx, expl)):
        doc["explanations"].append({"val_index": i, "true_class": val.class_names[int(val.labels[i])],
                                    "watermarked": bool(val.watermarked[i]),
                                    **e.to_dict(include_maps=False)})
    cands = []
    for n in range(len(idx)):  # every gallery image; the largest drops of p(predicted class) are shown
        top = expl[n].top[0]
        cf = counterfactual(net, layer, pairs, images[n:n + 1], concept=top)
        c0 = int(cf.pred_before[0])
        drop = float(cf.probs_before[0, c0] - cf.probs_after[0, c0])
        cands.append((drop, n, {
            "val_index": idx[n], "gallery_position": n, "concept": int(top), "name": pairs.names[top],
            "probs_before": cf.probs_before[0].tolist(), "probs_after": cf.probs_after[0].tolist(),
            "p_drop": drop, "pred_before": val.class_names[c0],
            "pred_after": val.class_names[int(cf.pred_after[0])], "class_names": list(val.class_names)}))
    cands.sort(key=lambda t: (-t[0], t[1]))
    doc["counterfactuals"] = [d for _, _, d in cands[:max(0, int(cfg.n_counterfactuals))]]
    doc["counterfactual_selection"] = (f"the {len(doc['counterfactuals'])} of {len(idx)} gallery images whose "
                                       f"predicted-class probability dropped most when their top concept was removed")
    report_objs = {"explanations": expl, "images": val.images[np.asarray(idx)], "class_names": list(val.class_names)}
    return report_objs, doc


def _influence(net, head, layer_name, m_val, val, pairs, names, cfg: DemoConfig, seed: int, progress: bool):
    """RCAV of the EDDP directions and of two controls on the same detectors.

    The controls replace each signal vector by (a) one more noise classifier's pattern, trained with the
    null's (exchangeable with the null) and (b) a random unit vector: no concept in either, so their
    significant pairs are false positives. All three share the one null. Returns the EDDP and the two
    control :class:`~unveil.evaluate.influence.Influence` results and the ``results.json`` section.
    """
    from ..evaluate.influence import influence_with_controls, permutation_noise_vectors
    # above layer4 WorldNet is global average pool -> fc, so the pooled fast path applies
    pooled = net.fc if layer_name == "layer4" else None
    r_maps, r_labels, n_null, n_rand = m_val, val.labels, cfg.influence_null, cfg.influence_random_null
    if pooled is None:  # the whole head runs on every shifted map: a class-balanced subset, smaller references
        keep = _balanced_subset(val.labels, cfg.rcav_max_maps_full_head)
        r_maps, r_labels = m_val[torch.as_tensor(keep)], val.labels[keep]
        n_null, n_rand = min(n_null, cfg.rcav_null_full_head), min(n_rand, cfg.rcav_null_full_head)
    # one set of noise classifiers: n_null noise vectors per detector form the null of every test, one more per
    # detector (drawn with them, so exchangeable with them) is the control's encoder
    vec, _ = permutation_noise_vectors(r_maps, pairs, n_null + 1, random_state=seed,
                                       max_patches=cfg.influence_max_patches)
    g = torch.Generator().manual_seed(seed + 1)
    noise = vec[-1].clone()
    bad = ~torch.isfinite(noise).all(1)
    if bad.any():  # a detector that fires on < 2 patches has no noise vector (and no null: never significant)
        fill = torch.randn(int(bad.sum()), noise.shape[1], generator=g)
        noise[bad] = (fill / fill.norm(dim=1, keepdim=True)).to(noise.dtype)
    rand = torch.randn(pairs.n_concepts, pairs.n_features, generator=g)
    common = dict(statistic=cfg.influence_statistic, test=cfg.influence_test, null="permutation",
                  n_null=n_null, null_vectors=vec[:-1], random_null=n_rand,
                  pooled_head=pooled, random_state=seed, class_names=val.class_names, progress=progress)
    encoders = {"control": noise, "control_random": rand / rand.norm(dim=1, keepdim=True)}
    infl, controls = influence_with_controls(head, r_maps, r_labels, pairs, encoders, concept_names=names, **common)
    what = {"control": "the same detectors, each signal vector replaced by one more permuted-label noise vector "
                       "(exchangeable with the null: its significant pairs are false positives)",
            "control_random": "the same detectors, each signal vector replaced by a random unit vector (no concept: "
                              "its significant pairs are false positives)"}
    doc = {"SDC": infl.sdc, "SCDP": infl.scdp, "null": "permutation", "statistic": cfg.influence_statistic,
           "test": cfg.influence_test, "n_null": n_null, "random_null": n_rand,
           "max_patches": cfg.influence_max_patches,
           "n_maps": int(len(r_labels)), "pooled_head_fast_path": pooled is not None,
           "alpha": infl.config.get("alpha"), "bonferroni_level": infl.config.get("bonferroni_level"),
           "mean_abs_score": float(np.nanmean(np.abs(infl.score))),
           **{key: {"what": what[key], "SDC": c.sdc, "SCDP": c.scdp,
                    "mean_abs_score": float(np.nanmean(np.abs(c.score)))} for key, c in controls.items()},
           "top_concepts": infl.top_concepts(3), "result": infl.to_dict()}
    return infl, controls["control"], doc


def _layer_influence(doc: Dict[str, Any]) -> Dict[str, Any]:
    """The ``layers[layer].influence`` summary of an :func:`_influence` section."""
    return {"SDC": doc["SDC"], "SCDP": doc["SCDP"], "n_maps": doc["n_maps"], "n_null": doc["n_null"],
            "random_null": doc["random_null"], "control_SDC": doc["control"]["SDC"],
            "control_SCDP": doc["control"]["SCDP"], "control_random_SDC": doc["control_random"]["SDC"],
            "control_random_SCDP": doc["control_random"]["SCDP"]}


def _pattern_cav(m_train, m_val, train, val, pairs, eddp_res, cfg: DemoConfig) -> Optional[Dict[str, Any]]:
    """The S³ table (:func:`unveil.evaluate.pattern_cav.compare_with_pattern_cavs`) as a ``results.json`` section."""
    from ..evaluate.pattern_cav import compare_with_pattern_cavs
    try:
        cmp = compare_with_pattern_cavs(m_train, train.masks, m_val, val.masks, pairs, eddp_res.iou_train,
                                        eddp_res.iou_val, concept_names=[c.name for c in train.concepts],
                                        cover=cfg.pattern_cav_cover)
    except ValidationError as exc:  # too few images for any concept (tiny configurations)
        logger.warning("demo: no Pattern-CAV comparison: %s", exc)
        return None
    return cmp.to_dict()


# --------------------------------------------------------------------------- the demo
def run_demo(out="unveil-demo", *, model: str = "worldnet", layer: Optional[str] = None,
             n_concepts: Optional[int] = None, shortcut: bool = False, fast: bool = False,
             progress: bool = True, seed: int = 0, efficientnet: bool = False,
             config: Optional[DemoConfig] = None, threads: Optional[int] = 1,
             levels: Any = "default", write_report: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    """Run the full method on the concept world and write ``results.json`` (and, given a writer, ``report.html``).

    :func:`unveil.run_demo` and ``unveil demo`` call this with ``write_report=unveil.report.write_report``
    (the report layer sits above the experiments, so this module does not import it).

    Parameters
    ----------
    out : path
        Output folder (created). Holds ``results.json``, ``report.html`` and ``eddp_pairs/``.
    model : {"worldnet", "worldnet-shortcut"}
        The shipped concept-world CNN to explain.
    layer : str, optional
        Layer to explain (default ``"layer4"``, the last conv stage; ``"layer3"`` works too).
    n_concepts : int, optional
        Number of EDDP directions and baseline components (default: twice the number of world
        concepts, at most 64).
    shortcut : bool
        Use ``worldnet-shortcut`` and world images with its watermark; the report shows the
        detector that best matches the watermark.
    fast : bool
        A tiny configuration (a few dozen images, few concepts and steps): a smoke test.
    progress : bool
        tqdm bars per stage.
    seed : int
        Seed of the world's images and of every estimator.
    efficientnet : bool
        Also run :func:`compare_pretrained_random` (EfficientNet-Lite0 vs random init; needs the
        optional ``zoo`` packages, skipped with a note when missing).
    config : DemoConfig, optional
        Explicit sizes and budgets (overrides ``fast``).
    levels : "auto", None or list of int
        EDDP's levels of granularity (see :class:`~unveil.EDDP`); default the config's
        (``"auto"``); ``None`` fits one level, as in the paper.
    threads : int or None
        Threads of torch and of numpy's BLAS during the run (restored afterwards); ``None`` keeps the
        current settings. The default 1 is deliberate: on a shared 2-core CPU the EDDP
        initialisation's L-BFGS ran ~10x faster and scikit-learn's FastICA/NMF ~10-15x faster on one
        thread than on two (oversubscribed BLAS threads spin and wait).
    write_report : callable, optional
        Writes ``DIR/report.html``, called as :func:`unveil.report.write_report` is; ``None`` writes no report.

    Returns
    -------
    dict
        The content of ``results.json`` (``DemoResults.to_dict()``, schema
        :data:`~unveil.experiments.results.RESULTS_SCHEMA`); :func:`~unveil.load_results` reads the file back
        as the typed :class:`~unveil.experiments.results.DemoResults` (``DemoResults.from_dict(doc)`` types
        this dict).

    Examples
    --------
    >>> res = run_demo("demo-out", fast=True, progress=False)  # doctest: +SKIP
    >>> sorted(res["dissection"])  # doctest: +SKIP
    ['eddp', 'ica', 'kmeans', 'nmf', 'pca', 'sae']
    """
    seed = check_positive_int(seed, "seed", minimum=0)
    model_name, shortcut = _resolve_model(model, shortcut)
    if not (isinstance(levels, str) and levels == "default"):
        config = replace(config if config is not None else (DemoConfig.fast_config() if fast else DemoConfig()),
                         eddp_levels=levels)
    args = (out, model_name, shortcut, layer, n_concepts, fast, progress, seed, efficientnet, config, write_report)
    if threads is None:
        return _run_demo(*args)
    with limit_threads(check_positive_int(threads, "threads")):
        return _run_demo(*args)


def _is_demo_results(doc: dict) -> bool:
    """A results.json the demo wrote (this schema, an older or a newer one): the demo may replace it."""
    from .results import is_demo_results
    return is_demo_results(doc)


# --------------------------------------------------------------------------- the stages, in run order
@dataclass
class _Run:
    """What every stage reads: the run's settings, its seed and its stopwatch."""

    cfg: DemoConfig
    seed: int
    progress: bool
    shortcut: bool
    timer: _Timer
    load_start: Optional[List[float]]
    t_start: float


@dataclass
class _WorldData:
    """Stage 1: the world's train and validation splits, drawn once (images in [0, 1] as tensors too)."""

    train: _Materialized
    val: _Materialized
    x_train: torch.Tensor
    x_val: torch.Tensor
    watermark: Any  # the WatermarkSpec stamped on the images (--shortcut), else None


@dataclass
class _LoadedModel:
    """Stage 2: the network, the layer explained and the ``results.json`` "model" section."""

    net: torch.nn.Module
    model_id: str
    layer: str
    info: Dict[str, Any]


@dataclass
class _LayerMaps:
    """Stage 3: the layer's activation maps on both splits and the head above the layer."""

    train: torch.Tensor
    val: torch.Tensor
    head: Any

    @property
    def shape(self) -> List[int]:
        return [int(x) for x in self.train.shape[1:]]


@dataclass
class _Dissection:
    """Stage 6: every method's dissection (primary rules), the baselines' native-rule summaries, EDDP's maps."""

    results: Dict[str, Any]
    rules: Dict[str, str]
    native: Dict[str, Any]
    det_train: torch.Tensor
    det_val: torch.Tensor


@dataclass
class _Findings:
    """Stages 4 and 7-11: what goes into ``results.json`` and the report beyond the dissection."""

    est: Any
    names: List[str]  # "d<i>:<dissection label>" per EDDP detector
    influence: Any
    influence_control: Any
    influence_doc: Dict[str, Any]
    pattern_cav_doc: Optional[Dict[str, Any]] = None
    shortcut_info: Optional[Dict[str, Any]] = None
    layers_doc: Dict[str, Any] = field(default_factory=dict)
    effnet: Optional[Dict[str, Any]] = None
    applications: Dict[str, Any] = field(default_factory=dict)
    applications_doc: Optional[Dict[str, Any]] = None
    experiment: Optional[Dict[str, Any]] = None
    pairs: Any = None  # EDDP's pairs with their names and meta, as saved in DIR/eddp_pairs


def _run_demo(out, model_name, shortcut, layer, n_concepts, fast, progress, seed, efficientnet, config,
              write_report):
    import json

    from .._io import _json_default, atomic_write_bytes, check_outputs_replaceable

    cfg = _demo_config(config, fast, n_concepts, layer)
    out = Path(out)
    check_outputs_replaceable(out, {"results.json": _is_demo_results, "report.html": None})
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg=cfg, seed=seed, progress=progress, shortcut=shortcut, timer=_Timer(), load_start=_loadavg(),
               t_start=time.perf_counter())
    data = _draw_world(run)                                                     # 1. data
    I = cfg.n_concepts or _default_n_concepts(len(data.train.concepts))
    model = _load_demo_model(run, model_name, data)                             # 2. model
    maps = _capture_layer(run, model, data)                                     # 3. capture
    with run.timer.stage("fit_eddp"):                                           # 4. EDDP
        est = _eddp(cfg, I, seed, progress).fit(maps.train, head=maps.head)
    base_pairs = _fit_baselines(maps.train, I, cfg, seed, progress, run.timer)  # 5. baselines
    diss = _dissect_methods(run, data, maps, est, base_pairs, I)                # 6. dissection
    found = _influence_stages(run, model, data, maps, est, diss)                # 7. influence, 7b. S³, 8. shortcut
    found.layers_doc = _layer_table(run, model, data, maps, diss, found, I)     # 9. other layers
    if efficientnet:                                                            # 10. EfficientNet
        with run.timer.stage("efficientnet"):
            found.effnet = compare_pretrained_random(n_train=min(cfg.n_train, 400), n_val=min(cfg.n_val, 200),
                                                     seed=seed, progress=progress)
    _applications(run, out, model, data, diss, found)                           # 11. pairs, gallery, experiment
    result = _typed_results(_results_doc(run, data, model, maps, diss, found, model_name=model_name, fast=fast,
                                         n_concepts=I))
    if write_report is not None:
        with run.timer.stage("report"):
            _write_demo_report(write_report, out, result, data, diss, found, cfg)
    from .results import Timing
    end = _loadavg()
    t = _timing(run)
    result = replace(result, timing=Timing(stages_s=t["stages_s"], total_s=t["total_s"],
                                           loadavg_start=t["loadavg_start"], loadavg_end=end),
                     machine=replace(result.machine, loadavg_end=end))
    doc = result.to_dict()
    # keys in the order they were made (not sorted): the methods, layers and stages read back in table order
    atomic_write_bytes(out / "results.json", (json.dumps(doc, indent=2, default=_json_default) + "\n").encode())
    logger.info("demo: wrote %s%s in %.1f s", out / "results.json",
                "" if write_report is None else f" and {out / 'report.html'}", result.timing.total_s)
    return doc


def _typed_results(doc: Dict[str, Any]):
    """``doc`` as it reads back from ``results.json`` (JSON types), validated into a :class:`DemoResults`."""
    import json

    from .._io import _json_default
    from .results import DemoResults
    return DemoResults.from_dict(json.loads(json.dumps(doc, default=_json_default)))


def _demo_config(config: Optional[DemoConfig], fast: bool, n_concepts: Optional[int],
                 layer: Optional[str]) -> DemoConfig:
    cfg = replace(config) if config is not None else (DemoConfig.fast_config() if fast else DemoConfig())
    if n_concepts is not None:
        cfg.n_concepts = check_positive_int(n_concepts, "n_concepts")
    if layer is not None:
        cfg.layer = layer
    return cfg


def _eddp(cfg: DemoConfig, n_concepts: int, seed: int, progress: bool):
    """An unfitted EDDP with the demo's budgets."""
    from ..directions import EDDP
    return EDDP(n_concepts=n_concepts, steps=dict(cfg.eddp_steps), n_init=cfg.eddp_n_init,
                init_rounds=cfg.eddp_init_rounds, max_init_patches=cfg.eddp_max_init_patches,
                levels=cfg.eddp_levels, random_state=seed, progress=progress)


def _timing(run: _Run) -> Dict[str, Any]:
    return {"stages_s": dict(run.timer.seconds), "total_s": round(time.perf_counter() - run.t_start, 3),
            "loadavg_start": run.load_start}


def _draw_world(run: _Run) -> _WorldData:
    from ..data.world import ConceptWorld
    from ..models.worldnet import SHORTCUT_WATERMARK
    watermark = SHORTCUT_WATERMARK if run.shortcut else None
    with run.timer.stage("data"):
        train = _Materialized(ConceptWorld(run.cfg.n_train, split="train", seed=run.seed, watermark=watermark),
                              run.progress, "world train split")
        val = _Materialized(ConceptWorld(run.cfg.n_val, split="val", seed=run.seed, watermark=watermark),
                            run.progress, "world val split")
        return _WorldData(train, val, train.images_tensor(), val.images_tensor(), watermark)


def _load_demo_model(run: _Run, model_name: str, data: _WorldData) -> _LoadedModel:
    from ..models import load_model
    from ..models.worldnet import evaluate_accuracy, load_worldnet
    with run.timer.stage("model"):
        net, _, model_id = load_model(model_name)
        _, meta = load_worldnet(shortcut=run.shortcut, with_meta=True)
        layer_name = run.cfg.layer or "layer4"
        test_acc = evaluate_accuracy(net, data.x_val, data.val.labels)
        info = {"name": model_name, "id": model_id, "layer": layer_name, "test_acc": test_acc,
                "test_acc_split": f"val ({len(data.val)} images, never seen in training)",
                "checkpoint_metrics": {k: v for k, v in meta.get("metrics", {}).items()
                                       if k.endswith("accuracy") or k == "poisoned_predicted_as_target"}}
    return _LoadedModel(net, model_id, layer_name, info)


def _capture_layer(run: _Run, model: _LoadedModel, data: _WorldData) -> _LayerMaps:
    from ..capture import capture, make_head
    with run.timer.stage("capture"):
        m_train = capture(model.net, model.layer, data.x_train, progress=run.progress)
        m_val = capture(model.net, model.layer, data.x_val, progress=run.progress)
        return _LayerMaps(m_train, m_val, make_head(model.net, model.layer))


def _dissect_pairs(pairs, m_train: torch.Tensor, m_val: torch.Tensor, train: "_Materialized",
                   val: "_Materialized", *, top_k: int, progress: bool, detector_names=None):
    """Dissect direction pairs by their own rule (detect > 0.5): labels from ``train``, scores on ``val``."""
    from ..evaluate.dissection import dissect
    with torch.no_grad():
        det_train, det_val = pairs.detect(m_train), pairs.detect(m_val)
    res = dissect(det_train, train, list(range(len(train))), list(range(len(val))), threshold=0.5,
                  val_maps=det_val, val_dataset=val, top_k=top_k, progress=progress, detector_names=detector_names)
    return res, det_train, det_val


def _dissect_threads(cfg: DemoConfig):
    return limit_threads(max(1, min(int(cfg.dissect_threads), os.cpu_count() or 1)), blas=False)


def _dissect_methods(run: _Run, data: _WorldData, maps: _LayerMaps, est, base_pairs: Dict[str, Any],
                     I: int) -> _Dissection:
    """EDDP with its own rule, then every baseline with the NetDissect rule (and its own rule, for reference)."""
    with _dissect_threads(run.cfg):
        return _dissect_all(run, data, maps, est, base_pairs, I)


def _dissect_all(run: _Run, data: _WorldData, maps: _LayerMaps, est, base_pairs: Dict[str, Any],
                 I: int) -> _Dissection:
    from ..evaluate.dissection import dissect, fit_thresholds_on_train
    cfg, train, val, pairs = run.cfg, data.train, data.val, est.pairs_
    tr_idx, va_idx = list(range(len(train))), list(range(len(val)))
    common = dict(val_dataset=val, top_k=cfg.top_k, progress=run.progress)
    results: Dict[str, Any] = {}
    rules: Dict[str, str] = {"eddp": "sigmoid(w.x - b) > 0.5 (its own hyperplane)" + (
        f"; levels of granularity {est.levels_} (coarsest first)" if len(est.levels_) > 1 else "")}
    native: Dict[str, Any] = {}
    with run.timer.stage("dissect_eddp"):
        results["eddp"], det_train, det_val = _dissect_pairs(pairs, maps.train, maps.val, train, val, top_k=cfg.top_k,
                                                             progress=run.progress,
                                                             detector_names=[f"d{i}" for i in range(I)])
    for name, bp in base_pairs.items():
        with run.timer.stage(f"dissect_{name}"):
            with torch.no_grad():
                s_tr, s_va = bp.decision_function(maps.train), bp.decision_function(maps.val)
            thr = fit_thresholds_on_train(s_tr, train, tr_idx, quantile=cfg.quantile)
            results[name] = dissect(s_tr, train, tr_idx, va_idx, threshold=thr, val_maps=s_va,
                                    detector_names=[f"{name}{i}" for i in range(I)], **common)
            rules[name] = (f"component score > its top-{100 * (1 - cfg.quantile):.3g}% quantile over the train "
                           f"split (NetDissect rule, fit_thresholds_on_train(quantile={cfg.quantile}))")
            with torch.no_grad():
                d_tr, d_va = bp.detect(maps.train), bp.detect(maps.val)
            nres = dissect(d_tr, train, tr_idx, va_idx, threshold=0.5, val_maps=d_va,
                           val_dataset=val, top_k=0, progress=False)
            native[name] = {**_dissect_summary(nres), "rule": bp.meta.get("detection_rule", "detect > 0.5")}
            del s_tr, s_va, d_tr, d_va
    return _Dissection(results, rules, native, det_train, det_val)


def _influence_stages(run: _Run, model: _LoadedModel, data: _WorldData, maps: _LayerMaps, est,
                      diss: _Dissection) -> _Findings:
    """RCAV influence of the EDDP directions, the S³ table and (--shortcut) the watermark detector."""
    eddp_res = diss.results["eddp"]
    names = [f"d{i}:{lab}" if lab is not None else f"d{i}" for i, lab in enumerate(eddp_res.label_names())]
    with run.timer.stage("influence"):
        infl, control, doc = _influence(model.net, maps.head, model.layer, maps.val, data.val, est.pairs_, names,
                                        run.cfg, run.seed, run.progress)
    found = _Findings(est=est, names=names, influence=infl, influence_control=control, influence_doc=doc)
    if run.cfg.pattern_cav:
        with run.timer.stage("pattern_cav"):
            found.pattern_cav_doc = _pattern_cav(maps.train, maps.val, data.train, data.val, est.pairs_, eddp_res,
                                                 run.cfg)
    if run.shortcut:
        found.shortcut_info = _watermark_detector(data.train, diss.results, infl)
    return found


def _watermark_detector(train: _Materialized, results: Dict[str, Any], infl) -> Dict[str, Any]:
    """The EDDP detector of highest validation IoU with the watermark, its RCAV scores and the baselines' best."""
    eddp_res = results["eddp"]
    wm = train.concepts.index(next(c for c in train.concepts if c.name == "watermark"))
    iou = eddp_res.iou_val[:, wm]
    best = int(np.argmax(iou))
    return {"concept": "watermark", "detector": best, "iou_val": float(iou[best]),
            "iou_train": float(eddp_res.iou_train[best, wm]),
            "label": eddp_res.label_names()[best],
            "baselines_best_iou": {n: float(results[n].iou_val[:, wm].max()) for n in BASELINES},
            "rcav_scores": {c: (None if not np.isfinite(v) else float(v))
                            for c, v in zip(infl.class_names, infl.score[best])},
            "rcav_significant": {c: bool(v) for c, v in zip(infl.class_names, infl.significant[best])}}


def _layer_table(run: _Run, model: _LoadedModel, data: _WorldData, maps: _LayerMaps, diss: _Dissection,
                 found: _Findings, I: int) -> Dict[str, Any]:
    """The main layer's dissection summary and RCAV, then EDDP, dissection and RCAV at every extra layer."""
    from ..capture import capture, make_head
    eddp_res = diss.results["eddp"]
    train, val = data.train, data.val
    layers_doc = {model.layer: {**_dissect_summary(eddp_res), "category_counts": _category_counts(eddp_res),
                                "map_shape": maps.shape, "main": True,
                                "influence": _layer_influence(found.influence_doc)}}
    for extra in run.cfg.extra_layers:
        if extra == model.layer:
            continue
        with run.timer.stage(f"layer_{extra}"):
            e_tr = capture(model.net, extra, data.x_train, progress=run.progress)
            e_va = capture(model.net, extra, data.x_val, progress=run.progress)
            e_head = make_head(model.net, extra)
            e_pairs = _eddp(run.cfg, I, run.seed, run.progress).fit(e_tr, head=e_head).pairs_
            with _dissect_threads(run.cfg):
                e_res = _dissect_pairs(e_pairs, e_tr, e_va, train, val, top_k=0, progress=run.progress)[0]
            layers_doc[extra] = {**_dissect_summary(e_res), "category_counts": _category_counts(e_res),
                                 "map_shape": [int(x) for x in e_tr.shape[1:]], "main": False}
        if run.cfg.influence_extra_layers:
            with run.timer.stage(f"influence_{extra}"):
                e_names = [f"d{i}:{lab}" if lab is not None else f"d{i}" for i, lab in enumerate(e_res.label_names())]
                doc = _influence(model.net, e_head, extra, e_va, val, e_pairs, e_names, run.cfg, run.seed,
                                 run.progress)[2]
                layers_doc[extra]["influence"] = _layer_influence(doc)
        del e_tr, e_va
    return layers_doc


def _applications(run: _Run, out: Path, model: _LoadedModel, data: _WorldData, diss: _Dissection,
                  found: _Findings) -> None:
    """Save the named pairs, explain gallery images and (--shortcut) run the shortcut experiment."""
    found.pairs = found.est.pairs_.with_names(found.names).with_meta(layer=model.layer, model=model.model_id)
    found.pairs.save(out / "eddp_pairs")
    with run.timer.stage("explanations"):
        found.applications, found.applications_doc = _explanations(model.net, model.layer, found.pairs, data.val,
                                                                    data.x_val, run.cfg, run.shortcut)
    if run.shortcut:
        from .shortcut import run_shortcut_experiment
        with run.timer.stage("shortcut_experiment"):
            found.experiment = run_shortcut_experiment(seed=run.seed, progress=run.progress,
                                                       **dict(run.cfg.shortcut_experiment))
        am = found.experiment.get("activation_maximization")
        if am is not None:
            found.applications["actmax_images"] = am.pop("images", None)


def _results_doc(run: _Run, data: _WorldData, model: _LoadedModel, maps: _LayerMaps, diss: _Dissection,
                 found: _Findings, *, model_name: str, fast: bool, n_concepts: int) -> Dict[str, Any]:
    """The content of ``results.json`` (its timing is completed after the report)."""
    from .._io import versions
    from .results import RESULTS_SCHEMA
    eddp_res, est, train = diss.results["eddp"], found.est, data.train
    doc: Dict[str, Any] = {
        "dissection": {m: _dissect_summary(r) for m, r in diss.results.items()},
        "dissection_native_rules": diss.native,
        "detection_rules": diss.rules,
        "category_counts": {m: _category_counts(r) for m, r in diss.results.items()},
        "influence": found.influence_doc,
        "pattern_cav": found.pattern_cav_doc,
        "model": model.info,
        "eddp": {"n_concepts": n_concepts, "levels": est.levels_, "layer": model.layer, "map_shape": maps.shape,
                 "detectors": eddp_res.table(), "history_seconds": est.history_.get("seconds")},
        "data": {"world": "ConceptWorld", "n_train": len(train), "n_val": len(data.val), "seed": run.seed,
                 "n_concepts": len(train.concepts),
                 "watermark": None if data.watermark is None else data.watermark.to_dict(),
                 "class_names": train.class_names},
        "shortcut": found.shortcut_info,
        "efficientnet": found.effnet,
        "applications": found.applications_doc,
        "layers": found.layers_doc,
        "config": {**asdict(run.cfg), "n_concepts": n_concepts, "layer": model.layer, "fast": bool(fast),
                   "model": model_name},
        "schema": RESULTS_SCHEMA,
        "seed": run.seed,
        "versions": versions(),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "loadavg_start": run.load_start, "loadavg_end": None},
    }
    if found.experiment is not None:
        doc["correction"] = found.experiment["correction"]
        if found.experiment.get("activation_maximization") is not None:
            doc["activation_maximization"] = found.experiment["activation_maximization"]
        doc["shortcut_experiment"] = found.experiment["setup"]
    doc["timing"] = {**_timing(run), "loadavg_end": None}  # completed after the report
    return doc


def _write_demo_report(write_report, out: Path, result, data: _WorldData, diss: _Dissection,
                       found: _Findings, cfg: DemoConfig) -> None:
    wm_channel = None
    if result.shortcut is not None:
        wm_channel = [c.name for c in data.train.concepts].index("watermark")
    write_report(out / "report.html", result, diss.results, train=data.train, val=data.val,
                 detector_maps={"train": diss.det_train, "val": diss.det_val}, watermark_channel=wm_channel,
                 n_detectors=cfg.n_report_detectors, applications=found.applications)


# --------------------------------------------------------------------------- pretrained vs random
def compare_pretrained_random(n_train: int = 300, n_val: int = 150, *, block: str = "_blocks.8",
                              image_size: int = 128, quantile: float = 0.995, seed: int = 0,
                              n_concepts: Optional[int] = 64, levels: Any = "auto",
                              progress: bool = False) -> Dict[str, Any]:
    """Dissect EfficientNet-Lite0 (ImageNet weights) and a random-init copy: units and EDDP directions.

    Network Dissection on concept-world images of (1) the units (channels) of one block, with the
    NetDissect top-quantile rule, and (2) ``n_concepts`` EDDP direction pairs fitted at that block
    with the rest of the network as the head (their own rule); per-category counts of
    interpretable detectors for each. Random networks detect colours well (colour is a linear
    read-out of the input that survives random convolutions), so the comparison is only meaningful
    per category.

    Parameters
    ----------
    n_train, n_val : images of the world's train/val splits (labels from train, scores on val).
    block : dotted layer name of ``efficientnet-lite0`` (default ``"_blocks.8"``, 112 channels, 8 x 8 maps at 128 px).
    image_size : world images (64 px) are resized bilinearly to this side (no crop, so masks align).
    quantile : the NetDissect top-quantile detection rule.
    n_concepts, levels : EDDP on each network (``n_concepts=None`` skips it).

    Returns
    -------
    dict
        ``{"available": False, "reason": ...}`` when the optional packages are missing, else
        ``{"available": True, "block", "image_size", "n_units", "pretrained": {...}, "random": {...}}``
        with each side's dissection summary and ``category_counts`` (units), and ``"eddp"`` inside each
        side with the same for the EDDP directions.

    Examples
    --------
    >>> table = compare_pretrained_random(n_train=40, n_val=20)  # doctest: +SKIP
    >>> table["pretrained"]["category_counts"]  # doctest: +SKIP
    """
    from ..capture import capture
    from ..data.world import ConceptWorld
    from ..models import load_model

    try:
        pre_model, pre, _ = load_model("efficientnet-lite0", image_size=image_size)
    except ValidationError as exc:
        logger.warning("skipping the EfficientNet-Lite0 comparison: %s", exc)
        return {"available": False, "reason": str(exc)}
    rand_model, _, _ = load_model("efficientnet-lite0", image_size=image_size, pretrained=False)
    rand_model = _reinit(rand_model, seed)
    train = _Materialized(ConceptWorld(n_train, split="train", seed=seed), progress, "world train split")
    val = _Materialized(ConceptWorld(n_val, split="val", seed=seed), progress, "world val split")
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)

    def prep(ds):
        x = torch.nn.functional.interpolate(ds.images_tensor(), size=(image_size, image_size), mode="bilinear",
                                            align_corners=False, antialias=False)
        return (x - mean) / std

    xt, xv = prep(train), prep(val)
    out: Dict[str, Any] = {"available": True, "block": block, "image_size": image_size, "quantile": quantile,
                           "n_train": n_train, "n_val": n_val,
                           "rule": f"channel value > its top-{100 * (1 - quantile):.3g}% train quantile"}
    for key, net in (("pretrained", pre_model), ("random", rand_model)):
        mt = capture(net, block, xt, progress=progress)
        mv = capture(net, block, xv, progress=progress)
        out["n_units"] = int(mt.shape[1])
        out["map_size"] = [int(mt.shape[2]), int(mt.shape[3])]
        out[key] = _dissect_units_and_eddp(net, block, mt, mv, train, val, quantile=quantile, n_concepts=n_concepts,
                                           levels=levels, seed=seed, progress=progress)
    return out


def _dissect_units_and_eddp(net, block: str, mt: torch.Tensor, mv: torch.Tensor, train: _Materialized,
                            val: _Materialized, *, quantile: float, n_concepts: Optional[int], levels: Any,
                            seed: int, progress: bool) -> Dict[str, Any]:
    """One side of :func:`compare_pretrained_random`: dissect the block's units, then (optionally) EDDP's pairs."""
    from ..capture import make_head
    from ..directions import EDDP
    from ..evaluate.dissection import dissect, fit_thresholds_on_train
    tr_idx, va_idx = list(range(len(train))), list(range(len(val)))
    thr = fit_thresholds_on_train(mt, train, tr_idx, quantile=quantile)
    res = dissect(mt, train, tr_idx, va_idx, threshold=thr, val_dataset=val, val_maps=mv, top_k=0,
                  progress=progress)
    side = {**_dissect_summary(res), "category_counts": _category_counts(res)}
    if n_concepts:
        est = EDDP(n_concepts=n_concepts, levels=levels, n_init=4, init_rounds=3, random_state=seed,
                   progress=progress).fit(mt, head=make_head(net, block))
        e_res = _dissect_pairs(est.pairs_, mt, mv, train, val, top_k=0, progress=progress)[0]
        side["eddp"] = {**_dissect_summary(e_res), "category_counts": _category_counts(e_res),
                        "n_concepts": int(n_concepts), "levels": est.levels_}
    return side


def _reinit(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter from PyTorch's default initialisation with a local seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
    model.eval()
    return model
