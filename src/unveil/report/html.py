"""The self-contained HTML report (inline CSS, images as base64 PNG, no external URL).

Every piece of text that comes from data (concept, class, detector, method and file names, rules)
goes through :func:`html.escape`; figures are rendered to PNG and inlined as ``data:`` URIs.
"""
from __future__ import annotations

import base64
import html
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .._errors import ValidationError
from ..experiments.results import DemoResults
from . import figures as fg

__all__ = ["build_report", "write_report"]

logger = logging.getLogger("unveil")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2433}
main{max-width:1280px;margin:0 auto;padding:18px 28px 40px}
h1{font-size:1.6em;margin:.3em 0 .1em} h2{font-size:1.25em;margin:1.6em 0 .5em;border-bottom:2px solid #d5dae3;padding-bottom:.2em}
h3{font-size:1.02em;margin:.9em 0 .3em}
p,li{line-height:1.45;font-size:.93em} .muted{color:#5b6477;font-size:.86em}
table{border-collapse:collapse;margin:.4em 0 .8em;font-size:.86em;background:#fff}
th,td{border:1px solid #d5dae3;padding:3px 8px;text-align:right} th{background:#eef1f6}
td.l,th.l{text-align:left} tr.best td{font-weight:600;background:#eef8ee}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d5dae3;border-radius:6px;padding:6px 8px;max-width:100%}
.card .t{font-size:.84em;margin-bottom:4px} .card img{display:block;max-width:100%;image-rendering:pixelated}
.tag{display:inline-block;padding:0 6px;border-radius:8px;background:#e4e9f2;font-size:.8em;margin-left:4px}
.fig{background:#fff;border:1px solid #d5dae3;border-radius:6px;padding:8px;display:inline-block;max-width:100%}
.fig img{max-width:100%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;font-size:.88em;margin:.6em 0}
.grid2{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
code{background:#eef1f6;padding:0 3px;border-radius:3px;font-size:.9em}
"""

_CATEGORY_ORDER = ("color", "texture", "material", "object", "part", "shortcut")
_SUMMARY_KEYS = ("S1", "S2", "n_interpretable", "n_distinct", "mPrecision", "mRecall", "mAP", "mF1")
_METHOD_NAMES = {"eddp": "EDDP", "pca": "PCA", "ica": "FastICA", "nmf": "NMF", "kmeans": "k-means",
                 "sae": "sparse autoencoder"}


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes, alt: str, width: Optional[int] = None) -> str:
    w = f' width="{int(width)}"' if width else ""
    return (f'<img alt="{_e(alt)}"{w} src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    if not math.isfinite(f):
        return "–"
    return f"{f:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left=1, highlight: Optional[int] = None) -> str:
    """An HTML table; ``left`` = number of leading left-aligned columns, or a set of column indices."""
    lefts = set(range(left)) if isinstance(left, int) else set(left)
    th = "".join(f'<th class="{"l" if j in lefts else ""}">{_e(h)}</th>' for j, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cls = ' class="best"' if highlight is not None and r == highlight else ""
        tds = "".join(f'<td class="{"l" if j in lefts else ""}">{v if isinstance(v, _Raw) else _fmt(v)}</td>'
                      for j, v in enumerate(row))
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _txt(x) -> _Raw:
    return _Raw(_e(x))


# --------------------------------------------------------------------------- sections
def _header(results: DemoResults, title: str) -> str:
    model, data, cfg = results.model, results.data, results.config
    parts = [f"<h1>{_e(title)}</h1>"]
    line = [f"model <b>{_e(model.name)}</b>, layer <b>{_e(model.layer)}</b>",
            f"accuracy {_fmt(model.test_acc)} on {_e(model.test_acc_split)}",
            f"concept world: {_e(data.n_train)} train / {_e(data.n_val)} val images, "
            f"{_e(data.n_concepts)} concepts, seed {_e(data.seed)}"]
    if cfg.n_concepts:
        line.append(f"{_e(cfg.n_concepts)} directions per method")
    if cfg.fast:
        line.append("<b>--fast</b> (a smoke test, not a measurement)")
    parts.append(f'<p class="muted">{" · ".join(line)}</p>')
    return "\n".join(parts)


def _best(table: Mapping[str, Any], key: str) -> str:
    """The method(s) of the highest ``key`` (a :class:`DissectionSummary` field) in ``table``."""
    vals = {m: float(getattr(v, key)) for m, v in table.items()}
    vals = {m: v for m, v in vals.items() if math.isfinite(v)}
    if not vals:
        return "–"
    top = max(vals.values())
    winners = [m for m, v in vals.items() if v >= top - 1e-12]
    return " and ".join(_e(_METHOD_NAMES.get(m, m)) for m in winners) + f" ({_fmt(top, 2 if key in ('S1', 'S2', 'mF1') else 0)})"


def _categories(seen) -> tuple:
    """The five Broden categories (always, zeros included) in their usual order, then any other seen."""
    seen = set(seen)
    return tuple(c for c in _CATEGORY_ORDER if c in seen or c != "shortcut") + tuple(sorted(seen - set(_CATEGORY_ORDER)))


def _comparison(results: DemoResults) -> str:
    diss = results.dissection
    if not diss:
        return ""
    rules = results.detection_rules
    native = results.dissection_native_rules
    methods = list(diss)
    s1 = [float(diss[m].S1) for m in methods]
    best = int(np.argmax(s1)) if s1 else None
    rows = [[_txt(_METHOD_NAMES.get(m, m))] + [getattr(diss[m], k) for k in _SUMMARY_KEYS] for m in methods]
    out = ["<h2>EDDP vs baselines (Network Dissection)</h2>",
           "<p>Detectors are labelled with the concept of highest IoU on the train split and scored on the "
           "validation split (docs/method.md §7). S1 = Σ IoU over detectors; S2 = Σ over distinct labels of the best "
           "IoU; a detector is interpretable at IoU ≥ 0.04; n_distinct = distinct labels among interpretable "
           "detectors; mPrecision/mRecall/mAP/mF1 are means over all detectors (pixel level, against each "
           "detector's label). Every detection rule is label-free (listed below).</p>"]
    keys = ("S1", "S2", "n_distinct", "mF1")
    verdict = ["<li>Baselines with the NetDissect top-quantile rule: highest "
               + "; ".join(f"{k} {_best(diss, k)}" for k in keys) + ".</li>"]
    if native:
        both = {"eddp": diss["eddp"], **native} if "eddp" in diss else dict(native)
        verdict.append("<li>Baselines with their own rule: highest "
                       + "; ".join(f"{k} {_best(both, k)}" for k in keys) + ".</li>")
    share = f"{100 * (1 - float(results.config.quantile)):.3g} %"
    out.append('<div class="note"><b>Which method wins depends on the baselines\' detection rule.</b><ul>'
               + "".join(verdict) + f"</ul>The top-quantile rule lets a component fire on only {_e(share)} of "
               "the map cells of the train split, which caps its IoU with large concepts (sky, grass, walls); the "
               "Otsu rules fire on far more. EDDP's rule is the same in both tables." + _duplicates_note(native)
               + "</div>")
    out.append("<h3>A. Baselines with the NetDissect top-quantile rule</h3>")
    out.append(_table(("method",) + _SUMMARY_KEYS, rows, highlight=best))
    if native:
        rows_b = ([[_txt("EDDP")] + [getattr(diss["eddp"], k) for k in _SUMMARY_KEYS] + [_txt(rules.get("eddp", ""))]]
                  if "eddp" in diss else [])
        rows_b += [[_txt(_METHOD_NAMES.get(m, m))] + [getattr(native[m], k) for k in _SUMMARY_KEYS]
                   + [_txt(native[m].rule)] for m in native]
        out.append("<h3>B. Baselines with their own label-free rule</h3>")
        out.append(_table(("method",) + _SUMMARY_KEYS + ("rule",), rows_b, left={0, len(_SUMMARY_KEYS) + 1}))
    try:
        fig = fg.new_figure(figsize=(9.5, 2.7))
        for j, key in enumerate(("S1", "S2", "n_distinct")):
            ax = fig.add_subplot(1, 3, j + 1)
            table = {_METHOD_NAMES.get(m, m): {"A: top-quantile": getattr(diss[m], key),
                                               "B: own rule": getattr(native.get(m, diss[m]) if m != "eddp" else diss[m], key)}
                     for m in methods}
            fg.plot_method_comparison(table, ("A: top-quantile", "B: own rule") if native else ("A: top-quantile",), ax=ax)
            ax.set_title(key, fontsize=9)
            ax.tick_params(axis="x", labelrotation=35)
            if j:
                ax.get_legend().remove()
        fig.tight_layout()
        out.append(f'<div class="fig">{_img(fg.figure_png(fig), "S1, S2 and distinct concepts per method under both rules")}</div>')
    except Exception as exc:  # noqa: BLE001 - a figure failure must not lose the report
        logger.warning("report: comparison figure failed: %s", exc)
    if rules:
        out.append("<h3>Detection rules</h3><ul>")
        for m in methods:
            if m in rules:
                own = f" Own rule (table B): {_e(native[m].rule)}." if m in native and native[m].rule else ""
                out.append(f"<li><b>{_e(_METHOD_NAMES.get(m, m))}</b>: {_e(rules[m])}.{own}</li>")
        out.append("</ul>")
    cats = results.category_counts
    if cats:
        allc = _categories(c for m in cats for c in cats[m])
        rows = [[_txt(_METHOD_NAMES.get(m, m))] + [cats[m].get(c, 0) for c in allc] for m in cats]
        out.append("<h3>Interpretable detectors per concept category (table A)</h3>")
        out.append(_table(("method",) + tuple(allc), rows))
    return "\n".join(out)


def _sample(ds, split_ds: Mapping[str, Any], split: str, index: int):
    d = split_ds.get(split)
    if d is None:
        d = ds
    return d[int(index)]


def _detector_cards(res, split_ds, detector_maps, n_detectors: int, top_k: int) -> str:
    order = np.lexsort((-res.val_iou, ~res.interpretable))  # interpretable first, then by validation IoU
    chosen = [int(i) for i in order[:n_detectors]]
    labels = res.label_names()
    cats = [res.concept_categories[c] if c >= 0 else None for c in res.labels]
    cards = []
    for i in chosen:
        tops = res.top_activations(i, top_k)
        images, maps, boxes = [], [], []
        for t in tops:
            s = _sample(None, split_ds, t["split"], t["index"])
            images.append(np.asarray(s.image))
            maps.append(np.asarray(detector_maps[t["split"]][t["index"], i]))
            boxes.append(t["box"])
        mont = fg.detector_montage(images, maps, boxes=boxes)
        lab = labels[i] if labels[i] is not None else "no label"
        tag = f'<span class="tag">{_e(cats[i])}</span>' if cats[i] else ""
        flag = "" if res.interpretable[i] else ' <span class="tag">not interpretable</span>'
        cards.append(
            f'<div class="card"><div class="t"><b>{_e(res.detector_names[i])}</b> → <b>{_e(lab)}</b>{tag}{flag} · '
            f'IoU val {_fmt(res.val_iou[i])} (train {_fmt(res.train_iou[i])}) · P {_fmt(res.precision[i], 2)} '
            f'R {_fmt(res.recall[i], 2)}</div>{_img(fg.png_bytes(mont), f"top activations of {res.detector_names[i]}")}</div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def _eddp_section(res, split_ds, detector_maps, n_detectors: int) -> str:
    if detector_maps is None or not split_ds:
        return ""
    top_k = int(res.top_indices.shape[1]) if res.top_indices.ndim == 2 else 0
    out = [f"<h2>EDDP detectors (the {min(n_detectors, res.n_detectors)} most interpretable of {res.n_detectors})</h2>",
           "<p>Per detector: the images where it responds most (over train and validation images). Outside the "
           "detector's mask (σ(wᵀx − b) &gt; 0.5, upsampled bilinearly) the image is dimmed; the mask is outlined "
           "in magenta, the map cell of the maximum in yellow. Label = the concept with the highest train IoU.</p>"]
    if top_k == 0:
        out.append('<p class="muted">(no top activations were recorded)</p>')
        return "\n".join(out)
    out.append(_detector_cards(res, split_ds, detector_maps, n_detectors, top_k))
    return "\n".join(out)


def _heatmaps_section(res, ds, maps, n_images: int, per_image: int = 4) -> str:
    if ds is None or maps is None or len(ds) == 0:
        return ""
    n_images = min(n_images, len(ds))
    idx = np.linspace(0, len(ds) - 1, n_images).round().astype(int)
    labels = res.label_names()
    candidates = np.flatnonzero(res.interpretable) if res.interpretable.any() else np.arange(res.n_detectors)
    per_image = max(1, min(per_image, len(candidates)))
    fig = fg.new_figure(figsize=(1.75 * (1 + per_image), 1.9 * n_images))
    axes = fig.subplots(n_images, 1 + per_image, squeeze=False)
    class_names = getattr(ds, "class_names", None)
    for r, n in enumerate(idx):
        s = ds[int(n)]
        m = np.asarray(maps[int(n)])
        # the detectors that fire on the largest area of this image
        area = (m[candidates] > 0.5).mean(axis=(1, 2))
        strength = m[candidates].max(axis=(1, 2))
        pick = candidates[np.lexsort((-strength, -area))[:per_image]]
        titles = [f"{res.detector_names[i]}: {labels[i] or 'no label'}" for i in pick]
        fg.plot_detector_heatmaps(np.asarray(s.image), [m[i] for i in pick], titles, axes=axes[r])
        if class_names is not None and 0 <= s.label < len(class_names):
            axes[r][0].set_title(fg.safe_text(f"val #{n}: {class_names[s.label]}"), fontsize=7)
        for ax in axes[r][1 + len(pick):]:
            ax.set_axis_off()
    fig.tight_layout()
    return ("<h2>Detector heatmaps on validation images</h2>"
            "<p>For a few validation images: the interpretable detectors that cover the largest area of the "
            "image, as heatmaps of σ(wᵀx − b) (0 black … 1 yellow) with the 0.5 contour in cyan.</p>"
            f'<div class="fig">{_img(fg.figure_png(fig), "detector heatmaps on sample images")}</div>')


def _influence_section(summary, max_rows: int = 40) -> str:
    """Concept → class influence (``summary.result``, an :class:`~unveil.evaluate.influence.Influence`), against
    ``summary.control``: the same test on noise directions (permuted-label noise vectors on the same detectors)."""
    infl, control = summary.result, summary.control
    scores, sig = np.asarray(infl.score, float), np.asarray(infl.significant, bool)
    cfg = dict(infl.config or {})
    logit = cfg.get("statistic", "sign") == "logit"
    what_score = ("the class-specific change of the log-odds, Δℓ<sub>k</sub> − mean<sub>j≠k</sub> Δℓ<sub>j</sub>, "
                  "averaged over the class-k images" if logit else
                  "the sign of the change of p(k), averaged over the class-k images (score ∈ [−1, 1])")
    test = ("a two-sided prediction-interval t-test against the direction's own noise scores"
            if str(cfg.get("test", "")).startswith(("t", "prediction-interval"))
            else "the two-sided rank among the class's noise scores pooled over the directions")
    out = ["<h2>Concept → class influence (RCAV)</h2>",
           f"<p>For class k and direction i, α·ŝ<sub>i</sub>/‖ŝ<sub>i</sub>‖ (α = {_fmt(cfg.get('alpha'), 1)}) is "
           f"added {'where the concept is detected' if cfg.get('shift') == 'detected' else 'at every position'} of the "
           f"maps of class-k images and the score is {what_score}. The null is the paper's: per direction "
           f"{_e(cfg.get('n_null', '?'))} linear noise classifiers trained on permutations of its detector's labels, "
           f"and their positive-only signal vectors, scored the same way; {_e(test)}; <b>*</b> = significant, "
           f"Bonferroni over {_e(cfg.get('n_tests', '?'))} tests (level {_fmt(cfg.get('bonferroni_level'), 6)}).</p>"]
    rand = summary.control_random
    n_rand = cfg.get("random_null")
    n_rand = n_rand if isinstance(n_rand, int) and not isinstance(n_rand, bool) and n_rand > 0 else 0
    if n_rand:
        out.append(f"<p>A pair must also be significant against {n_rand} random unit directions per direction "
                   "scored the same way (an intersection–union test: the false-positive rate stays at the level on "
                   "both kinds of noise direction, see <code>benchmarks/influence_calibration.py</code>).</p>")
    rows = [[_txt("EDDP signal vectors"), summary.SDC, summary.SCDP, summary.mean_abs_score],
            [_txt("noise directions (the same detectors, permuted-label noise vectors)"), control.SDC,
             control.SCDP, control.mean_abs_score],
            [_txt("random directions (the same detectors, random unit vectors)"), rand.SDC, rand.SCDP,
             rand.mean_abs_score]]
    out.append(_table(("directions", "SDC (directions)", "SCDP (class, direction pairs)", "mean |score|"), rows))
    out.append('<p class="muted">Neither control carries a concept (the noise directions are exchangeable with the '
               "null by construction), so their significant pairs are false positives: they show what the test "
               "flags when there is no concept.</p>")
    strength = np.nan_to_num(np.abs(scores), nan=0.0).max(axis=1)
    pick = np.flatnonzero(sig.any(axis=1))
    what = "directions with at least one significant class"
    if len(pick) == 0:
        pick = np.argsort(-strength, kind="stable")[:max_rows]
        what = "no direction is significant; the directions with the largest |score|"
    elif len(pick) > max_rows:
        pick = pick[np.argsort(-strength[pick], kind="stable")[:max_rows]]
        what += f" (the {max_rows} strongest)"
    pick = np.sort(pick)
    label = "Δ log-odds of the class" if logit else "RCAV score"
    try:
        fig = fg.new_figure(figsize=(1.2 + 0.75 * scores.shape[1], 0.9 + 0.22 * len(pick)))
        ax = fg.plot_influence(scores[pick], sig[pick], [infl.concept_names[i] for i in pick], infl.class_names,
                               ax=fig.add_subplot(1, 1, 1), label=label)
        ax.set_title("score per (direction, class); * significant", fontsize=8)
        out.append(f'<div class="grid2"><div class="fig">{_img(fg.figure_png(fig), "heatmap of influence scores")}'
                   f'<p class="muted">Shown: {_e(what)}.</p></div>')
    except Exception as exc:  # noqa: BLE001 - a figure failure must not lose the section
        logger.warning("report: influence heatmap failed: %s", exc)
        out.append('<div class="grid2">')
    top = infl.top_concepts(3)
    trs = []
    for cname, d in top.items():
        pos = ", ".join(f"{_e(x['concept'])} ({x['score']:+.2f})" for x in d["positive"]) or "–"
        neg = ", ".join(f"{_e(x['concept'])} ({x['score']:+.2f})" for x in d["negative"]) or "–"
        trs.append([_txt(cname), _Raw(pos), _Raw(neg)])
    out.append("<div><h3>Most influential significant concepts per class</h3>"
               + _table(("class", "raise the class", "lower the class"), trs, left=3)
               + f'<p class="muted">{_per_class_counts(infl)}</p></div></div>')
    out.append(_class_diagrams(infl, scores, sig, label))
    return "\n".join(out)


def _class_diagrams(infl, scores: np.ndarray, sig: np.ndarray, label: str, n: int = 3) -> str:
    """One small diagram per class: its n most positive and n most negative concepts."""
    K = scores.shape[1]
    if K == 0:
        return ""
    cols = min(4, K)
    nrows = -(-K // cols)
    fig = fg.new_figure(figsize=(3.3 * cols, (0.6 + 0.3 * 2 * n) * nrows))
    xmax = float(np.nanmax(np.abs(scores))) if np.isfinite(scores).any() else 1.0
    for k in range(K):
        ax = fig.add_subplot(nrows, cols, k + 1)
        fg.plot_class_influence(scores[:, k], sig[:, k], infl.concept_names, n=n, ax=ax, title=infl.class_names[k],
                                xmax=xmax if xmax > 0 else 1.0)
    fig.tight_layout()
    return ("<h3>Concept → class diagrams</h3><p>Per class, the concepts whose addition raises it most (red, right) "
            f"and lowers it most (blue, left); x = {_e(label)}; solid bars and <b>*</b> are significant, pale hatched "
            "bars are not.</p>"
            f'<div class="fig">{_img(fg.figure_png(fig), "concept to class influence diagrams per class")}</div>')


def _per_class_counts(infl) -> str:
    counts = np.asarray(infl.significant, bool).sum(axis=0)
    if counts.sum() == 0:
        return "No (class, direction) pair is significant."
    parts = ", ".join(f"{_e(c)} {int(n)}" for c, n in zip(infl.class_names, counts) if n)
    return f"Significant pairs per class: {parts}."


def _pattern_cav_section(results: DemoResults) -> str:
    doc = results.pattern_cav  # a PatternCAVComparison
    if doc is None:
        return ""
    concepts, cfg, dets = doc.concepts, doc.config, doc.eddp_detector
    detector_names = [d.name for d in results.eddp.detectors]

    def dname(i):
        return detector_names[i] if 0 <= i < len(detector_names) else f"d{i}"
    rows = []
    for j, c in enumerate(concepts):
        rows.append([_txt(c), doc.n_cells[j], doc.pattern_cav_iou[j], _txt(dname(int(dets[j]))),
                     doc.eddp_iou[j], doc.cos_signal[j], doc.cos_mean_difference[j], doc.cos_filter[j]])
    rows.append([_Raw("<b>S³ (sum)</b>"), None, doc.s3_pattern_cav, _txt(""), doc.s3_eddp, None, None, None])
    out = ["<h2>EDDP against supervised Pattern-CAVs (S³)</h2>",
           "<p>Per annotated concept: the supervised Pattern-CAV (difference of the mean activation of the cells the "
           f"concept covers, ≥ {_fmt(cfg.get('cover'), 2)} of the cell, and of the others, on the train split) used "
           "as a detector with the threshold of highest train IoU, against the EDDP detector of highest train IoU "
           "(learned without labels, its own rule σ(wᵀx − b) &gt; 0.5). IoU on the validation split. "
           "S³ = Σ over these concepts of the one detector's IoU: it rewards covering every concept. The cosines "
           "compare the EDDP detector's signal vector ŝ, its label-free mean difference and its filter w with the "
           "Pattern-CAV.</p>",
           f"<p>S³: <b>EDDP {_fmt(doc.s3_eddp, 2)}</b> vs <b>Pattern-CAV {_fmt(doc.s3_pattern_cav, 2)}"
           f"</b> over {_e(len(doc.concepts))} concepts; EDDP's detector has the higher IoU on "
           f"{_e(doc.eddp_wins)} of them.</p>",
           _table(("concept", "labelled train cells", "Pattern-CAV IoU", "EDDP detector", "EDDP IoU", "cos(ŝ, CAV)",
                   "cos(mean diff., CAV)", "cos(w, CAV)"), rows, left={0, 3})]
    return "\n".join(out)


def _shortcut_section(results: DemoResults, res, split_ds, detector_maps, channel: Optional[int]) -> str:
    info = results.shortcut
    if channel is None or info is None:
        return ""
    i = int(info.detector)
    out = ["<h2>Shortcut: the watermark detector</h2>",
           f"<p>Model <b>{_e(results.model.name)}</b> was trained with a watermark "
           f"stamped on most images of one class. The EDDP detector with the highest validation IoU against the "
           f"<code>watermark</code> mask is <b>{_e(res.detector_names[i])}</b> (IoU val <b>{_fmt(info.iou_val)}</b>, "
           f"train {_fmt(info.iou_train)}; its dissection label: {_e(info.label or 'none')}).</p>"]
    rows = [[_txt("EDDP"), info.iou_val]] + [[_txt(_METHOD_NAMES.get(m, m)), v]
                                             for m, v in info.baselines_best_iou.items()]
    out.append("<div class=\"grid2\"><div><h3>Best watermark IoU per method</h3><p class=\"muted\">max over detectors; "
               "baselines with the rule of table A</p>" + _table(("method", "IoU val"), rows)
               + "</div>")
    sg = info.rcav_significant
    out.append("<div><h3>RCAV of the watermark direction</h3>"
               + _table(("class", "score", "significant"), [[_txt(c), v, bool(sg[c])]
                                                            for c, v in info.rcav_scores.items()])
               + "</div></div>")
    if detector_maps is not None and split_ds:
        # the strongest watermark images plus the detector's top activations
        wm_idx = [n for n in range(len(split_ds["val"])) if split_ds["val"][n].masks[channel].any()][:6]
        images = [np.asarray(split_ds["val"][n].image) for n in wm_idx]
        maps = [np.asarray(detector_maps["val"][n, i]) for n in wm_idx]
        if images:
            mont = fg.detector_montage(images, maps, scale=3)
            out.append(f'<div class="card"><div class="t">{_e(res.detector_names[i])} on validation images that carry '
                       f'the watermark (mask outlined)</div>{_img(fg.png_bytes(mont), "watermark detector")}</div>')
        top_k = int(res.top_indices.shape[1])
        if top_k:
            tops = res.top_activations(i, top_k)
            images = [np.asarray(_sample(None, split_ds, t["split"], t["index"]).image) for t in tops]
            maps = [np.asarray(detector_maps[t["split"]][t["index"], i]) for t in tops]
            mont = fg.detector_montage(images, maps, boxes=[t["box"] for t in tops], scale=3)
            out.append(f'<div class="card"><div class="t">its top activations</div>'
                       f'{_img(fg.png_bytes(mont), "watermark detector top activations")}</div>')
    return "\n".join(out)


def _layers_section(results: DemoResults) -> str:
    layers = results.layers
    if len(layers) < 2:
        return ""
    cats = _categories(c for v in layers.values() for c in v.category_counts)
    def infl(v, which):
        li = v.influence
        if li is None:
            return _txt("–")
        sdc, scdp = {"eddp": (li.SDC, li.SCDP), "noise": (li.control_SDC, li.control_SCDP),
                     "random": (li.control_random_SDC, li.control_random_SCDP)}[which]
        return _txt(f"{sdc} / {scdp}")
    rows = [[_txt(f"{name} (main)" if v.main else name), _txt(" x ".join(map(str, v.map_shape)))]
            + [getattr(v, k) for k in ("S1", "S2", "n_interpretable", "n_distinct", "mF1")]
            + [infl(v, w) for w in ("eddp", "noise", "random")]
            + [v.category_counts.get(c, 0) for c in cats] for name, v in layers.items()]
    return ("<h2>EDDP at other layers</h2><p>The same EDDP fit, dissection and RCAV at other layers of the network "
            "(same number of directions; no baselines there). RCAV: SDC / SCDP of the EDDP directions and of the "
            "two controls on the same detectors (noise: permuted-label noise vectors; random: random unit "
            "vectors), with the test of the influence section. Interpretable detectors per category on the "
            "right.</p>"
            + _table(("layer", "maps (D x H x W)", "S1", "S2", "n_interpretable", "n_distinct", "mF1",
                      "RCAV EDDP", "RCAV noise", "RCAV random") + cats, rows, left=2))


def _duplicates_note(native) -> str:
    """S1 sums every detector, duplicates included: name the own-rule S1 leader's detectors per distinct concept."""
    if not native:
        return ""
    m = max(native, key=lambda k: float(native[k].S1))
    n_int, n_dis = native[m].n_interpretable, native[m].n_distinct
    if not n_int or not n_dis:
        return ""
    return (f" S1 adds up every detector, duplicates included: with its own rule {_e(_METHOD_NAMES.get(m, m))}'s "
            f"{_e(n_int)} interpretable detectors cover {_e(n_dis)} distinct concepts ({float(n_int) / float(n_dis):.1f} "
            "per concept); S2 counts each concept once.")


def _efficientnet_section(eff: Optional[Mapping[str, Any]]) -> str:
    """``results.efficientnet``: the dict of :func:`~unveil.experiments.demo.compare_pretrained_random` (untyped)."""
    if not eff:
        return ""
    if not eff.get("available"):
        return ("<h2>EfficientNet-Lite0 vs random initialisation</h2>"
                f"<p class=\"muted\">Skipped: {_e(eff.get('reason', 'not available'))}</p>")
    sides = [(k, label, eff[k]) for k, label in (("pretrained", "ImageNet weights"), ("random", "random init"))]
    cats = _categories(c for _, _, side in sides
                       for d in (side, side.get("eddp") or {}) for c in d.get("category_counts", {}))
    rows = []
    for what in ("units", "eddp"):
        for k, label, side in sides:
            d = side if what == "units" else side.get("eddp")
            if not d:
                continue
            name = (f"{label}: {eff.get('n_units', '?')} units (top-quantile rule)" if what == "units" else
                    f"{label}: {d.get('n_concepts', '?')} EDDP directions (levels {d.get('levels')})")
            rows.append([_txt(name)] + [d.get("category_counts", {}).get(c, 0) for c in cats]
                        + [d.get("n_interpretable"), d.get("n_distinct"), d.get("S1"), d.get("S2")])
    return ("<h2>EfficientNet-Lite0 vs random initialisation</h2>"
            f"<p>Network Dissection at block <code>{_e(eff.get('block'))}</code> of its {_e(eff.get('n_units', '?'))} "
            f"channels (rule: {_e(eff.get('rule', ''))}) and of EDDP direction pairs fitted there with the rest of the "
            f"network as the head (their own rule), on concept-world images resized to {_e(eff.get('image_size'))} px "
            f"({_e(eff.get('n_train', '?'))} train / {_e(eff.get('n_val', '?'))} val images). Randomly initialised "
            "networks are known to give good colour detectors, so counts of interpretable detectors only mean "
            "something per category: the random copy is the reference that a trained network's texture, material, "
            "object and part detectors must beat.</p>"
            + _table(("detectors",) + tuple(cats) + ("interpretable", "distinct", "S1", "S2"), rows))


def _footer(results: DemoResults) -> str:
    timing, machine = results.timing, results.machine
    rows = [[_txt(k), v] for k, v in timing.stages_s.items()]
    out = ["<h2>Run</h2>"]
    if rows:
        total = timing.total_s
        out.append(_table(("stage", "seconds"), rows + ([[_txt("total (before the report)"), total]] if total else [])))
    out.append(f"<p class=\"muted\">{_e(machine.cpu_count)} CPUs, torch threads "
               f"{_e(machine.torch_threads)}, load average at start {_e(machine.loadavg_start)}"
               f"; {_e(machine.platform)}</p>")
    vers = results.versions
    if vers:
        out.append("<p class=\"muted\">versions: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in vers.items())
                   + f"; seed {_e(results.seed)}</p>")
    return "\n".join(out)


# --------------------------------------------------------------------------- applications
def _gallery(results: DemoResults, applications) -> str:
    doc = results.applications  # None: no numbers, only the figure
    expl = (applications or {}).get("explanations") or []
    images = (applications or {}).get("images")
    if not expl or images is None:
        return ""
    from ..explain import plot_explanation
    n = len(expl)
    fig = fg.new_figure(figsize=(5.6, 2.9 * n))
    cards = []
    for r, e in enumerate(expl):
        ax_img = fig.add_subplot(n, 2, 2 * r + 1)
        plot_explanation(e, np.asarray(images[r]), ax=ax_img, n_concepts=3)
        ax_img.set_title(fg.safe_text(ax_img.get_title()), fontsize=7)
        top = list(e.top)
        fg.plot_contributions([float(e.contributions[i]) for i in top], [e.names[i] for i in top],
                              ax=fig.add_subplot(n, 2, 2 * r + 2), title="top concepts")
    fig.tight_layout()
    rows = []
    for r, d in enumerate(doc.explanations if doc is not None else []):
        tops = ", ".join(f"{_e(t['name'])} ({t['contribution']:+.2f})" for t in d.top[:3])
        rows.append([_txt(f"val #{d.val_index}"), _txt(d.true_class), _txt(d.class_name), d.probability,
                     bool(d.watermarked), _Raw(tops)])
    cards.append(f'<div class="fig">{_img(fg.figure_png(fig), "explanation gallery")}</div>')
    if rows:
        cards.append("<div>" + _table(("image", "true class", "predicted", "p", "watermark", "top concepts (Δ logit)"),
                                      rows, left={0, 1, 2, 5}) + "</div>")
    return ("<h3>Explanations</h3><p>For each image: the detector maps of the concepts that contributed most to the "
            "predicted class (coloured overlays, layer <code>" + _e(doc.layer if doc is not None else "?") + "</code>), and each "
            "concept's contribution = logit of the predicted class minus that logit when the concept is removed "
            "at the layer with its signal vector (x′ = x − σ(wᵀx − b)·â·ŝ, each concept alone).</p>"
            f'<div class="grid2">{"".join(cards)}</div>')


def _counterfactuals(results: DemoResults) -> str:
    app = results.applications
    cfs = app.counterfactuals if app is not None else []
    if not cfs:
        return ""
    fig = fg.new_figure(figsize=(3.8 * len(cfs), 2.5))
    rows = []
    for n, c in enumerate(cfs):
        names = c.class_names or [str(k) for k in range(len(c.probs_before))]
        fg.plot_probabilities(c.probs_before, c.probs_after, names, ax=fig.add_subplot(1, len(cfs), n + 1),
                              title=f"val #{c.val_index}: remove {c.name}")
        k = names.index(c.pred_before) if c.pred_before in names else int(np.argmax(c.probs_before))
        rows.append([_txt(f"val #{c.val_index}"), _txt(c.name), _txt(c.pred_before),
                     c.probs_before[k], c.probs_after[k], _txt(c.pred_after), max(c.probs_after)])
    fig.tight_layout()
    sel = app.counterfactual_selection
    return ("<h3>Counterfactuals</h3><p>The top concept of an explained image is removed (its signal value at every "
            "position) and the model is run again." + (f" Shown: {_e(sel)}." if sel else "") + "</p>"
            + _table(("image", "concept removed", "predicted before", "p before", "p(same class) after",
                      "predicted after", "p after"), rows, left=3)
            + f'<div class="fig">{_img(fg.figure_png(fig), "class probabilities before and after the removal")}</div>')


def _correction(results: DemoResults) -> str:
    c = results.correction
    if c is None:
        return ""
    setup = results.shortcut_experiment

    def st(name):  # the experiment's settings ("?" when the results carry none)
        return "?" if setup is None else getattr(setup, name)
    na = None
    used = {k: (v or {}).get("detectors") for k, v in c.rows.items()}

    def det(name):
        return _txt(" ".join(f"d{i}" for i in used[name]) if used.get(name) else "–")
    rows = [[_txt("none"), _txt("–"), na, c.clean_acc_before, c.poisoned_acc_before],
            [_txt("signal vector ŝ (EDDP)"), det("signal"), c.strength, c.clean_acc_after, c.poisoned_acc_after]]
    auto = c.signal_value_removal or {}
    if auto:
        rows.append([_txt("signal value removal (k = â, untuned)"), det("signal"), _txt("auto"),
                     auto.get("clean_acc_after"), auto.get("poisoned_acc_after")])
    rows.append([_txt("filter w"), det("filter"), c.filter_strength, c.filter_clean_acc_after, c.filter_acc_after])
    if c.random_acc_after is not None:
        rows.append([_txt(f"random unit directions (mean of {st('n_random')}; max "
                          f"{_fmt(c.random_acc_after_max)})"), _txt("own"), _txt("own"),
                     c.random_clean_acc_after, c.random_acc_after])
    if c.mean_difference_acc_after is not None:
        rows.append([_txt("detector mean difference (label-free)"), det("mean_difference"),
                     c.mean_difference_strength, c.mean_difference_clean_acc_after, c.mean_difference_acc_after])
    if c.pattern_cav_image_acc_after is not None:
        rows.append([_txt("supervised Pattern-CAV, image labels"), det("pattern_cav_image"),
                     c.pattern_cav_image_strength, c.pattern_cav_image_clean_acc_after, c.pattern_cav_image_acc_after])
    if c.pattern_cav_acc_after is not None:
        rows.append([_txt("supervised Pattern-CAV, cell labels"), det("pattern_cav"), c.pattern_cav_strength,
                     c.pattern_cav_clean_acc_after, c.pattern_cav_acc_after])
    if c.oracle_poisoned_acc is not None:
        rows.append([_txt("oracle (true watermark cells → mean activation)"), _txt("–"), na, na,
                     c.oracle_poisoned_acc])
    wm_text = "?" if setup is None else setup.watermark.get("text", "?")
    text = (f"Model <b>{_e(st('model'))}</b>, layer <code>{_e(st('layer'))}</code>, "
            f"{_e(st('n_concepts'))} EDDP concepts fitted on {_e(st('n_fit'))} training-distribution "
            f"images (a fit separate from the one above). "
            + (("Candidates: every detector whose dissection label on the fit images is the watermark "
                f"(IoU ≥ {_e(0.04 if setup is None else setup.min_iou)}): "
                + ", ".join(f"d{_e(i)} (IoU {_fmt(v)})" for i, v in zip(c.watermark_detectors,
                                                                   c.watermark_detectors_iou))
                + f"; together IoU {_fmt(c.union_iou)}, cell recall {_fmt(c.union_recall)}. "
                + ("Each edit keeps, best IoU first, the candidates whose removal raises the held-out accuracy "
                   "(column “detectors”). " if c.detectors_rule == "select" else "All are corrected. "))
               if c.detectors_rule in ("select", "label") else
               "Corrected: the detector with the highest IoU against the watermark mask. ")
            + f"Every edit uses its detectors' masks m_p; k is chosen on "
            f"{_e(st('n_val'))} held-out images (seed {_e(st('val_seed'))}) as the best poisoned "
            f"accuracy with a clean accuracy drop ≤ {_e(st('max_clean_drop'))}; accuracies are on "
            f"{_e(st('n_test'))} test images. Poisoned = the watermark "
            f"{_e(repr(wm_text))} stamped on images of the other classes.")
    pb, pa = c.poisoned_acc_before, c.poisoned_acc_after
    facts = [f"Best watermark detector d{_e(c.watermark_detector)}: IoU {_fmt(c.watermark_iou)} (next best "
             f"{_fmt(c.second_best_iou)}); on the layer's cells precision {_fmt(c.detector_precision)}, "
             f"recall {_fmt(c.detector_recall)}."]
    if pb is not None and pa is not None:
        facts.append(f"Removing ŝ changed the poisoned accuracy from {_fmt(pb)} to {_fmt(pa)} "
                     f"({float(pa) - float(pb):+.3f}) and the clean accuracy from {_fmt(c.clean_acc_before)} to "
                     f"{_fmt(c.clean_acc_after)}.")
        others = {"the filter w": c.filter_acc_after, "random directions (mean)": c.random_acc_after,
                  "the supervised Pattern-CAV (image labels)": c.pattern_cav_image_acc_after,
                  "the supervised Pattern-CAV (cell labels)": c.pattern_cav_acc_after}
        better = [k for k, v in others.items() if v is not None and float(v) > float(pa)]
        worse = [k for k, v in others.items() if v is not None and float(v) <= float(pa)]
        if worse:
            facts.append("ŝ reached at least the poisoned accuracy of " + ", ".join(worse) + ".")
        if better:
            facts.append("ŝ stayed below " + ", ".join(better) + ".")
        md = c.mean_difference_acc_after
        if md is not None:
            facts.append(f"The same candidates' label-free mean difference (Pattern-CAV's estimator with the "
                         f"detector as the labeller) reached {_fmt(md)} ({float(md) - float(pb):+.3f}).")
        if c.oracle_poisoned_acc is not None:
            facts.append(f"The oracle edit reaches {_fmt(c.oracle_poisoned_acc)}.")
    tm = c.true_mask or {}
    tm_rows = [[_txt(lab), tm[k].get("strength"), tm[k].get("poisoned_acc_after")]
               for k, lab in (("signal", "signal vector ŝ"), ("filter", "filter w"),
                              ("pattern_cav", "supervised Pattern-CAV, cell labels")) if k in tm]
    out = ["<h3>Correcting the shortcut</h3>", f"<p>{text}</p>",
           _table(("edit (masks: watermark detectors)", "detectors", "k", "clean acc", "poisoned acc"), rows, left=2),
           '<div class="note">' + " ".join(facts) + "</div>"]
    if tm_rows:
        out.append("<p class=\"muted\">The same directions with the true watermark cells as the mask instead of the "
                   "detector's (k by the same rule): separates the direction's quality from the mask's.</p>"
                   + _table(("direction (true-cell mask)", "k", "poisoned acc"), tm_rows))
    return "\n".join(out)


def _actmax(results: DemoResults, applications) -> str:
    am = results.activation_maximization
    if am is None:
        return ""
    s = am.summary  # unveil.explain.actmax's summary (untyped)
    n = (s.get("cos_signal") or {}).get("n", "?")
    wd = am.watermark_detector or {}
    rows = [[_txt("mean over detectors"), am.cos_signal, am.cos_filter, am.cos_pattern_cav]]
    a = s.get("all_positions") or {}
    if a:
        rows.append([_txt("mean over detectors, Δx over all positions"),
                     *[(a.get(k) or {}).get("mean") for k in ("cos_signal", "cos_filter", "cos_pattern_cav")]])
    if wd:
        rows.append([_txt("watermark detector"), wd.get("cos_signal"), wd.get("cos_filter"), wd.get("cos_pattern_cav")])
    out = ["<h3>Activation maximisation</h3>",
           f"<p>An image is optimised to raise each of the {_e(n)} detectors of the shortcut experiment's fit; Δx = the "
           "change of the layer's activation it causes where the detector responds (positions weighted by the "
           "detector's response; the mean over all positions is shown too), compared (cosine) with the detector's "
           "signal vector ŝ, its filter w, and a Pattern-CAV of the detector's positions.</p>",
           _table(("", "cos(Δx, ŝ)", "cos(Δx, w)", "cos(Δx, Pattern-CAV)"), rows)]
    if s.get("signal_beats_filter") is not None:
        out.append(f"<p class=\"muted\">ŝ has the larger cosine than w on {_fmt(100 * float(s['signal_beats_filter']), 0)} % "
                   f"of the detectors, than Pattern-CAV on {_fmt(100 * float(s.get('signal_beats_pattern_cav', float('nan'))), 0)} %.</p>")
    images = (applications or {}).get("actmax_images")
    if images is not None and len(images):
        import torch
        imgs = images[:16]
        arr = (torch.as_tensor(imgs).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        j = results.correction.watermark_detector if results.correction is not None else None
        cards = []
        for k, a in enumerate(arr):
            mark = " (watermark)" if j is not None and int(j) == k else ""
            cards.append(f'<div class="card"><div class="t">d{k}{_e(mark)}</div>'
                         f'{_img(fg.png_bytes(a.repeat(2, 0).repeat(2, 1)), f"activation maximisation d{k}")}</div>')
        if j is not None and int(j) >= len(arr) and int(j) < len(images):
            a = (torch.as_tensor(images[int(j)]).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            cards.append(f'<div class="card"><div class="t">d{int(j)} (watermark)</div>'
                         f'{_img(fg.png_bytes(a.repeat(2, 0).repeat(2, 1)), "activation maximisation watermark")}</div>')
        out.append(f'<div class="cards">{"".join(cards)}</div>')
    return "\n".join(out)


def _applications_section(results: DemoResults, applications) -> str:
    parts = [_guard(name, fn) for name, fn in (("explanations", lambda: _gallery(results, applications)),
                                               ("counterfactuals", lambda: _counterfactuals(results)),
                                               ("correction", lambda: _correction(results)),
                                               ("activation maximisation", lambda: _actmax(results, applications)))]
    parts = [p for p in parts if p]
    if not parts:
        return ""
    return "<h2>Applications</h2>\n" + "\n".join(parts)


# --------------------------------------------------------------------------- public
def build_report(results: Union[DemoResults, Mapping[str, Any]], dissections: Optional[Mapping[str, Any]] = None, *,
                 train=None, val=None,
                 detector_maps: Optional[Mapping[str, Any]] = None,
                 watermark_channel: Optional[int] = None, n_detectors: int = 24, n_heatmap_images: int = 4,
                 applications: Optional[Mapping[str, Any]] = None,
                 title: str = "unveil — concepts of a vision network") -> str:
    """The report as one self-contained HTML string.

    Parameters
    ----------
    results : DemoResults or dict
        The demo's typed results (:class:`~unveil.experiments.results.DemoResults`, e.g. from
        :func:`~unveil.load_results`); a dict is validated with ``DemoResults.from_dict`` (a missing key or a
        wrong type raises :class:`~unveil.ValidationError`). Its optional sections (``pattern_cav``,
        ``shortcut``, ``applications``, ``correction``, ...) are skipped when ``None``.
    dissections : dict, optional
        ``{"eddp": DissectionResult, ...}``; the ``"eddp"`` entry drives the detector montages and heatmaps
        (not stored in ``results.json``: a report from a loaded file has no detector cards).
    train, val : concept data sets (``ds[i].image``) that the dissection's top activations refer to.
    detector_maps : ``{"train": (N_train, I, h, w), "val": (N_val, I, h, w)}`` EDDP detector values in [0, 1].
    watermark_channel : int, optional
        Mask channel of the watermark concept (shortcut section).
    n_detectors : int
        Detector cards (the most interpretable first).
    applications : dict, optional
        Objects for the "Applications" section: ``"explanations"`` (list of
        :class:`~unveil.explain.Explanation`), ``"images"`` ((n, H, W, 3) uint8, the explained images)
        and ``"actmax_images"`` ((I, 3, S, S) in [0, 1]). Its numbers come from ``results``
        (``applications``, ``correction``, ``activation_maximization``, ``shortcut_experiment``).

    Returns
    -------
    str

    Examples
    --------
    >>> page = build_report(load_results("unveil-demo"))  # doctest: +SKIP
    >>> page.startswith("<!DOCTYPE html>")  # doctest: +SKIP
    True
    """
    if isinstance(results, Mapping):
        results = DemoResults.from_dict(results)
    elif not isinstance(results, DemoResults):
        raise ValidationError(f"results must be a DemoResults (unveil.load_results) or the dict of a results.json, "
                              f"got {type(results).__name__}.")
    dissections = dict(dissections or {})
    split_ds = {k: v for k, v in (("train", train), ("val", val)) if v is not None}
    res = dissections.get("eddp")
    maps = None if detector_maps is None else {k: v for k, v in detector_maps.items()}
    body = [_header(results, title), _comparison(results)]
    if res is not None:
        for name, fn in (("detectors", lambda: _eddp_section(res, split_ds, maps, n_detectors)),
                         ("heatmaps", lambda: _heatmaps_section(res, val, None if maps is None else maps.get("val"),
                                                                n_heatmap_images)),
                         ("shortcut", lambda: _shortcut_section(results, res, split_ds, maps, watermark_channel))):
            body.append(_guard(name, fn))
    body.append(_guard("influence", lambda: _influence_section(results.influence)))
    body.append(_guard("pattern_cav", lambda: _pattern_cav_section(results)))
    body.append(_guard("applications", lambda: _applications_section(results, applications)))
    body.append(_layers_section(results))
    body.append(_efficientnet_section(results.efficientnet))
    body.append(_footer(results))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><main>\n" + "\n".join(b for b in body if b) + "\n</main></body></html>\n")


def _guard(name: str, fn) -> str:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the whole report
        logger.warning("report: section %s failed: %s", name, exc, exc_info=True)
        return f'<div class="note">The {_e(name)} section could not be drawn: {_e(type(exc).__name__)}: {_e(exc)}</div>'


def write_report(path, results: Union[DemoResults, Mapping[str, Any]], dissections: Optional[Mapping[str, Any]] = None, **kwargs) -> Path:
    """Build the report (see :func:`build_report`) and write it atomically to ``path``; returns the path."""
    from .._io import atomic_write_bytes
    path = Path(path)
    page = build_report(results, dissections, **kwargs)
    atomic_write_bytes(path, page.encode("utf-8"))
    logger.info("report: wrote %s (%.1f kB)", path, len(page) / 1024)
    return path
