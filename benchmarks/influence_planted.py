"""Power of the RCAV significance test on planted truth: which (concept, class) pairs come out significant.

Synthetic maps (:func:`unveil.data.synthetic.make_synthetic`, classes a = (0, 1), b = (0, 2),
c = (1, 2)), a pool -> linear head trained on them, and two sets of directions: the data's own
(ideal filters, encoders = the planted S) and EDDP's (matched to the planted concepts by |cos|).
Truth: +1 where the concept is in the class's rule, -1 where another class uses it, 0 for a concept
no class uses (present in the images, independent of the class). A significant pair is correct when
the sign of its score equals a non-zero truth; precision = correct / significant, recall = correct /
non-zero truth pairs.

Settings
  paper : the paper's geometry (method.md §6): 3 concepts and 2 distractors in D = 16, all correlated;
          the data span 5 dimensions, so the noise classifiers' signal vectors lie in the same span.
  wide  : the same recipe in D = 32 with 5 orthonormal concepts (3 used, 2 free: one free patch per
          image) and 12 orthonormal distractors of larger spread (beta ~ U(0, 15)), 1000 images per
          class: the concepts are a small part of the variance, as in a real layer.
  wide-128 : the same in D = 128 (the data still span 17 dimensions): a random unit direction now lies
          mostly outside what the head reads, as in a real layer of a few hundred channels.
  hard  : :func:`make_hard_synthetic` (D = 64, 8 correlated concepts, 6 distractors, 8 classes).

Tests: the pooled permutation rank (``empirical``), the per-direction t-test against the noise
classifiers (``t``), and the same t-test that must also hold against as many random unit
directions (``t, + random``: ``random_null = n_null``, the intersection-union test).

Also a diagnosis of the null: the share of the noise vectors' squared norm in span(S), and the head
readout of a unit step, ``|Wu − mean|`` (class contrast), of the planted directions vs the noise vectors.

    python benchmarks/influence_planted.py            # ~3 min on one CPU thread
    python benchmarks/influence_planted.py --quick    # paper + wide only, fewer noise vectors

Writes benchmarks/results/influence_planted.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from unveil import EDDP, DirectionPairs
from unveil._io import versions
from unveil.data.synthetic import make_hard_synthetic, make_synthetic, train_head
from unveil.evaluate import influence as inf

PAPER_CLASSES = ((0, 1), (0, 2), (1, 2))


def wide_data(seed=0, D=32, n_concepts=5, n_distractors=12, beta=(0.0, 15.0), n_per_class=1000):
    g = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(g.standard_normal((D, n_concepts + n_distractors)))
    return make_synthetic(Q[:, :n_concepts].T, Q[:, n_concepts:].T, classes=PAPER_CLASSES, n_per_class=n_per_class,
                          beta=beta, free_patches=1, random_state=seed)


def setting(name, seed=0):
    if name == "paper":
        data = make_synthetic(n_per_class=300, random_state=seed)
        head, acc = train_head(data, epochs=300, random_state=seed)
    elif name in ("wide", "wide-128"):
        data = wide_data(seed, D=128 if name == "wide-128" else 32)
        head, acc = train_head(data, epochs=300, random_state=seed)
    else:
        data = make_hard_synthetic(n_per_class=150, random_state=seed)
        head, acc = train_head(data, epochs=2000, random_state=seed)
    return data, head, acc


def true_pairs(data):
    """Ideal filters (read α_i exactly, distractors not at all), threshold at the on/off boundary α = 2.5."""
    W = data.ideal_filters()
    b = 2.5 + float(data.info["offset"]) * W.sum(1)
    return DirectionPairs(W, b, data.S, names=[f"c{i}" for i in range(data.n_concepts)])


def truth(data):
    used = {c for rule in data.classes for c in rule}
    return np.array([[1 if i in rule else (-1 if i in used else 0) for rule in data.classes]
                     for i in range(data.n_concepts)])


def eddp_pairs(data, head, seed=0):
    """EDDP's pairs reordered to the planted concepts (Hungarian on |cos|); the smallest matched cos."""
    from scipy.optimize import linear_sum_assignment
    fitted = EDDP(n_concepts=data.n_concepts, random_state=seed).fit(data.X, head=head).pairs_
    cos = (torch.nn.functional.normalize(fitted.encoders, dim=1) @ data.S.T).numpy()
    _, match = linear_sum_assignment(-np.abs(cos).T)
    matched = cos[match, np.arange(data.n_concepts)]
    return DirectionPairs(fitted.decoders[match], fitted.biases[match], fitted.encoders[match],
                          names=[f"c{i}" for i in range(data.n_concepts)]), float(matched.min())


def diagnose(data, head, pairs, n_null, seed=0):
    vec, _ = inf.permutation_noise_vectors(data.X, pairs, n_null, random_state=seed, epochs=50)
    V = vec.double().reshape(-1, data.S.shape[1])
    V = torch.nn.functional.normalize(V[torch.isfinite(V).all(1)], dim=1)
    QS, _ = torch.linalg.qr(data.S.double().T)
    W = head.fc.weight.detach().double()

    def readout(u):
        d = u @ W.T
        return (d - d.mean(1, keepdim=True)).norm(dim=1)
    S = torch.nn.functional.normalize(data.S.double(), dim=1)
    used = sorted({c for rule in data.classes for c in rule})
    r_true, r_null = readout(S[used]).numpy(), readout(V).numpy()
    return {"noise_share_in_span_S": float(((V @ QS) ** 2).sum(1).mean()),
            "readout_used_concepts": [round(float(x), 4) for x in r_true],
            "readout_noise_q50_q99": [round(float(np.quantile(r_null, q)), 4) for q in (0.5, 0.99)],
            "noise_readout_above_min_used": float(np.mean(r_null >= r_true.min()))}


