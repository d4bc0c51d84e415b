"""The synthetic recovery benchmark (method.md §6): EDDP and the baselines against planted truth.

For each seed: build the data (the paper's recipe or the harder setting), train the head f⁺
(average pool → linear), fit every method, score it with :func:`~unveil.evaluate.recovery.score_pairs`.
:func:`run_synthetic_benchmark` returns a JSON-serialisable dict (every per-seed number, the seeds,
versions, head accuracies, and a mean/worst summary per method); :func:`format_table` renders it.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._errors import ValidationError
from .._progress import progress
from .._validation import check_positive_int
from ..evaluate.recovery import score_pairs

__all__ = ["METHODS", "DEFAULT_METHODS", "run_synthetic_benchmark", "format_table", "summarize"]

log = logging.getLogger("unveil")

SETTINGS = ("paper", "hard", "scale")
# the scale setting: D = 512, I concepts (32 or 64), I/2 distractors, correlated mixed-sign directions,
# noise in every component, >= 500k patches (4 per image, I classes); ``fast`` shrinks it to a smoke test
SCALE_DIM = 512
SCALE_PATCHES = 500_000


def _baselines():
    from ..directions import baselines as b
    return b


def _make(name: str, n_concepts: int, seed: int, fast: bool):
    """A fresh estimator for ``name`` and how to call its ``fit`` (``"X"``, ``"X+labels"``, ``"X+head"``)."""
    b = _baselines()
    ae_epochs = 40 if fast else 200
    n_init = 3 if fast else 10
    if name == "eddp":
        from ..directions.eddp import EDDP  # raises ImportError until it exists
        return EDDP(n_concepts=n_concepts, random_state=seed), "X+head"
    if name == "eddp-init":
        from ..directions.eddp import EDDP
        return EDDP(n_concepts=n_concepts, random_state=seed, steps={"b": 0, "d": 0}), "X"
    if name == "pca":
        return b.PCABaseline(n_concepts, random_state=seed), "X"
    if name == "ica":
        return b.ICABaseline(n_concepts, random_state=seed), "X"
    if name == "nmf":
        return b.NMFBaseline(n_concepts, random_state=seed), "X"
    if name == "kmeans":
        return b.KMeansBaseline(n_concepts, random_state=seed, n_init=n_init), "X"
    if name == "spherical-kmeans":
        return b.SphericalKMeansBaseline(n_concepts, random_state=seed, n_init=n_init), "X"
    if name == "ae":
        return b.SparseAutoencoder(n_concepts, l1=0.0, epochs=ae_epochs, random_state=seed), "X"
    if name.startswith("sae-"):
        return b.SparseAutoencoder(n_concepts, l1=float(name[4:]), epochs=ae_epochs, random_state=seed), "X"
    if name == "pattern-cav":
        return b.PatternCAV(n_concepts, random_state=seed), "X+labels"
    if name == "supervised":
        return SupervisedCeiling(n_concepts), "X+labels"
    raise ValidationError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")


METHODS: Dict[str, str] = {
    "eddp": "encoding-decoding direction pairs (unveil.EDDP, with the head's URA term)",
    "eddp-init": "EDDP's initialisation alone (no refinement with the paper's losses, no head)",
    "pca": "PCA (scikit-learn)",
    "ica": "FastICA (scikit-learn)",
    "nmf": "NMF (scikit-learn)",
    "kmeans": "k-means (scikit-learn)",
    "spherical-kmeans": "spherical k-means of centred patches",
    "ae": "autoencoder, L1 = 0",
    "sae-0.001": "sparse autoencoder, L1 = 0.001",
    "sae-0.01": "sparse autoencoder, L1 = 0.01",
    "sae-0.1": "sparse autoencoder, L1 = 0.1",
    "pattern-cav": "Pattern-CAV (supervised: true patch labels)",
    "supervised": "supervised ceiling: per concept a logistic regression on the true patch labels",
}
DEFAULT_METHODS: List[str] = list(METHODS)

# metric name in the summary -> (getter on a report dict, "higher" or "lower" is better)
_SUMMARY = {
    "mean_iou": (lambda r: r["mean_iou"], "higher"),
    "off_diagonal_iou": (lambda r: r["off_diagonal_iou"], "lower"),
    "rmse": (lambda r: r["rmse_overall"], "lower"),
    "encoder_cosine": (lambda r: r["mean_encoder_cosine"], "higher"),
    "decoder_cosine": (lambda r: r["mean_decoder_cosine"], "higher"),
    "fit_seconds": (lambda r: r["fit_seconds"], "lower"),
}


def _make_data(setting: str, seed: int, fast: bool, n_concepts: int = 32, patches: int = SCALE_PATCHES):
    from ..data.synthetic import make_hard_synthetic, make_synthetic
    if setting == "paper":
        return make_synthetic(random_state=seed, **({"n_per_class": 150} if fast else {}))
    if setting == "scale":
        per_class = 8 if fast else math.ceil(patches / (4 * n_concepts))
        return make_hard_synthetic(dim=64 if fast else SCALE_DIM, n_concepts=n_concepts,
                                   n_distractors=max(1, n_concepts // 2), n_classes=n_concepts, patches=4,
                                   n_per_class=per_class, random_state=seed)
    return make_hard_synthetic(random_state=seed, **({"n_per_class": 60} if fast else {}))


class SupervisedCeiling:
    """A reference, not a competitor: per concept a one-vs-rest logistic regression (class-balanced,
    weak L2) on the *true* patch labels, in the isotropically scaled space ``(x − μ)/σ``, its bias then
    set where its positives best match the concept's patches (largest IoU, as EDDP's initialisation
    does with its groups); detection ``σ(wᵀx − b) > 0.5`` as for EDDP; encoders by the paper's
    positive-only pattern estimator (method.md §3; every positive counts 1, EDDP's
    ``shared_positives="full"``). With the class-balanced bias alone a concept holding 1/64 of the
    patches gets about as many false positives as true ones (scale setting: IoU 0.77 against 0.92).
    """

    def __init__(self, n_concepts: int, max_patches: int = 200_000, steps: int = 100):
        self.n_concepts = n_concepts
        self.max_patches = max_patches
        self.steps = steps

    def fit(self, X, labels):
        import torch

        from ..directions.eddp._source import _TensorSource
        from ..directions.eddp.initialisation import _fit_margin_classifiers
        from ..directions.eddp import EDDP
        from ..directions.pairs import DirectionPairs
        x = X.permute(0, 2, 3, 1).reshape(-1, X.shape[1]).double()
        lab = labels.reshape(-1).long()
        if x.shape[0] > self.max_patches:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: self.max_patches]
            x, lab = x[idx], lab[idx]
        mu = x.mean(0)
        sigma = float(((x - mu) ** 2).sum(1).mean().sqrt()) / math.sqrt(x.shape[1])
        Wz, bz = _fit_margin_classifiers(((x - mu) / sigma).float(), lab, self.n_concepts, steps=self.steps,
                                         l2=1e-6)
        W = Wz.double() / sigma
        b = bz.double() + W @ mu
        S = EDDP._pattern(_TensorSource(X), W, b, 256, X.device)
        S = S / S.norm(dim=1, keepdim=True).clamp_min(1e-30)
        self.pairs_ = DirectionPairs(W.float(), b.float(), S.float(), X.mean(dim=(0, 2, 3)).float(),
                                     meta={"method": "supervised-ceiling",
                                           "detection_rule": "sigmoid(w^T x - b) > 0.5"})
        return self


def _fit(est, how: str, data, head):
    if how == "X":
        return est.fit(data.X)
    if how == "X+labels":
        return est.fit(data.X, data.concept[:, None, :])
    return est.fit(data.X, head=head)


def summarize(per_seed: List[dict]) -> dict:
    """Mean and worst (over seeds) of each summary metric, from the per-seed report dicts.

    Per-concept matched IoU is summarised too (``iou_per_concept``: mean and worst per concept).
    Seeds whose run failed (``"error"`` present) are left out; ``n_seeds`` counts the others.
    """
    ok = [r for r in per_seed if "error" not in r]
    out: dict = {"n_seeds": len(ok), "n_failed": len(per_seed) - len(ok)}
    if not ok:
        return out
    for key, (get, better) in _SUMMARY.items():
        vals = np.array([np.nan if get(r) is None else get(r) for r in ok], dtype=np.float64)
        if np.isnan(vals).all():
            out[key] = {"mean": None, "worst": None}
            continue
        worst = np.nanmin(vals) if better == "higher" else np.nanmax(vals)
        out[key] = {"mean": float(np.nanmean(vals)), "worst": float(worst)}
    ious = np.array([r["matched_iou"] for r in ok], dtype=np.float64)  # (seeds, I)
    out["iou_per_concept"] = {"mean": ious.mean(0).tolist(), "worst": ious.min(0).tolist()}
    return out


def run_synthetic_benchmark(seeds: Sequence[int] = (0, 1, 2, 3, 4), setting: str = "paper",
                            methods: Optional[Sequence[str]] = None, fast: bool = False,
                            head_epochs: Optional[int] = None, show_progress: bool = False,
                            n_concepts: int = 32, scale_patches: int = SCALE_PATCHES,
                            on_result: Optional[Callable[[str, int, dict], None]] = None) -> dict:
    """Fit EDDP and the baselines on synthetic data for each seed and score them against the truth.

    Parameters
    ----------
    seeds : sequence of int
        One data set (and one fit of every method) per seed.
    setting : {"paper", "hard"}
        ``"paper"``: :func:`~unveil.data.synthetic.make_synthetic` (method.md §6);
        ``"hard"``: :func:`~unveil.data.synthetic.make_hard_synthetic`; ``"scale"``: D = 512,
        ``n_concepts`` concepts and as many classes, ``n_concepts // 2`` distractors, correlated
        mixed-sign directions, noise in every component, >= 500k patches (4 per image).
    methods : sequence of str, optional
        Names from :data:`METHODS` (default: all). ``"eddp"`` is skipped with a warning when
        ``unveil.EDDP`` is not available.
    fast : bool
        Fewer images (150 per class for "paper", 60 for "hard"), 200 head epochs, 40 autoencoder
        epochs and 3 k-means restarts: a smoke test, not a measurement.
    n_concepts : int
        Concepts planted in the ``"scale"`` setting (32 or 64 in our runs); ignored otherwise.
    scale_patches : int
        Patches of the ``"scale"`` setting (default 500k); ignored otherwise.
    head_epochs : int, optional
        Epochs of the head's training (default 2000, the paper's; 200 with ``fast``).
    show_progress : bool
        A tqdm bar over (seed, method).
    on_result : callable, optional
        Called as ``on_result(method, seed, record)`` after each fit (e.g. for logging).

    Returns
    -------
    dict with ``setting``, ``seeds``, ``fast``, ``versions``, ``heads`` (per seed: head accuracy and
    the data's size and generation parameters),
    ``methods`` (per method: description, detection rule, ``per_seed`` records, ``summary``) and
    ``skipped`` (method -> reason).

    Examples
    --------
    A smoke run (seconds; the numbers of a full run come from ``unveil synthetic``)::

        res = run_synthetic_benchmark(seeds=[0], methods=["pca", "pattern-cav"], fast=True)
        print(format_table(res))
        res["methods"]["pca"]["summary"]["mean_iou"]   # {"mean": ..., "worst": ...}
    """
    from .._io import versions
    from ..data.synthetic import train_head

    seeds, methods, skipped = _checked_arguments(seeds, setting, methods)
    if head_epochs is None:
        head_epochs = 200 if fast else 2000
    results = {m: {"description": METHODS[m], "per_seed": []} for m in methods}
    heads = []
    bar = progress(total=len(seeds) * len(methods), enabled=show_progress, desc=f"synthetic ({setting})")
    try:
        for seed in seeds:
            data = _make_data(setting, seed, fast, n_concepts=check_positive_int(n_concepts, "n_concepts"),
                              patches=check_positive_int(scale_patches, "scale_patches"))
            t0 = time.perf_counter()
            head, acc = train_head(data, epochs=head_epochs, random_state=seed)
            heads.append(_head_record(data, seed, acc, head_epochs, time.perf_counter() - t0))
            log.info("seed %d: %d images, %d concepts, head accuracy %.4f", seed, data.X.shape[0],
                     data.n_concepts, acc)
            for name in methods:
                bar.set_postfix_str(f"seed {seed} {name}")
                rec = _fit_and_score(name, data, head, seed, fast, results[name])
                results[name]["per_seed"].append(rec)
                if on_result is not None:
                    on_result(name, seed, rec)
                bar.update(1)
    finally:
        bar.close()
    for name in methods:
        results[name]["summary"] = summarize(results[name]["per_seed"])
    return _finite({"benchmark": "synthetic", "setting": setting, "seeds": seeds, "fast": bool(fast),
                    "versions": versions(), "heads": heads, "methods": results, "skipped": skipped,
                    "scoring": dict(_SCORING)})


_SCORING = {
    "iou": "detector positives (detect > 0.5) vs concept patches, Hungarian matching maximising IoU",
    "encoder_cosine": "|cos| of matched encoder with the true S row (absolute for every method)",
    "decoder_cosine": "|cos| of matched decoder with the ideal filter row of pinv([S | Dist])",
    "rmse": "RMSE of mean-centred signal values read along unit-norm encoders vs true centred alpha",
    "rmse_raw_overall": "same, with the encoders exactly as the method gives them",
    "worst": "min over seeds for IoU/cosines, max for RMSE/off-diagonal/seconds"}


def _checked_arguments(seeds, setting, methods) -> Tuple[List[int], List[str], Dict[str, str]]:
    """Seeds as ints, the methods to run (eddp left out when unavailable) and the skipped ones with why."""
    if setting not in SETTINGS:
        raise ValidationError(f"setting must be one of {SETTINGS}, got {setting!r}.")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValidationError("seeds is empty; pass at least one seed (e.g. 0 1 2 3 4).")
    if len(set(seeds)) != len(seeds):
        raise ValidationError(f"seeds must be distinct, got {seeds}.")
    methods = list(DEFAULT_METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValidationError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if not methods:
        raise ValidationError("methods is empty; name at least one method.")
    skipped: Dict[str, str] = {}
    if "eddp" in methods:
        try:
            from ..directions.eddp import EDDP  # noqa: F401
        except ImportError as exc:
            log.warning("skipping eddp: unveil.EDDP is not available (%s)", exc)
            skipped["eddp"] = f"not available: {exc}"
            methods.remove("eddp")
    return seeds, methods, skipped


def _head_record(data, seed: int, acc: float, epochs: int, seconds: float) -> dict:
    """One seed's entry of ``heads``: the head's accuracy and the data's size and generation parameters."""
    return {"seed": seed, "accuracy": acc, "epochs": epochs, "seconds": seconds,
            "data": {"n_images": int(data.X.shape[0]), "n_features": int(data.X.shape[1]),
                     "patches": int(data.X.shape[2] * data.X.shape[3]),
                     "n_concepts": data.n_concepts, "n_distractors": int(data.Dist.shape[0]),
                     "n_classes": data.n_classes, "noise": float(data.noise),
                     **{k: v for k, v in data.info.items() if k != "random_state"}}}


def _fit_and_score(name: str, data, head, seed: int, fast: bool, method_doc: dict) -> dict:
    """Fit one method on one seed's data and score it; a failure is recorded, not raised.

    Sets the method's ``detection_rule`` in ``method_doc`` on its first success.
    """
    rec = {"seed": seed}
    try:
        est, how = _make(name, data.n_concepts, seed, fast)
        t = time.perf_counter()
        _fit(est, how, data, head)
        rec["fit_seconds"] = time.perf_counter() - t
        pairs = est.pairs_
        rec.update(score_pairs(pairs, data).to_dict())
        meta = pairs.meta or {}
        method_doc.setdefault("detection_rule", meta.get("detection_rule", "sigmoid(w^T x - b) > 0.5"))
        rec["meta"] = {k: v for k, v in meta.items() if k != "detection_rule"}
    except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' numbers
        log.warning("%s failed on seed %d: %s: %s", name, seed, type(exc).__name__, exc)
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


def _finite(obj):
    """Replace NaN/inf floats by None, so the result is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fmt(v, nd=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}"


def ceiling_fractions(method: dict, ceiling: Dict[int, float]) -> List[float]:
    """Per seed, a method's mean matched IoU as a fraction of the supervised ceiling's on the same data."""
    return [r["mean_iou"] / ceiling[r["seed"]] for r in method.get("per_seed", [])
            if r.get("mean_iou") is not None and r["seed"] in ceiling]


def _ceiling_fraction(method: dict, ceiling: Dict[int, float]) -> str:
    f = ceiling_fractions(method, ceiling)
    return f"{_fmt(float(np.mean(f)))} ({_fmt(min(f))})" if f else "-"


def format_table(result: dict) -> str:
    """A plain-text table of a :func:`run_synthetic_benchmark` result (mean over seeds, worst in brackets).

    Matched IoU is shown per concept when there are at most 4 concepts, else as the mean.
    """
    methods = result["methods"]
    n_conc = None
    for m in methods.values():
        s = m.get("summary", {})
        if "iou_per_concept" in s:
            n_conc = len(s["iou_per_concept"]["mean"])
            break
    per_concept = n_conc is not None and n_conc <= 4
    head = ["method"]
    head += [f"IoU c{i}" for i in range(n_conc)] if per_concept else ["IoU"]
    ceiling = {r["seed"]: r["mean_iou"] for r in methods.get("supervised", {}).get("per_seed", [])
               if r.get("mean_iou")}
    if ceiling:
        head.append("IoU/ceiling")
    head += ["off-diag", "RMSE", "enc cos", "dec cos", "fit s"]
    rows = []
    for name, m in methods.items():
        s = m.get("summary", {})
        if not s.get("n_seeds"):
            rows.append([name] + ["failed"] + [""] * (len(head) - 2))
            continue
        def mw(key, nd=3):
            return f"{_fmt(s[key]['mean'], nd)} ({_fmt(s[key]['worst'], nd)})"
        row = [name]
        if per_concept:
            ipc = s["iou_per_concept"]
            row += [f"{_fmt(a)} ({_fmt(w)})" for a, w in zip(ipc["mean"], ipc["worst"])]
        else:
            row.append(mw("mean_iou"))
        if ceiling:
            row.append(_ceiling_fraction(m, ceiling))
        row += [mw("off_diagonal_iou"), mw("rmse"), mw("encoder_cosine"), mw("decoder_cosine"),
                _fmt(s["fit_seconds"]["mean"], 2)]
        if s.get("n_failed"):
            row[0] += f" [{s['n_failed']} failed]"
        rows.append(row)
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    accs = [h["accuracy"] for h in result.get("heads", [])]
    title = (f"synthetic benchmark, setting={result['setting']}, seeds={result['seeds']}"
             + (" (fast)" if result.get("fast") else "")
             + (f", head accuracy {min(accs):.4f}-{max(accs):.4f}" if accs else ""))
    out = [title, "mean over seeds (worst seed in brackets)", line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    for name, why in result.get("skipped", {}).items():
        out.append(f"skipped {name}: {why}")
    return "\n".join(out)
