"""Recovery quality on the synthetic benchmark (method.md §6): EDDP vs the baselines.

Writes ``<out>/synthetic_<setting>.json`` (every per-seed number, seeds, versions, head accuracy) and
``<out>/synthetic_<setting>.md`` (the table). Same computation as ``unveil synthetic``.

    python benchmarks/synthetic_quality.py                      # paper recipe, seeds 0-4, all methods
    python benchmarks/synthetic_quality.py --setting hard --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    from unveil._io import atomic_write_bytes, atomic_write_json
    from unveil.experiments.synthetic import METHODS, format_table, run_synthetic_benchmark

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["paper", "hard"], default="paper")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    ap.add_argument("--fast", action="store_true", help="smoke test: fewer images and epochs")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    res = run_synthetic_benchmark(seeds=args.seeds, setting=args.setting, methods=args.methods, fast=args.fast,
                                  show_progress=True)
    res["command"] = "python benchmarks/synthetic_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = f"synthetic_{args.setting}" + ("_fast" if args.fast else "")
    atomic_write_json(args.out / f"{stem}.json", res)
    table = format_table(res)
    md = (f"# Synthetic recovery benchmark ({args.setting})\n\n`{res['command'].strip()}`\n\n"
          f"```\n{table}\n```\n\nScoring: " + "; ".join(f"**{k}**: {v}" for k, v in res["scoring"].items())
          + "\n\nDetection rules: \n\n" + "\n".join(f"- {m}: {r.get('detection_rule', '-')}"
                                                  for m, r in res["methods"].items()) + "\n")
    atomic_write_bytes(args.out / f"{stem}.md", md.encode())
    print(table)
    print(f"wrote {args.out / (stem + '.json')} and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