def evaluate(data, head, pairs, tr, statistic, n_null, alpha, seed=0, shift_sign=1.0):
    def compute(random_null):
        return inf._compute(data.X, data.y, pairs, head, alpha=shift_sign * alpha, normalize=True, n_null=n_null,
                            null="permutation", significance=0.05, tol=1e-6, pooled_head=head.fc,
                            random_state=seed, batch_size=256, chunk_elements=2 ** 22, concept_names=None,
                            class_names=None, device=None, progress=False, epochs=50, test="t",
                            statistic=statistic, random_null=random_null)
    core = compute(0)
    level = core["config"]["bonferroni_level"]
    p = {"t": core["p_value"], "empirical": inf._pooled_empirical_p(core["score"], core["null_scores"]),
         "t, + random": compute(n_null)["p_value"]}  # the intersection-union test (random_null = n_null)
    out = {}
    score = core["score"]
    sign_ok = np.sign(score) == tr
    for test, pv in p.items():
        sig = np.nan_to_num(pv, nan=1.0) < level
        correct = int((sig & sign_ok & (tr != 0)).sum())
        out[test] = {"significant": int(sig.sum()), "correct": int(correct),
                     "precision": correct / max(1, int(sig.sum())), "recall": correct / int((tr != 0).sum()),
                     "min_p": float(np.nanmin(pv))}
    out["sign_agreement"] = float(np.mean(sign_ok[tr != 0]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("unveil").setLevel(logging.ERROR)
    n_null = 60 if args.quick else 200
    names = ("paper", "wide") if args.quick else ("paper", "wide", "wide-128", "hard")
    t0 = time.time()
    rows, diag = [], {}
    for name in names:
        data, head, acc = setting(name)
        tr = truth(data)
        tp = true_pairs(data)
        diag[name] = {"head_accuracy": round(float(acc), 4), **diagnose(data, head, tp, n_null)}
        sets = [("true", tp, 1.0)]
        ep, cos = eddp_pairs(data, head)
        diag[name]["eddp_min_cos"] = round(cos, 4)
        sets.append(("EDDP", ep, cos))
        for dname, pairs, _ in sets:
            for statistic in ("sign", "logit"):
                r = evaluate(data, head, pairs, tr, statistic, n_null, alpha=1.0)
                for test in ("empirical", "t", "t, + random"):
                    rows.append({"setting": name, "directions": dname, "statistic": statistic, "test": test,
                                 "n_true_pairs": int((tr != 0).sum()), "n_pairs": int(tr.size),
                                 "sign_agreement": r["sign_agreement"], **r[test]})
        print(name, diag[name], f"{time.time() - t0:.0f} s", flush=True)
    wall = time.time() - t0
    doc = {"n_null": n_null, "alpha": 1.0, "epochs": 50, "significance": 0.05, "rows": rows, "diagnosis": diag,
           "wall_s": round(wall, 1), "versions": versions(),
           "command": "python benchmarks/influence_planted.py" + (" --quick" if args.quick else "")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "influence_planted.json").write_text(json.dumps(doc, indent=2))
    lines = ["# RCAV significance on planted truth (paper's null: noise classifiers on permuted detector labels)", "",
             f"{n_null} noise vectors per direction, alpha = 1 (unit encoders), Bonferroni over I x K at 0.05. "
             f"Correct = significant with the sign of the truth. Wall {wall:.0f} s.", "",
             "| setting | directions | statistic | test | significant | correct / true pairs | precision | recall "
             "| sign agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['directions']} | {r['statistic']} | {r['test']} | {r['significant']} "
                     f"| {r['correct']} / {r['n_true_pairs']} | {r['precision']:.2f} | {r['recall']:.2f} "
                     f"| {r['sign_agreement']:.2f} |")
    lines += ["", "Diagnosis (unit steps; readout = norm of the head's class contrast W·u − mean):", "",
              "| setting | head acc | noise share in span(S) | readout of used concepts | noise readout q50 / q99 "
              "| noise >= weakest concept | EDDP min cos |", "|---|---|---|---|---|---|---|"]
    for name, d in diag.items():
        lines.append(f"| {name} | {d['head_accuracy']:.3f} | {d['noise_share_in_span_S']:.3f} | "
                     f"{', '.join(f'{x:.2f}' for x in d['readout_used_concepts'])} | "
                     f"{d['readout_noise_q50_q99'][0]:.2f} / {d['readout_noise_q50_q99'][1]:.2f} | "
                     f"{d['noise_readout_above_min_used']:.2f} | {d['eddp_min_cos']:.3f} |")
    lines += ["", f"Command: `{doc['command']}`"]
    (args.out / "influence_planted.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
