"""The paper's own path on its synthetic recipe: EDDP from random detectors, learned by the losses alone.

No clustering initialisation: ``init="random"`` runs step (a) (soft-standardised features, orthogonal
filters) and then step (d), with the paper's hyper-parameters for its synthetic run (method.md §2, §5):
the constrained form, τ = 1, ρ = 0.5, γ = 1.1, step (b) skipped, a long schedule (``--steps-a``,
``--steps-d`` mini-batches of 2048 patches, early stopping with ``--patience``). Compared with the
paper's numbers (matched IoU 0.96 / 0.92 / 0.96, signal-value RMSE 0.26), with the same path where step
(d) learns the signal vectors as free parameters (``refine_signals="learned"``, the only change; from
random detectors the estimator keeps them at the positive-only pattern of the current filters) and with the default
fit (clustering initialisation) on the same data and head.

    python benchmarks/eddp_paper_path.py                  # seeds 0-5, about 1 min per seed here
    python benchmarks/eddp_paper_path.py --seeds 0 --steps-a 2000 --steps-d 2000

Writes ``benchmarks/results/eddp_paper_path.{json,md}`` (or ``--out``/``--name``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

PAPER = {"iou": [0.96, 0.92, 0.96], "rmse": 0.26}


def _variants(params: dict):
    """(name, EDDP parameters) of each fit on the same data and head."""
    return (("paper's path", params), ("paper's path, Ŝ learned in (d)", {**params, "refine_signals": "learned"}),
            ("default (clustering init)", {}))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:+.1e}"


def _worst_violation(est):
    """The largest constraint violation at the end, relative to its bound (≤ 0: every bound holds), or None."""
    cons = getattr(est, "history_", {}).get("constraints")
    if not cons:
        return None
    return max((t["value"] - t["bound"]) / t["bound"] for c in cons.values() for t in c["terms"].values())


def paper_path_params(n_concepts: int, steps_a: int, steps_d: int, patience: int) -> dict:
    tau, rho = 1.0, 0.5
    # the paper's own L_ic floor (τ/I), L_sb (every patch) and signal-vector estimator (every positive counts 1),
    # not the estimator's defaults; step (d)'s signal vectors re-estimated (its default from random detectors)
    return dict(init="random", mode="constrained", gamma=1.1, patience=patience, ic_floor="paper", sb_patches="all",
                shared_positives="full", refine_signals="pattern",
                steps={"a": steps_a, "b": 0, "d": steps_d},
                tau={"a": tau, "b": tau, "d": tau},
                # the estimator's ρ is a multiple of τ/I (the paper's real-data rule, method.md §5):
                # ρ = 0.5 is r·τ/I
                rho={k: rho * n_concepts / tau for k in "abd"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--steps-a", type=int, default=4000)
    ap.add_argument("--steps-d", type=int, default=6000)
    ap.add_argument("--patience", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--constraint-margin", type=float, default=None,
                    help="how far inside each bound the augmented Lagrangian aims (a fraction; default the "
                         "estimator's CONSTRAINT_MARGIN, 0.005); 0 aims at the bounds themselves")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="eddp_paper_path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from unveil import EDDP
    from unveil._io import atomic_write_bytes, atomic_write_json, versions
    from unveil.data.synthetic import make_synthetic, train_head
    from unveil.directions.eddp import refinement
    from unveil.evaluate.recovery import score_pairs

    if args.constraint_margin is not None:
        refinement.CONSTRAINT_MARGIN = args.constraint_margin

    params = paper_path_params(3, args.steps_a, args.steps_d, args.patience)
    rows = []
    for seed in args.seeds:
        data = make_synthetic(random_state=seed)
        head, acc = train_head(data, random_state=seed)
        for variant, kw in _variants(params):
            t = time.perf_counter()
            est = EDDP(n_concepts=3, random_state=seed, **kw).fit(data.X, head=head)
            rep = score_pairs(est.pairs_, data)
            rec = {"seed": seed, "variant": variant, "head_accuracy": acc, "fit_seconds": time.perf_counter() - t,
                   "matched_iou": [float(v) for v in rep.matched_iou], "rmse": float(rep.rmse_overall),
                   "enc_cos": float(rep.mean_encoder_cosine), "dec_cos": float(rep.mean_decoder_cosine),
                   "steps_run": {p: est.history_[p]["steps_run"][0] for p in "abd" if p in est.history_},
                   "constraints_hold": getattr(est, "constraints_hold_", None),
                   "worst_violation": _worst_violation(est)}
            rec["meets_paper"] = bool(min(rec["matched_iou"]) >= min(PAPER["iou"]) and rec["rmse"] <= PAPER["rmse"])
            # the stricter reading: each concept at least the paper's own IoU for it (concepts in the recipe's order)
            rec["meets_paper_per_concept"] = bool(rec["meets_paper"] and all(
                v >= p for v, p in zip(rec["matched_iou"], PAPER["iou"])))
            rows.append(rec)
            print(f"seed {seed} {variant:32s} IoU {' / '.join(f'{v:.3f}' for v in rec['matched_iou'])} "
                  f"RMSE {rec['rmse']:.3f} enc {rec['enc_cos']:.3f} dec {rec['dec_cos']:.3f} "
                  f"steps {rec['steps_run']} constraints hold {rec['constraints_hold']} "
                  f"({_fmt(rec['worst_violation'])}) "
                  f"{rec['fit_seconds']:.0f} s  meets the paper's numbers: {rec['meets_paper']}", flush=True)
    command = "python benchmarks/eddp_paper_path.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = ["# EDDP: the paper's path on its synthetic recipe", "", f"`{command.strip()}`", "",
             f"Paper: matched IoU {' / '.join(map(str, PAPER['iou']))}, RMSE {PAPER['rmse']}; a seed meets it "
             f"when every concept's IoU is at least {min(PAPER['iou'])} and the RMSE at most {PAPER['rmse']}. "
             f"Parameters of the paper's path: `{params}`; the augmented Lagrangian aims "
             f"{refinement.CONSTRAINT_MARGIN:g} inside each bound.", "",
             "| seed | variant | IoU c0 | IoU c1 | IoU c2 | RMSE | enc cos | dec cos | steps run | constraints hold "
             "| worst violation | fit s | meets the paper |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['variant']} | " + " | ".join(f"{v:.3f}" for v in r["matched_iou"])
                     + f" | {r['rmse']:.3f} | {r['enc_cos']:.3f} | {r['dec_cos']:.3f} | {r['steps_run']} | "
                       f"{r['constraints_hold']} | {_fmt(r['worst_violation'])} | {r['fit_seconds']:.0f} | "
                       f"{r['meets_paper']} |")
    for variant, _ in _variants(params):
        sel = [r for r in rows if r["variant"] == variant]
        M = np.array([r["matched_iou"] for r in sel])
        lines.append("")
        lines.append(f"- {variant}: mean IoU per concept {' / '.join(f'{v:.3f}' for v in M.mean(0))} (worst "
                     f"{M.min():.3f}), RMSE {np.mean([r['rmse'] for r in sel]):.3f} (worst "
                     f"{max(r['rmse'] for r in sel):.3f}); meets the paper's numbers on "
                     f"{sum(r['meets_paper'] for r in sel)} of {len(sel)} seeds (each concept at least the paper's "
                     f"IoU for it: {sum(r['meets_paper_per_concept'] for r in sel)} of {len(sel)})"
                     + ("" if all(r["constraints_hold"] is None for r in sel) else
                        f"; every constraint holds on {sum(r['constraints_hold'] is True for r in sel)} of {len(sel)}"))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", {"benchmark": "eddp_paper_path", "command": command.strip(),
                                                       "params": params, "paper": PAPER, "rows": rows,
                                                       "constraint_margin": refinement.CONSTRAINT_MARGIN,
                                                       "versions": versions()})
    atomic_write_bytes(args.out / f"{args.name}.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines[-2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
