"""The shortcut experiment on worldnet-shortcut: find the watermark with EDDP, remove it, compare controls.

Usage::

    python benchmarks/shortcut.py --out benchmarks/results/shortcut [--layer layer3] [--concepts 32] [--n-fit 1400]

Writes ``<out>.json`` (every number, the strength tables), ``<out>.md`` (a table) and
``<out>.actmax.png`` (the optimised images of the first detectors).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/shortcut"))
    p.add_argument("--layer", default="layer3")
    p.add_argument("--concepts", type=int, default=32)
    p.add_argument("--n-fit", type=int, default=1400)
    p.add_argument("--n-val", type=int, default=700)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--actmax-steps", type=int, default=96)
    p.add_argument("--no-actmax", action="store_true")
    p.add_argument("--levels", default=None,
                   help="EDDP levels: 'auto' or comma-separated sizes summing to --concepts (default: one level)")
    p.add_argument("--detectors", choices=("select", "label", "best"), default="select",
                   help="of the detectors labelled 'watermark', correct those that help on held-out data (default), "
                        "all of them, or only the best one")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a WorldNet checkpoint trained with a watermark (default: the shipped worldnet-shortcut)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from unveil.experiments.shortcut import run_shortcut_experiment
    t0 = time.perf_counter()
    res = run_shortcut_experiment(layer=args.layer, n_concepts=args.concepts, n_fit=args.n_fit, n_val=args.n_val,
                                  n_test=args.n_test, seed=args.seed, actmax=not args.no_actmax,
                                  actmax_steps=args.actmax_steps, checkpoint=args.checkpoint, detectors=args.detectors,
                                  eddp_params=None if args.levels is None else {
                                      "levels": args.levels if args.levels == "auto"
                                      else [int(v) for v in args.levels.split(",")]},
                                  progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {ext: args.out.with_name(args.out.name + ext) for ext in (".json", ".md", ".actmax.png")}
    am = res.get("activation_maximization")
    if am is not None:
        images = am.pop("images")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        n = min(16, images.shape[0])
        fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(1.3 * ((n + 1) // 2), 2.8), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < n:
                ax.imshow(images[k].permute(1, 2, 0).numpy())
                ax.set_title(f"det {k}", fontsize=6)
        fig.tight_layout()
        fig.savefig(out[".actmax.png"], dpi=120)
        plt.close(fig)
    res["command"] = "python benchmarks/shortcut.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "no_actmax" and v is not None) + (
        " --no-actmax" if args.no_actmax else "")
    res["seconds_total"] = time.perf_counter() - t0
    out[".json"].write_text(json.dumps(res, indent=2, default=float) + "\n")
    c = res["correction"]
    st = res["setup"]
    wm = st["watermark"]
    lines = [f"Model `{st['model']}` (watermark {wm['text']!r} on {wm['fraction']:.0%} of class {wm['target_class']}'s "
             f"training images), layer `{st['layer']}`, {st['n_concepts']} concepts fitted on {st['n_fit']} training "
             f"images; strength chosen on {st['n_val']} held-out images (clean drop <= {st['max_clean_drop']}); "
             f"evaluated on {st['n_test']} test images.", "",
             "| edit (masks: watermark detectors) | detectors | k | clean acc | poisoned acc |", "|---|---|---|---|---|",
             f"| none | - | 0 | {c['clean_acc_before']:.3f} | {c['poisoned_acc_before']:.3f} |",
             ] + _rows(c, res["setup"]["n_random"]) + [
             f"| oracle (true watermark cells -> mean activation) | - | - | - | {c['oracle_poisoned_acc']:.3f} |", "",
             f"Watermark detector {c['watermark_detector']}: IoU {c['watermark_iou']:.3f} (next best "
             f"{c['second_best_iou']:.3f}); on the layer's cells it fires with precision {c['detector_precision']:.3f} "
             f"and covers {c['detector_recall']:.3f} of the cells the watermark touches (>= 5% covered).", "",
             f"Candidates ({_RULES[c['detectors_rule']].format(st['min_iou'])}): "
             f"{', '.join(f'd{i} (IoU {v:.3f})' for i, v in zip(c['watermark_detectors'], c['watermark_detectors_iou']))}; "
             f"together IoU {c['union_iou']:.3f}, cell precision {c['union_precision']:.3f}, cell recall "
             f"{c['union_recall']:.3f}.", "",
             "The best detector's directions, mask = the true watermark cells instead of the detector's m_p (k chosen by the same "
             "rule on the held-out poisoned split; clean images carry no watermark, so they are unchanged):", "",
             "| direction (true-cell mask) | k | poisoned acc |", "|---|---|---|",
             ]
    for name, label in (("signal", "signal vector ŝ"), ("filter", "filter w"), ("pattern_cav", "supervised Pattern-CAV, cell labels")):
        r = c["true_mask"][name]
        lines.append(f"| {label} | {r['strength']:.3g} | {r['poisoned_acc_after']:.3f} |")
    lines.append("")
    if am is not None:
        s = am["summary"]
        lines.append(f"Activation maximisation over {s['cos_signal']['n']} detectors, Δx where the detector responds "
                     f"(weighted by it): cos(Δx, ŝ) = "
                     f"{s['cos_signal']['mean']:.3f} ± {s['cos_signal']['std']:.3f}, cos(Δx, w) = "
                     f"{s['cos_filter']['mean']:.3f} ± {s['cos_filter']['std']:.3f}, cos(Δx, Pattern-CAV of the detector's positives) = "
                     f"{s['cos_pattern_cav']['mean']:.3f} ± {s['cos_pattern_cav']['std']:.3f}; ŝ beats w on "
                     f"{s['signal_beats_filter']:.0%} of detectors, Pattern-CAV on {s['signal_beats_pattern_cav']:.0%}.")
        a = s.get("all_positions")
        if a:
            lines.append(f"Δx as the mean change over all positions: cos(Δx, ŝ) = {a['cos_signal']['mean']:.3f} ± "
                         f"{a['cos_signal']['std']:.3f}, cos(Δx, w) = {a['cos_filter']['mean']:.3f} ± "
                         f"{a['cos_filter']['std']:.3f}, cos(Δx, Pattern-CAV) = {a['cos_pattern_cav']['mean']:.3f} ± "
                         f"{a['cos_pattern_cav']['std']:.3f}; ŝ beats w on {a['signal_beats_filter']:.0%} of detectors.")
    lines.append(f"\nCommand: `{res['command']}` ({res['seconds_total']:.0f} s).")
    out[".md"].write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


_RULES = {"select": "the detectors labelled watermark with IoU >= {}; each edit keeps those that help on held-out data",
          "label": "every detector labelled watermark with IoU >= {}", "best": "the best detector only"}


def _rows(c, n_random):
    def det(name):
        used = (c["rows"].get(name) or {}).get("detectors")
        return " ".join(f"d{i}" for i in used) if used else "-"
    out = []
    for name, label in (("signal", "signal vector ŝ (EDDP)"), ("filter", "filter w"),
                        ("mean_difference", "detector mean difference (label-free)"),
                        ("pattern_cav_image", "supervised Pattern-CAV, image labels (max-pooled)"),
                        ("pattern_cav", "supervised Pattern-CAV, cell labels")):
        r = c["rows"].get(name)
        if r is not None:
            out.append(f"| {label} | {det(name)} | {r['strength']:.3g} | {r['clean_acc_after']:.3f} | "
                       f"{r['poisoned_acc_after']:.3f} |")
        if name == "signal":
            a = c["signal_value_removal"]
            out.append(f"| signal value removal (k = â_p, untuned) | {det(name)} | auto | {a['clean_acc_after']:.3f} | "
                       f"{a['poisoned_acc_after']:.3f} |")
        if name == "filter":
            out.append(f"| random unit directions (mean of {n_random}; max {c['random_acc_after_max']:.3f}) | own | own | "
                       f"{c['random_clean_acc_after']:.3f} | {c['random_acc_after']:.3f} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
