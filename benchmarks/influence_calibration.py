"""Calibration of the RCAV significance test on pure-noise directions (family-wise error rate).

Each repetition draws a random pool -> linear head, relu'd Gaussian maps, random class labels and
I directions that carry no concept -- (a) random unit vectors, (b) directions learned from permuted
labels (a logistic classifier fitted to random labels and its positive-only pattern) -- and runs
RCAV with the paper's null (noise classifiers on permuted detector labels). A repetition is a
family-wise false positive when any (direction, class) pair is significant at level/(I*K).
Two decision rules on the same null scores: the permutation p-value against the class's null pooled
over directions (``test="empirical"``, the default of ``unveil.influence``) and the per-direction
prediction-interval t-test (``test="t"``), each for two statistics: the paper's sign score
(``statistic="sign"``) and the class-specific change of the log-odds (``statistic="logit"``).
Also the t-test against both the paper's null and a second reference of random unit directions
(``random_null=N``: significant only against both, an intersection-union test), and the
detector-filter null over random patch sets (``null="per_direction"``) for contrast.

    python benchmarks/influence_calibration.py            # ~1.5 min on one CPU thread
    python benchmarks/influence_calibration.py --quick    # ~1 min

Writes benchmarks/results/influence_calibration.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from unveil import DirectionPairs
from unveil._io import versions
from unveil.data.synthetic import PoolLinearHead
from unveil.evaluate import influence as inf

LEVELS = [0.01, 0.02, 0.05, 0.1, 0.2]


def problem(rep, kind, D, K, I, n_maps, hw):
    g = torch.Generator().manual_seed(10_000 + rep)
    X = torch.relu(torch.randn(n_maps, D, hw, hw, generator=g) + 0.3 * torch.randn(n_maps, D, 1, 1, generator=g))
    head = PoolLinearHead(D, K)
    with torch.no_grad():
        head.fc.weight.copy_(torch.randn(K, D, generator=g))
        head.fc.bias.copy_(torch.randn(K, generator=g))
    y = torch.randint(0, K, (n_maps,), generator=g)
    Xp = X.permute(0, 2, 3, 1).reshape(-1, D)
    if kind == "random":
        W = torch.nn.functional.normalize(torch.randn(I, D, generator=g), dim=1)
        b = torch.quantile(Xp @ W.T, 0.7, dim=0)
        S = torch.randn(I, D, generator=g)
    else:
        mean = Xp.mean(0)
        Y = (torch.rand(I, Xp.shape[0], generator=g) < 0.5).double()
        W, b0 = inf._fit_noise_classifiers((Xp - mean).double(), Y, 100, 0.01)
        S = inf._positive_patterns((Xp - mean).double(), W, b0).float()
        W, b = W.float(), (W @ mean.double() - b0).float()
    return X, y, DirectionPairs(W, b, S), head


def clopper_pearson(rate: float, n: int, conf: float = 0.95):
    """Exact binomial interval of a rate observed over ``n`` repetitions."""
    from scipy.stats import beta
    k = int(round(rate * n))
    a = (1 - conf) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def run(kind, null, reps, cfg, statistic="sign", random_null=0):
    min_p = {"empirical": [], "t": []}
    for r in range(reps):
        X, y, pairs, head = problem(r, kind, cfg["D"], cfg["K"], cfg["I"], cfg["n_maps"], cfg["hw"])
        core = inf._compute(X, y, pairs, head, alpha=5.0, normalize=True, n_null=cfg["n_null"], null=null,
                            significance=0.05, tol=1e-6, pooled_head=head.fc, random_state=r, batch_size=256,
                            chunk_elements=2 ** 22, concept_names=None, class_names=None, device=None,
                            progress=False, epochs=cfg["epochs"], test="t", statistic=statistic,
                            random_null=random_null)
        m = core["config"]["n_tests"]
        min_p["t"].append(float(np.nanmin(core["p_value"])) * m)
        p_emp = inf._pooled_empirical_p(core["score"], core["null_scores"])
        min_p["empirical"].append(float(np.nanmin(p_emp)) * m)
    return {test: {str(a): float(np.mean(np.array(v) < a)) for a in LEVELS} for test, v in min_p.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=150, help="repetitions per row (default 150)")
    ap.add_argument("--random-null", type=int, default=200,
                    help="random unit directions per direction for the intersection-union rows (0: no such rows)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("unveil").setLevel(logging.ERROR)
    cfg = dict(D=12, K=4, I=5, n_maps=40, hw=3, n_null=200, epochs=60, reps=args.reps, random_null=args.random_null)
    if args.quick:
        cfg.update(reps=40, n_null=60, epochs=30)
    t0 = time.time()
    rows = []
    for kind in ("random", "permuted"):
        for statistic in ("sign", "logit"):
            res = run(kind, "permutation", cfg["reps"], cfg, statistic)
            for test in ("empirical", "t"):
                rows.append({"directions": kind, "statistic": statistic, "null": "permutation", "test": test,
                             "fwer": res[test]})
            print(rows[-2], rows[-1], flush=True)
        if cfg["random_null"]:  # the intersection-union test: significant against both references
            for statistic in ("sign", "logit"):
                res = run(kind, "permutation", cfg["reps"], cfg, statistic, random_null=cfg["random_null"])
                rows.append({"directions": kind, "statistic": statistic, "null": f"permutation + {cfg['random_null']} random",
                             "test": "t", "fwer": res["t"]})
                print(rows[-1], flush=True)
        reps_narrow = min(cfg["reps"], 50)
        res = run(kind, "per_direction", reps_narrow, dict(cfg, n_null=min(cfg["n_null"], 50)))
        rows.append({"directions": kind, "statistic": "sign", "null": "per_direction", "test": "t", "fwer": res["t"],
                     "reps": reps_narrow})
    wall = time.time() - t0
    m = cfg["I"] * cfg["K"]
    doc = {"config": cfg, "levels": LEVELS, "n_tests_per_repetition": m,
           "min_attainable_p_pooled": 2.0 / (cfg["I"] * cfg["n_null"] + 1), "rows": rows, "wall_s": round(wall, 1),
           "versions": versions(), "command": "python benchmarks/influence_calibration.py" + (" --quick" if args.quick else "")
           + (f" --reps {args.reps}" if args.reps != 150 else "")
           + (f" --random-null {args.random_null}" if args.random_null != 200 else "")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "influence_calibration.json").write_text(json.dumps(doc, indent=2))
    lines = ["# RCAV significance on pure-noise directions: family-wise false-positive rate", "",
             f"{cfg['reps']} repetitions (per_direction: {min(cfg['reps'], 50)}), I = {cfg['I']} directions x K = "
             f"{cfg['K']} classes (Bonferroni over {m}), D = {cfg['D']}, {cfg['n_maps']} maps of {cfg['hw']}x{cfg['hw']}, "
             f"{cfg['n_null']} noise vectors per direction, Adam {cfg['epochs']} full-batch steps. Wall {wall:.0f} s.", "",
             "| directions | statistic | null | test | " + " | ".join(f"FWER @ {a}" for a in LEVELS)
             + " | 95% interval @ 0.05 |",
             "|---|---|---|---|" + "---|" * len(LEVELS) + "---|"]
    for r in rows:
        lo, hi = clopper_pearson(r["fwer"]["0.05"], r.get("reps", cfg["reps"]))
        r["interval_0.05"] = [lo, hi]
        lines.append(f"| {r['directions']} | {r['statistic']} | {r['null']} | {r['test']} | "
                     + " | ".join(f"{r['fwer'][str(a)]:.3f}" for a in LEVELS) + f" | {lo:.3f}–{hi:.3f} |")
    (args.out / "influence_calibration.json").write_text(json.dumps(doc, indent=2))
    lines += ["", "The interval is the exact (Clopper–Pearson) 95% interval of the rate at 0.05 over the repetitions.",
              "", f"Command: `{doc['command']}`"]
    (args.out / "influence_calibration.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for r in rows:
        ax.plot(LEVELS, [r["fwer"][str(a)] for a in LEVELS], marker="o", ms=3,
                label=f"{r['directions']}, {r['statistic']}, {r['null']}, {r['test']}")
    ax.plot([0, 0.2], [0, 0.2], "k--", lw=0.8, label="nominal")
    ax.set_xlabel("nominal family-wise level")
    ax.set_ylabel("observed family-wise false-positive rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, frameon=False)
    fig.tight_layout()
    fig.savefig(args.out / "influence_calibration.png", dpi=130)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
