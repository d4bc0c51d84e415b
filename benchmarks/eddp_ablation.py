"""Ablation of EDDP on planted-truth data: what each part of the fit contributes.

Variants (every one from the same clustering initialisation, same seed):

- ``init only, no passes``: the clustering initialisation on the sample alone;
- ``init only``: the clustering initialisation with its discriminant passes over every patch, no
  refinement (``steps={"b": 0, "d": 0}``); the passes run only where the sample does not hold every
  patch (the ``scale`` setting), elsewhere the two rows are the same fit;
- ``full, no passes``: the default refinement with the head, from the initialisation without passes;
- ``detector losses``: the default refinement without a head (no URA term);
- ``full``: the default refinement with the head (URA);
- ``full, batch 2048``: the same with mini-batches of 2048 patches, the default before
  ``batch_patches="auto"`` (the same fit wherever the rule gives 2048: 8 concepts or fewer);
- ``gain=auto`` (with and without the head): the refinement starts from gains chosen by the detector
  losses (``init_gain="auto"``) instead of the nearly hard margin detectors;
- ``constrained`` (with the head; init gains and ``gain=auto``): the augmented-Lagrangian form; the
  ``constr. hold`` column says on how many seeds every constraint held at the end;
- ``full, paper L_sb`` / ``full, L_ic floor from start`` / ``full, paper signal-vector estimator``: the
  default fit with one form switched (``sb_patches="all"``, ``ic_floor="start"``,
  ``shared_positives="full"``).

Settings: ``paper`` (method.md §6), ``hard`` (:func:`~unveil.data.synthetic.make_hard_synthetic`,
default size) and ``ura``: 12 planted concepts of which the class rules use 6 (2 rule patches + 2
patches of the other 6 concepts per image, independent of the class), EDDP with 6 concepts, scored
on the 6 concepts the head uses (``used dets``: detectors whose best-IoU concept is a used one);
``scale``: D = 512, 64 concepts, 32 distractors, 64 classes, 200k patches (about a minute per fit:
run it alone, with a few variants).

    python benchmarks/eddp_ablation.py                         # all settings, seeds 0 1 2
    python benchmarks/eddp_ablation.py --settings paper --seeds 0
    python benchmarks/eddp_ablation.py --settings scale --name eddp_ablation_scale \
        --variants "init only" "detector losses (head=None)" "full (head, URA)" "full, batch 2048"

Writes ``benchmarks/results/eddp_ablation.{json,md}`` (or ``--out``) and prints the tables.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    "init only, no passes": (dict(steps={"b": 0, "d": 0}, discriminant_passes=0), False),
    "init only": (dict(steps={"b": 0, "d": 0}), False),
    "detector losses (head=None)": (dict(), False),
    "full (head, URA)": (dict(), True),
    "full, no passes": (dict(discriminant_passes=0), True),
    "full, batch 2048": (dict(batch_patches=2048), True),  # the mini-batch before batch_patches="auto"
    # L_sb over every patch (the paper's form, the default before sb_patches); L_ic floored per detector
    "full, paper L_sb": (dict(sb_patches="all"), True),
    "full, L_ic floor from start": (dict(ic_floor="start"), True),
    # every positive counts 1 in each detector's signal vector (the paper's estimator, the default before
    # shared_positives)
    "full, paper signal-vector estimator": (dict(shared_positives="full"), True),
    # step (d) keeps the signal vectors at the positive-only pattern of the current filters (the default from
    # random detectors) instead of learning them (the paper's wording, the default from the clustering start)
    "full, Ŝ re-estimated in (d)": (dict(refine_signals="pattern"), True),
    "gain=auto, head=None": (dict(init_gain="auto"), False),
    "gain=auto, full (head)": (dict(init_gain="auto"), True),
    "constrained (head)": (dict(mode="constrained"), True),
    "constrained, gain=auto (head)": (dict(mode="constrained", init_gain="auto"), True),
}
URA_SETTING = dict(n_concepts=12, n_used=6, patches=2, free_patches=2, n_classes=8)
# the scale setting of benchmarks/eddp_scale.py at 200k patches and 64 concepts (the passes run only where the
# initialisation's sample does not hold every patch, i.e. here); its head is trained for 20 epochs
SCALE_SETTING = dict(dim=512, n_concepts=64, n_distractors=32, n_classes=64, patches=4, n_per_class=200_000 // 256)


def make_data(setting: str, seed: int):
    from unveil.data.synthetic import make_hard_synthetic, make_synthetic
    if setting == "paper":
        return make_synthetic(random_state=seed), None
    if setting == "hard":
        return make_hard_synthetic(random_state=seed), None
    if setting == "scale":
        return make_hard_synthetic(random_state=seed, **SCALE_SETTING), None
    data = make_hard_synthetic(random_state=seed, **URA_SETTING)
    return data, sorted({c for rule in data.classes for c in rule})


def score(pairs, data, used):
    from unveil.evaluate.recovery import iou_matrix, score_pairs
    rep = score_pairs(pairs, data, concepts=used)
    out = {"matched_iou": rep.matched_iou, "mean_iou": rep.mean_iou, "rmse": rep.rmse_overall,
           "enc_cos": rep.mean_encoder_cosine, "dec_cos": rep.mean_decoder_cosine,
           "off_diagonal_iou": rep.off_diagonal_iou}
    if used is not None:
        with torch.no_grad():
            det = (pairs.detect(data.X) > 0.5).permute(0, 2, 3, 1).reshape(-1, pairs.n_concepts)
        best = iou_matrix(det, data.patch_concepts(), data.n_concepts).argmax(1)
        out["used_detectors"] = int(np.isin(best, used).sum())
    return out


def run(settings, seeds, variants):
    from unveil import EDDP
    from unveil.data.synthetic import train_head

    res = {}
    for setting in settings:
        res[setting] = {"heads": [], "variants": {v: [] for v in variants}}
        for seed in seeds:
            data, used = make_data(setting, seed)
            head, acc = train_head(data, random_state=seed, **({"epochs": 20} if setting == "scale" else {}))
            res[setting]["heads"].append({"seed": seed, "accuracy": acc})
            I = len(used) if used is not None else data.n_concepts
            for name in variants:
                kw, with_head = VARIANTS[name]
                t = time.perf_counter()
                est = EDDP(n_concepts=I, random_state=seed, **kw).fit(data.X, head=head if with_head else None)
                rec = {"seed": seed, "fit_seconds": time.perf_counter() - t, **score(est.pairs_, data, used)}
                if "constraints" in est.history_:
                    rec["constraints_hold"] = est.constraints_hold_
                    rec["constraints"] = est.pairs_.meta["constraints"]
                rec["steps_run"] = {p: est.history_[p]["steps_run"][0] for p in "abd" if p in est.history_}
                res[setting]["variants"][name].append(rec)
                print(f"{setting} seed {seed} {name:32s} IoU {rec['mean_iou']:.4f} RMSE {rec['rmse']:.4f} "
                      f"enc {rec['enc_cos']:.4f} dec {rec['dec_cos']:.4f}", flush=True)
    return res


def _mw(vals, higher=True, nd=3):
    vals = np.asarray(vals, dtype=np.float64)
    worst = vals.min() if higher else vals.max()
    return f"{vals.mean():.{nd}f} ({worst:.{nd}f})"


def table(setting: str, block: dict) -> str:
    recs0 = next(iter(block["variants"].values()))
    n_conc = len(recs0[0]["matched_iou"])
    per_concept = n_conc <= 4
    cols = ["variant"] + ([f"IoU c{i}" for i in range(n_conc)] if per_concept else ["mean IoU"])
    cols += ["RMSE", "enc cos", "dec cos"]
    if "used_detectors" in recs0[0]:
        cols.append("used dets")
    cols += ["constr. hold", "fit s"]
    rows = [cols, ["---"] * len(cols)]
    for name, recs in block["variants"].items():
        row = [name]
        if per_concept:
            M = np.array([r["matched_iou"] for r in recs])
            row += [_mw(M[:, i]) for i in range(n_conc)]
        else:
            row.append(_mw([r["mean_iou"] for r in recs]))
        row += [_mw([r["rmse"] for r in recs], higher=False), _mw([r["enc_cos"] for r in recs], nd=4),
                _mw([r["dec_cos"] for r in recs], nd=4)]
        if "used_detectors" in recs[0]:
            row.append(_mw([r["used_detectors"] for r in recs], nd=1))
        hold = [r["constraints_hold"] for r in recs if "constraints_hold" in r]
        row.append(f"{sum(bool(h) for h in hold)}/{len(hold)}" if hold else "-")
        row.append(f"{np.mean([r['fit_seconds'] for r in recs]):.1f}")
        rows.append(row)
    accs = [h["accuracy"] for h in block["heads"]]
    title = (f"### {setting} (seeds {[h['seed'] for h in block['heads']]}, head accuracy "
             f"{min(accs):.3f}-{max(accs):.3f}); mean over seeds (worst seed)")
    return title + "\n\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", choices=["paper", "hard", "ura", "scale"],
                    default=["paper", "hard", "ura"],
                    help="'scale' (D = 512, 64 concepts, 200k patches) takes about a minute per fit")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--name", default="eddp_ablation", help="file name of the results (NAME.json, NAME.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from unveil._io import atomic_write_bytes, atomic_write_json, versions

    t0 = time.perf_counter()
    res = run(args.settings, args.seeds, args.variants)
    command = "python benchmarks/eddp_ablation.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    doc = {"benchmark": "eddp_ablation", "command": command.strip(), "seeds": args.seeds,
           "ura_setting": URA_SETTING, "scale_setting": SCALE_SETTING, "versions": versions(),
           "seconds": time.perf_counter() - t0,
           "variants": {k: {"params": v[0], "head": v[1]} for k, v in VARIANTS.items() if k in args.variants},
           "settings": res}
    tables = "\n\n".join(table(s, res[s]) for s in args.settings)
    md = (f"# EDDP ablation on planted-truth data\n\n`{doc['command']}`\n\n{tables}\n\n"
          "Scoring as in `unveil synthetic`: matched IoU (Hungarian), RMSE of mean-centred signal values "
          "along unit encoders, |cos| of encoders to S and of decoders to the ideal filters "
          "(rows of pinv([S | Dist]), over all planted concepts in the `ura` setting).\n")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", doc)
    atomic_write_bytes(args.out / f"{args.name}.md", md.encode())
    print(tables)
    print(f"wrote {args.out / args.name}.json and {args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
