"""``unveil synthetic``: EDDP and the baselines on synthetic data with planted truth (method.md §6)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    from ..experiments.synthetic import DEFAULT_METHODS, METHODS

    p = subparsers.add_parser(
        "synthetic", help="score EDDP and baselines against planted concepts (synthetic benchmark)",
        description="Build the synthetic data for each seed, train the head, fit EDDP and the baselines, "
                    "and score matched IoU, signal-value RMSE and encoding/decoding cosines against the "
                    "planted truth. Prints a table and writes DIR/synthetic.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one data set per seed")
    p.add_argument("--setting", choices=["paper", "hard", "scale"], default="paper",
                   help="'paper': the paper's recipe (D=16, 3 concepts); 'hard': more dimensions, concepts, "
                        "distractors and noise; 'scale': D=512, --n-concepts concepts, >= 500k patches")
    p.add_argument("--n-concepts", type=int, default=32,
                   help="concepts planted in the 'scale' setting (e.g. 32 or 64)")
    p.add_argument("--out", type=Path, default=Path("unveil-synthetic"), help="folder for synthetic.json")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), metavar="METHOD",
                   help=f"methods to run, from: {' '.join(METHODS)}")
    p.add_argument("--fast", action="store_true",
                   help="fewer images and epochs (a smoke test, not a measurement)")
    p.add_argument("--head-epochs", type=int, default=None,
                   help="epochs of the head's training (default 2000; 200 with --fast)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from .._io import atomic_write_json, check_outputs_replaceable
    from .._validation import check_positive_int
    from ..experiments.synthetic import format_table, run_synthetic_benchmark
    from ..experiments.typed import stamp_synthetic_results

    if args.head_epochs is not None:
        check_positive_int(args.head_epochs, "--head-epochs")
    check_outputs_replaceable(args.out, {"synthetic.json": lambda d: "methods" in d and "setting" in d})
    result = run_synthetic_benchmark(seeds=args.seeds, setting=args.setting, methods=args.methods, fast=args.fast,
                                     head_epochs=args.head_epochs, show_progress=not args.no_progress,
                                     n_concepts=args.n_concepts)
    path = Path(args.out) / "synthetic.json"
    atomic_write_json(path, stamp_synthetic_results(result))  # validated, with its schema key
    print(format_table(result))
    print(f"wrote {path}")
    failed = [m for m, r in result["methods"].items() if r["summary"].get("n_failed")]
    if failed:
        print(f"unveil synthetic: {', '.join(failed)} failed on some seeds (errors in {path})", file=sys.stderr)
        return 1
    return 0
