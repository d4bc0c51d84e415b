"""The HTML report: escaping, self-containment, detector cards on a data set with known answers; figures."""
import base64
import json
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from unveil import DirectionPairs, ValidationError  # noqa: E402
from unveil.data.synthetic import PoolLinearHead  # noqa: E402
from unveil.data.world import Concept, WorldSample  # noqa: E402
from unveil.evaluate.dissection import dissect  # noqa: E402
from unveil.evaluate.influence import Influence, influence  # noqa: E402
from unveil.experiments.results import RESULTS_SCHEMA, DemoResults, NativeRuleSummary  # noqa: E402
from unveil.evaluate.pattern_cav import PatternCAVComparison, compare_with_pattern_cavs  # noqa: E402
from unveil.report import (build_report, detector_montage, plot_class_influence, plot_detector_heatmaps,  # noqa: E402
                           plot_influence, plot_method_comparison, write_report)

EVIL_CONCEPT = "<script>alert('concept')</script>"
EVIL_CLASS = '<img src=x onerror="alert(1)">'
EVIL_MODEL = "</title><script>alert('model')</script>"


class _Tiny:
    """16 x 16 images; concept 0 = the left half (x < cut), concept 1 = the top half, cut varies."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.concepts = [Concept(EVIL_CONCEPT, "color"), Concept('sky" onmouseover="x', "object")]
        self.categories = ["color", "object"]
        self.class_names = [EVIL_CLASS, "plain"]
        self.samples = []
        for i in range(n):
            cut = int(rng.integers(4, 12))
            m = np.zeros((2, 16, 16), bool)
            m[0, :, :cut] = True
            m[1, :cut, :] = True
            img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            self.samples.append(WorldSample(img, m, i % 2))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[int(i)]

    def maps(self):
        # feature maps at the mask resolution: channel c is exactly mask c (so detector c has IoU 1 with c)
        return torch.from_numpy(np.stack([s.masks for s in self.samples]).astype(np.float32))


def _summary(**kw):
    d = dict(S1=0.0, S2=0.0, n_interpretable=0, n_distinct=0, mPrecision=0.0, mRecall=0.0, mAP=0.0, mF1=0.0,
             n_detectors=2)
    d.update(kw)
    return d


def _influence_doc(infl, control, control_random=None):
    """The ``influence`` section the demo writes, for an Influence and its two controls."""
    rand = control if control_random is None else control_random
    return {"SDC": infl.sdc, "SCDP": infl.scdp, "null": "permutation", "statistic": "logit", "test": "t",
            "n_null": 6, "random_null": 6, "max_patches": 1000, "n_maps": int(sum(infl.class_counts)), "pooled_head_fast_path": True,
            "alpha": infl.config.get("alpha"), "bonferroni_level": infl.config.get("bonferroni_level"),
            "mean_abs_score": float(np.nanmean(np.abs(infl.score))),
            "control": {"what": "noise", "SDC": control.sdc, "SCDP": control.scdp,
                        "mean_abs_score": float(np.nanmean(np.abs(control.score)))},
            "control_random": {"what": "random", "SDC": rand.sdc, "SCDP": rand.scdp,
                               "mean_abs_score": float(np.nanmean(np.abs(rand.score)))},
            "top_concepts": infl.top_concepts(3), "result": infl.to_dict()}


def _tiny_influence():
    z = np.zeros((1, 1))
    infl = Influence(score=z, p_value=z + 1, significant=z.astype(bool), null_mean=z, null_std=z + 1,
                     class_counts=np.ones(1, np.int64), concept_names=("d0",), class_names=("c",), config={})
    return infl


def _results(**sections):
    """A valid results.json dict (small defaults), with ``sections`` replacing the top-level keys given."""
    infl = _tiny_influence()
    doc = {"schema": RESULTS_SCHEMA, "seed": 0,
           "model": {"name": "m", "id": "m", "layer": "layer4", "test_acc": 0.5, "test_acc_split": "val",
                     "checkpoint_metrics": {}},
           "data": {"world": "ConceptWorld", "n_train": 8, "n_val": 6, "n_concepts": 2, "seed": 0, "watermark": None,
                    "class_names": ["a", "b"]},
           "config": {"n_concepts": 2, "layer": "layer4", "fast": True, "model": "worldnet", "quantile": 0.995},
           "dissection": {"eddp": _summary()}, "dissection_native_rules": {}, "detection_rules": {"eddp": "rule"},
           "category_counts": {},
           "eddp": {"n_concepts": 2, "levels": [2], "layer": "layer4", "map_shape": [2, 16, 16], "detectors": [],
                    "history_seconds": None},
           "influence": _influence_doc(infl, infl), "pattern_cav": None, "shortcut": None, "efficientnet": None,
           "applications": None, "layers": {}, "versions": {"unveil": "0"},
           "machine": {"cpu_count": 2, "torch_threads": 1, "platform": "x", "loadavg_start": None, "loadavg_end": None},
           "timing": {"stages_s": {}, "total_s": 1.0, "loadavg_start": None, "loadavg_end": None}}
    doc.update(sections)
    return doc


@pytest.fixture(scope="module")
def report_inputs():
    torch.manual_seed(0)
    train, val = _Tiny(8, 0), _Tiny(6, 1)
    pairs = DirectionPairs(10 * torch.eye(2), torch.full((2,), 5.0), torch.eye(2),
                           names=["d0:" + EVIL_CONCEPT, "d1:sky"])
    det_tr, det_va = pairs.detect(train.maps()), pairs.detect(val.maps())
    res = dissect(det_tr, train, range(8), range(6), val_dataset=val, val_maps=det_va, top_k=3,
                  detector_names=["d0<b>", "d1"])
    head = PoolLinearHead(2, 2)
    labels = np.array([s.label for s in val.samples])
    kw = dict(n_null=6, epochs=10, statistic="logit", test="t", class_names=val.class_names)
    infl = influence(head, val.maps(), labels, pairs, **kw)
    noise = DirectionPairs(pairs.decoders, pairs.biases, torch.eye(2).flip(0), names=["n0", "n1"])
    control = influence(head, val.maps(), labels, noise, **kw)
    rand = DirectionPairs(pairs.decoders, pairs.biases, torch.tensor([[0.6, 0.8], [0.8, -0.6]]), names=["r0", "r1"])
    control_random = influence(head, val.maps(), labels, rand, **kw)
    masks = lambda ds: np.stack([x.masks for x in ds.samples])  # noqa: E731
    cmp = compare_with_pattern_cavs(train.maps(), masks(train), val.maps(), masks(val), pairs, res.iou_train,
                                    res.iou_val, concept_names=[c.name for c in train.concepts], min_cells=5)
    keys = ("S1", "S2", "n_interpretable", "n_distinct", "mPrecision", "mRecall", "mAP", "mF1", "n_detectors")
    results = _results(
        model={"name": EVIL_MODEL, "id": "m", "layer": "layer<4>", "test_acc": 0.5, "test_acc_split": "val",
               "checkpoint_metrics": {}},
        dissection={"eddp": {k: res.summary[k] for k in keys}, "pca": _summary()},
        detection_rules={"eddp": "sigmoid > 0.5", "pca": "<i>quantile</i>"},
        eddp={"n_concepts": 2, "levels": [2], "layer": "layer<4>", "map_shape": [2, 16, 16],
              "detectors": res.table(), "history_seconds": None},
        influence=_influence_doc(infl, control, control_random), pattern_cav=cmp.to_dict(),
        layers={"layer<4>": {**{k: res.summary[k] for k in keys}, "category_counts": {}, "map_shape": [2, 16, 16],
                             "main": True, "influence": _layer_influence(infl, control, control_random)},
                "layer3": {**_summary(), "category_counts": {}, "map_shape": [2, 32, 32], "main": False}})
    results = json.loads(json.dumps(results))  # JSON types, as read from results.json
    return dict(results=DemoResults.from_dict(results), dissections={"eddp": res}, train=train, val=val,
                detector_maps={"train": det_tr, "val": det_va}), res, infl, control, control_random


def _layer_influence(infl, control, control_random):
    return {"SDC": infl.sdc, "SCDP": infl.scdp, "n_maps": int(sum(infl.class_counts)), "n_null": 6, "random_null": 6,
            "control_SDC": control.sdc, "control_SCDP": control.scdp, "control_random_SDC": control_random.sdc,
            "control_random_SCDP": control_random.scdp}


def test_report_escapes_every_name(report_inputs):
    kwargs = dict(report_inputs[0])
    page = build_report(kwargs.pop("results"), kwargs.pop("dissections"), **kwargs)
    for evil in (EVIL_CONCEPT, EVIL_CLASS, EVIL_MODEL, "<i>quantile</i>", "d0<b>", 'sky" onmouseover="x'):
        assert evil not in page
    assert "<script" not in page.lower()
    assert "<img src=x" not in page and 'onmouseover="' not in page  # no tag or attribute breaks out
    assert html_escaped(EVIL_CONCEPT) in page  # the label is shown, escaped
    assert html_escaped(EVIL_CLASS) in page
    assert "could not be drawn" not in page  # no section failed


def html_escaped(s):
    import html
    return html.escape(s, quote=True)


def test_report_is_self_contained(report_inputs, tmp_path):
    kwargs = dict(report_inputs[0])
    path = write_report(tmp_path / "report.html", kwargs.pop("results"), kwargs.pop("dissections"), **kwargs)
    page = path.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page, flags=re.I)
    assert "<link" not in page.lower() and "@import" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 6  # comparison bars, 2 detector cards, heatmaps, influence heatmap and class diagrams
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_detector_cards_show_known_labels(report_inputs):
    kwargs, res = report_inputs[:2]
    # detector c reads exactly concept c: label c, IoU 1 on both splits
    assert res.labels.tolist() == [0, 1]
    np.testing.assert_allclose(res.val_iou, [1.0, 1.0], rtol=0, atol=1e-12)
    kwargs = dict(kwargs)
    page = build_report(kwargs.pop("results"), kwargs.pop("dissections"), **kwargs)
    assert page.count('<div class="card">') == 2
    assert "IoU val 1.000 (train 1.000)" in page
    assert "d0&lt;b&gt;</b> → <b>" + html_escaped(EVIL_CONCEPT) in page


def test_report_minimal_results_and_bad_input():
    page = build_report(_results(dissection={"eddp": _summary(S1=2.5, S2=1.25)}))
    assert "2.500" in page and "1.250" in page
    with pytest.raises(ValidationError, match="results must be a DemoResults"):
        build_report([1, 2])
    with pytest.raises(ValidationError, match="required key 'dissection.eddp.n_interpretable' is missing"):
        build_report(_results(dissection={"eddp": {"S1": 2.5, "S2": 1.25}}))


def test_detector_montage_dims_outside_and_outlines_mask():
    img = np.full((8, 8, 3), 200, np.uint8)
    mp = np.zeros((8, 8), np.float32)
    mp[:, :4] = 1.0  # left half detected
    m = detector_montage([img, img], [mp, np.zeros((8, 8))], scale=1, gap=2)
    assert m.shape == (8, 18, 3)
    np.testing.assert_array_equal(m[4, 1], [200, 200, 200])  # inside the mask: unchanged
    np.testing.assert_array_equal(m[4, 6], [70, 70, 70])  # outside: dimmed to 0.35
    np.testing.assert_array_equal(m[4, 3], [255, 0, 255])  # the mask's border: magenta
    np.testing.assert_array_equal(m[:, 8:10], 255)  # the white gap
    assert (m[:, 10:] == 70).all()  # an empty detector dims the whole image


def test_plot_functions_return_their_axes():
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    assert plot_influence(np.array([[0.5, -1.0]]), np.array([[True, False]]), ["a$b"], ["x", "y"], ax=ax) is ax
    assert len(ax.texts) == 1 and ax.texts[0].get_text() == "*" and ax.texts[0].get_position() == (0, 0)
    fig2, ax2 = plt.subplots()
    assert plot_method_comparison({"eddp": {"S1": 1.0, "S2": 0.5}}, ax=ax2) is ax2
    fig3, axes = plt.subplots(1, 2)
    out = plot_detector_heatmaps(np.zeros((8, 8, 3), np.uint8), [np.ones((2, 2))], ["t"], axes=axes)
    assert list(out) == list(axes)
    ax4 = plot_influence(np.zeros((2, 2)), np.zeros((2, 2), bool), ["a", "b"], ["x", "y"])
    assert ax4.figure is not None
    for f in (fig, fig2, fig3, ax4.figure):
        plt.close(f)


def test_report_leaves_pyplot_alone(report_inputs):
    import matplotlib.pyplot as plt
    before, backend = plt.get_fignums(), matplotlib.get_backend()
    kwargs = dict(report_inputs[0])
    build_report(kwargs.pop("results"), kwargs.pop("dissections"), **kwargs)
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend


def _applications_inputs():
    from unveil.explain import Explanation
    names = [EVIL_CONCEPT, "sky", "grass"]
    expl = Explanation(predicted=1, probs=torch.tensor([0.2, 0.8]), logits=torch.tensor([0.0, 1.386]),
                       maps=torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)),
                       contributions=torch.tensor([0.9, -0.3, 0.1]), top=[0, 2, 1], names=names,
                       class_name=EVIL_CLASS)
    correction = {"poisoned_acc_before": 0.398, "poisoned_acc_after": 0.542, "clean_acc_before": 0.774,
                  "clean_acc_after": 0.7735, "filter_acc_after": 0.512, "random_acc_after": 0.433,
                  "pattern_cav_acc_after": 0.648, "pattern_cav_image_acc_after": 0.601,
                  "mean_difference_acc_after": 0.703, "oracle_poisoned_acc": 0.769, "watermark_iou": 0.359,
                  "watermark_detector": 1, "second_best_iou": 0.137, "strength": 40.8}
    correction.update({k: None for k in (  # the numbers this test does not look at
        "filter_clean_acc_after", "random_acc_after_max", "random_clean_acc_after", "pattern_cav_clean_acc_after",
        "pattern_cav_strength", "pattern_cav_image_clean_acc_after", "pattern_cav_image_strength",
        "mean_difference_clean_acc_after", "mean_difference_strength", "union_iou", "union_recall",
        "detector_precision", "detector_recall", "signal_value_removal", "true_mask")})
    correction.update(filter_clean_acc_after=0.7, filter_strength=1.0, detectors_rule="best", watermark_detectors=[1],
                      watermark_detectors_iou=[0.359], rows={})
    results = _results(
        applications={"layer": "layer4", "contribution": "logit", "counterfactual_selection": "all", "explanations": [
            {"val_index": 3, "true_class": EVIL_CLASS, "class_name": EVIL_CLASS, "probability": 0.8,
             "watermarked": True, "top": [{"concept": 0, "name": EVIL_CONCEPT, "contribution": 0.9}]}],
            "counterfactuals": [{"val_index": 3, "gallery_position": 0, "concept": 0, "name": EVIL_CONCEPT,
                                 "probs_before": [0.2, 0.8], "probs_after": [0.7, 0.3], "p_drop": 0.5,
                                 "pred_before": "plain", "pred_after": EVIL_CLASS,
                                 "class_names": [EVIL_CLASS, "plain"]}]},
        correction=correction,
        activation_maximization={"cos_signal": 0.154, "cos_filter": 0.213, "cos_pattern_cav": 0.276, "summary": {},
                                 "watermark_detector": None},
        shortcut_experiment={"model": EVIL_MODEL, "layer": "layer2", "n_concepts": 3, "n_random": 10, "n_fit": 20,
                             "n_val": 10, "n_test": 10, "seed": 0, "val_seed": 1, "max_clean_drop": 0.005,
                             "min_iou": 0.04, "detectors": "best", "watermark": {"text": "<rook>"}},
    )
    applications = {"explanations": [expl], "images": np.zeros((1, 16, 16, 3), np.uint8),
                    "actmax_images": torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    return results, applications


def test_report_applications_section_states_the_measured_numbers():
    results, applications = _applications_inputs()
    page = build_report(results, applications=applications)
    assert "could not be drawn" not in page
    app = page[page.index("<h2>Applications</h2>"):]
    for title in ("Explanations", "Counterfactuals", "Correcting the shortcut", "Activation maximisation"):
        assert f"<h3>{title}</h3>" in app, title
    for evil in (EVIL_CONCEPT, EVIL_CLASS, EVIL_MODEL, "<rook>"):
        assert evil not in page
    assert html_escaped(EVIL_CONCEPT) in app and "&lt;rook&gt;" in app
    # the table and the sentences carry the numbers as given, and the comparisons follow them
    for v in ("0.398", "0.542", "0.774", "0.512", "0.433", "0.648", "0.601", "0.703", "0.769", "0.359", "0.154", "0.213", "0.276"):
        assert v in app, v
    assert "from 0.398 to 0.542 (+0.144)" in app
    assert "ŝ reached at least the poisoned accuracy of the filter w, random directions (mean)." in app
    assert ("ŝ stayed below the supervised Pattern-CAV (image labels), the supervised Pattern-CAV (cell labels)."
            in app)
    assert "label-free mean difference (Pattern-CAV's estimator with the detector as the labeller) reached " \
           "0.703 (+0.305)" in app
    # gallery figure, counterfactual figure and 3 activation-maximisation images, all inline PNG
    srcs = re.findall(r'src="([^"]*)"', app)
    assert len(srcs) == 5
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for s in srcs)
    assert "d1 (watermark)" in app


def test_report_without_applications_has_no_section():
    page = build_report(_results())
    assert "Applications" not in page
    results, _ = _applications_inputs()
    only_numbers = build_report(_results(correction=results["correction"]))  # no objects: the table alone
    assert "Correcting the shortcut" in only_numbers and "Explanations" not in only_numbers


def test_duplicates_note_names_the_own_rule_s1_leader():
    from unveil.report.html import _duplicates_note

    def nat(**kw):
        return NativeRuleSummary.from_dict({**_summary(**kw), "rule": "otsu"})
    native = {"nmf": nat(S1=22.4, n_interpretable=64, n_distinct=8),
              "ica": nat(S1=12.7, n_interpretable=64, n_distinct=14)}
    note = _duplicates_note(native)
    assert "NMF's 64 interpretable detectors cover 8 distinct concepts (8.0 per concept)" in note
    assert _duplicates_note({}) == ""
    assert _duplicates_note({"<b>x</b>": nat(S1=1.0, n_interpretable=2, n_distinct=1)}).count("<b>") == 0


def test_report_renders_influence_against_noise_and_class_diagrams(report_inputs):
    kwargs, _, infl, control, control_random = report_inputs
    kwargs = dict(kwargs)
    page = build_report(kwargs.pop("results"), kwargs.pop("dissections"), **kwargs)
    sec = page[page.index("<h2>Concept → class influence (RCAV)</h2>"):page.index("<h2>EDDP against supervised")]
    assert "could not be drawn" not in page
    # EDDP's row and the two controls' rows, with their own SDC / SCDP
    assert (f"<td class=\"l\">EDDP signal vectors</td><td class=\"\">{infl.sdc}</td>"
            f"<td class=\"\">{infl.scdp}</td>") in sec
    assert (f"permuted-label noise vectors)</td><td class=\"\">{control.sdc}</td>"
            f"<td class=\"\">{control.scdp}</td>") in sec
    assert (f"random unit vectors)</td><td class=\"\">{control_random.sdc}</td>"
            f"<td class=\"\">{control_random.scdp}</td>") in sec
    assert "6 random unit directions per direction" in sec
    # the layer table: RCAV of EDDP and both controls at the layer that has it, a dash where it was not run
    lay = page[page.index("<h2>EDDP at other layers</h2>"):]
    lay = lay[:lay.index("</table>")]
    assert (f"<td class=\"\">{infl.sdc} / {infl.scdp}</td><td class=\"\">{control.sdc} / {control.scdp}</td>"
            f"<td class=\"\">{control_random.sdc} / {control_random.scdp}</td>") in lay
    assert lay.count("<td class=\"\">–</td>") == 3
    assert "class-specific change of the log-odds" in sec and "prediction-interval t-test" in sec
    assert "<h3>Concept → class diagrams</h3>" in sec
    assert len(re.findall(r'src="data:image/png;base64,', sec)) == 2  # heatmap + per-class diagrams
    assert html_escaped(EVIL_CLASS) in sec and EVIL_CLASS not in sec


def test_report_renders_the_s3_table(report_inputs):
    kwargs = dict(report_inputs[0])
    results = kwargs.pop("results")
    page = build_report(results, kwargs.pop("dissections"), **kwargs)
    sec = page[page.index("<h2>EDDP against supervised Pattern-CAVs (S³)</h2>"):]
    cmp = results.pattern_cav
    assert isinstance(cmp, PatternCAVComparison)
    assert cmp.concepts == [EVIL_CONCEPT, 'sky" onmouseover="x']
    # detector c is mask c: EDDP's detectors reach IoU 1; the two masks are correlated (one cut), so the
    # difference of means mixes both channels and the Pattern-CAV cannot separate them as well
    np.testing.assert_allclose(cmp.eddp_iou, [1.0, 1.0], rtol=0, atol=1e-12)
    assert all(0.0 < v < 1.0 for v in cmp.pattern_cav_iou)
    assert cmp.eddp_detector == [0, 1] and cmp.s3_eddp == pytest.approx(2.0, abs=1e-12) and cmp.eddp_wins == 2
    assert (f"S³: <b>EDDP 2.00</b> vs <b>Pattern-CAV {cmp.s3_pattern_cav:.2f}</b> over 2 concepts; EDDP's detector "
            f"has the higher IoU on 2 of them") in sec
    assert html_escaped(EVIL_CONCEPT) in sec and EVIL_CONCEPT not in page
    assert "d0&lt;b&gt;" in sec  # the detector's name, escaped
    assert PatternCAVComparison.from_dict(cmp.to_dict()) == cmp
    assert "EDDP against supervised" not in build_report(_results())


def test_plot_class_influence_marks_significant_concepts():
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    out = plot_class_influence([0.5, -1.0, 0.2, 0.0], [True, False, False, True], ["a$b", "b", "c", "d"], n=1, ax=ax)
    assert out is ax
    assert [t.get_text() for t in ax.get_yticklabels()] == [r"a\$b *", "b"]  # best positive on top, then negative
    plt.close(fig)
