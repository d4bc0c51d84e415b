"""EDDP at a realistic size: D = 512, I = 32 and 64 concepts, >= 500k patches (the ``scale`` setting).

For each I and seed: the supervised ceiling (per concept a logistic regression on the true patch
labels), EDDP (with the head's URA term), EDDP's initialisation alone, and scikit-learn NMF on the
same patches. Prints the table with IoU as a fraction of the ceiling and EDDP's fit time as a ratio
to NMF's, both measured in the same run on the same data (the machine may be shared and noisy:
read the ratios, not the seconds). Writes ``OUT.json`` and ``OUT.md``.

    python benchmarks/eddp_scale.py                      # I = 32 and 64, seeds 0 1 2, 500k patches
    python benchmarks/eddp_scale.py --concepts 32 --seeds 0 --patches 100000   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from unveil._io import atomic_write_json
from unveil.experiments.synthetic import (ceiling_fractions, format_table, run_synthetic_benchmark)

METHODS = ["supervised", "eddp", "eddp-init", "nmf"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--patches", type=int, default=500_000)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--head-epochs", type=int, default=20,
                    help="epochs of the pool -> linear head (125k+ images: a few epochs converge)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eddp_scale"))
    args = ap.parse_args(argv)

    runs = {}
    lines = [f"# EDDP at scale (D = 512, {args.patches} patches, seeds {args.seeds})", "",
             f"Command: `python benchmarks/eddp_scale.py --concepts {' '.join(map(str, args.concepts))} "
             f"--seeds {' '.join(map(str, args.seeds))} --patches {args.patches}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}", ""]
    for I in args.concepts:
        res = run_synthetic_benchmark(seeds=args.seeds, setting="scale", methods=args.methods, n_concepts=I,
                                      scale_patches=args.patches, head_epochs=args.head_epochs)
        table = format_table(res)
        m = res["methods"]
        ceiling = {r["seed"]: r["mean_iou"] for r in m.get("supervised", {}).get("per_seed", []) if r.get("mean_iou")}
        summary = {}
        for name in m:
            fr = ceiling_fractions(m[name], ceiling)
            summary[name] = {"iou_over_ceiling_mean": float(np.mean(fr)) if fr else None,
                             "iou_over_ceiling_worst": float(min(fr)) if fr else None}
        if "eddp" in m and "nmf" in m:
            t_e = {r["seed"]: r.get("fit_seconds") for r in m["eddp"]["per_seed"]}
            t_n = {r["seed"]: r.get("fit_seconds") for r in m["nmf"]["per_seed"]}
            ratios = [t_e[s] / t_n[s] for s in args.seeds if t_e.get(s) and t_n.get(s)]
            summary["eddp"]["fit_time_over_nmf"] = ratios
        if "eddp" in m:
            stages = [r.get("meta", {}) for r in m["eddp"]["per_seed"]]
            summary["eddp"]["n_seeds"] = len(stages)
        runs[str(I)] = {"result": res, "summary": summary}
        print(table, flush=True)
        print(json.dumps(summary, indent=1), flush=True)
        lines += [f"## I = {I}", "", "```", table, "```", ""]
        for name, sm in summary.items():
            if sm.get("iou_over_ceiling_mean") is not None:
                lines.append(f"- {name}: IoU / ceiling {sm['iou_over_ceiling_mean']:.3f} "
                             f"(worst seed {sm['iou_over_ceiling_worst']:.3f})")
        if summary.get("eddp", {}).get("fit_time_over_nmf"):
            r = summary["eddp"]["fit_time_over_nmf"]
            lines.append(f"- EDDP fit time / NMF fit time, per seed: {', '.join(f'{v:.2f}' for v in r)}")
        lines.append("")
        atomic_write_json(args.out.with_suffix(".json"), {"argv": sys.argv[1:], "runs": runs})
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
