"""Wall time per stage of `unveil demo` and its dissection numbers (JSON + markdown table).

Usage::

    python benchmarks/bench_demo.py --out bench-demo            # the default demo
    python benchmarks/bench_demo.py --out bench-demo --fast     # the smoke-test configuration
    python benchmarks/bench_demo.py --out bench-demo --shortcut

Writes ``OUT/bench_demo.json`` and ``OUT/bench_demo.md`` (plus the demo's own results.json and
report.html in ``OUT/demo``). The load average before and after is recorded: on a shared machine
the wall time depends on what else runs, so compare runs only at similar load.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from unveil._io import atomic_write_bytes, atomic_write_json
from unveil import run_demo


def _table(doc: dict) -> str:
    lines = ["| method | S1 | S2 | interpretable | distinct | mPrecision | mRecall | mAP | mF1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, s in doc["dissection"].items():
        lines.append(f"| {m} | {s['S1']:.3f} | {s['S2']:.3f} | {s['n_interpretable']} | {s['n_distinct']} | "
                     f"{s['mPrecision']:.3f} | {s['mRecall']:.3f} | {s['mAP']:.3f} | {s['mF1']:.3f} |")
    native = doc.get("dissection_native_rules") or {}
    if native:
        lines += ["", "Baselines with their own rule:", "",
                  "| method | S1 | S2 | interpretable | distinct | mF1 |", "|---|---|---|---|---|---|"]
        for m, s in native.items():
            lines.append(f"| {m} | {s['S1']:.3f} | {s['S2']:.3f} | {s['n_interpretable']} | {s['n_distinct']} | "
                         f"{s['mF1']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-demo"))
    p.add_argument("--fast", action="store_true")
    p.add_argument("--shortcut", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS threads during the demo")
    args = p.parse_args()

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    doc = run_demo(args.out / "demo", fast=args.fast, shortcut=args.shortcut, seed=args.seed, progress=True,
                   threads=args.threads)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    bench = {"command": f"python benchmarks/bench_demo.py --out {args.out}" + (" --fast" if args.fast else "")
             + (" --shortcut" if args.shortcut else "") + f" --seed {args.seed} --threads {args.threads}",
             "wall_s": round(wall, 2), "stages_s": doc["timing"]["stages_s"],
             "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
             "cpu_count": os.cpu_count(), "dissection": doc["dissection"],
             "dissection_native_rules": doc.get("dissection_native_rules"),
             "influence": {k: doc["influence"][k] for k in ("SDC", "SCDP")}, "model": doc["model"],
             "shortcut": doc.get("shortcut"), "versions": doc["versions"]}
    atomic_write_json(args.out / "bench_demo.json", bench)
    md = (f"# unveil demo benchmark\n\n`{bench['command']}`: {wall:.1f} s wall on {os.cpu_count()} CPUs, "
          f"load average {bench['loadavg_before'][0]} -> {bench['loadavg_after'][0]}.\n\n"
          + "| stage | s |\n|---|---|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in bench["stages_s"].items())
          + "\n\n" + _table(doc) + "\n")
    atomic_write_bytes(args.out / "bench_demo.md", md.encode())
    print(md)
    print(json.dumps(bench["influence"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
