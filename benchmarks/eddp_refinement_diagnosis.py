"""Where the refinement loses the encoders at D = 512: per concept, and what changes it.

On the ``scale`` setting (``make_hard_synthetic(dim=512)``, 64 concepts, 32 distractors, a trained
pool → linear head) one default fit is taken apart:

* per concept, from the initialisation to the refined fit: matched IoU, encoding cosine, detection
  rate, and how far the filter turned (cosine of the two filters);
* the positive-only pattern ŝ re-estimated with the initial filters on the refined positive sets and
  with the refined filters on the initial positive sets (which of the two changes costs the cosine);
* the paper's detector losses (step (d) weights, without the URA term) over every patch, in the same
  mini-batches of the fit's size for the initial and the refined detectors (do the losses prefer the
  refined state over the whole data, or only on the mini-batches the fit saw?);
* the largest eigenvalue of the patch covariance against the variance a concept has within its
  positives (the planted α_i·‖s_i‖ over the concept's patches), median over concepts;

then the same data is fitted with variants of the refinement (``--variants``):

* ``tau_b``: τ = 0.2 in step (b) as in step (d); ``tau_low``: τ = 0.05 in both;
* ``no_ic``, ``no_sb``, ``no_s``, ``no_ma``, ``no_mm``, ``no_fso``: one loss off (weight 0 in every step);
* ``frozen``: the filter directions not trained (gains, thresholds and ŝ are);
* ``whiten``, ``whiten1``: Adam moves the filters in softly whitened coordinates, w ∝ v·(C/c̄ + ε)^(-1/2)
  with ε = 0.01 and 1 (a step then moves the detector's score alike along every direction of the
  data). An experiment of this script only (it wraps the refinement's internals); the estimator
  has no such option.

    python benchmarks/eddp_refinement_diagnosis.py            # seed 0, about 15 min on one thread
    python benchmarks/eddp_refinement_diagnosis.py --seed 1 --variants frozen whiten
    python benchmarks/eddp_refinement_diagnosis.py --name eddp_refinement_losses --variants no_sb no_s no_ma no_mm no_fso

Writes ``benchmarks/results/eddp_refinement_diagnosis.{json,md}`` (or ``--out``/``--name``).
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    "tau_b": {"tau": {"b": 0.2}},
    "tau_low": {"tau": {"b": 0.05, "d": 0.05}},
    "no_ic": {"weights": {"b": {"ic": 0.0}, "d": {"ic": 0.0}}},
    "no_sb": {"weights": {"b": {"sb": 0.0}, "d": {"sb": 0.0}}},
    "no_s": {"weights": {"b": {"s": 0.0}, "d": {"s": 0.0}}},
    "no_ma": {"weights": {"b": {"ma": 0.0}, "d": {"ma": 0.0}}},
    "no_mm": {"weights": {"b": {"mm": 0.0}, "d": {"mm": 0.0}}},
    "no_fso": {"weights": {"d": {"fso": 0.0}}},
    "frozen": {},
    "whiten": {},
    "whiten1": {},
}


@contextlib.contextmanager
def refinement_variant(name: str, X: torch.Tensor):
    """The refinement's filters frozen (``frozen``) or moved in whitened coordinates (``whiten*``)."""
    from unveil.directions.eddp import estimator as E
    from unveil.directions.eddp import refinement as R
    if name not in ("frozen", "whiten", "whiten1"):
        yield
        return
    filters0, run0 = R._filters, E.run_phase
    state = {"P": None}
    if name == "frozen":
        def filters(params, orthogonal=False):
            return filters0({**params, "v": params["v"].detach()}, orthogonal)
        R._filters = filters
    else:
        x = X.permute(0, 2, 3, 1).reshape(-1, X.shape[1]).double()
        x = x - x.mean(0)
        C = x.T @ x / x.shape[0]
        ev, U = torch.linalg.eigh(C / (torch.trace(C) / C.shape[0]))
        lam = ev.clamp_min(0) + (0.01 if name == "whiten" else 1.0)
        P, Pinv = ((U * lam.rsqrt()) @ U.T).float(), ((U * lam.sqrt()) @ U.T).float()

        def filters(params, orthogonal=False):
            if state["P"] is None:
                return filters0(params, orthogonal)
            v = params["v"] @ state["P"]
            return v / v.norm(dim=1, keepdim=True), params["log_g"].exp()

        def run_phase(spec, data, params, *a, **k):
            params["v"] = params["v"] @ Pinv
            state["P"] = P
            try:
                return run0(spec, data, params, *a, **k)
            finally:
                state["P"] = None
                v = params["v"] @ P
                params["v"] = v / v.norm(dim=1, keepdim=True)
        R._filters, E.run_phase = filters, run_phase
    try:
        yield
    finally:
        R._filters, E.run_phase = filters0, run0


def full_losses(x, W, b, S, scale, n_concepts, batch, gen):
    """The step-(d) losses of detectors (W, b) and signal vectors S over every patch of ``x``."""
    from unveil.directions import losses as L
    from unveil.directions.eddp.refinement import PAPER_WEIGHTS
    tau, rho, gamma = 0.2, min(0.95, 70 * 0.2 / n_concepts), 1.1
    g = W.norm(dim=1) * scale
    wbar = W / W.norm(dim=1, keepdim=True)
    perm = torch.randperm(x.shape[0], generator=gen)
    sums, n = {}, 0
    for i in range(0, x.shape[0] - batch + 1, batch):
        y = torch.sigmoid(x[perm[i:i + batch]] @ W.T - b)
        t = {"s": L.sparsity_loss(y), "sb": L.sparsity_bound_loss(y), "ma": L.max_activation_loss(y),
             "mm": L.max_margin_loss(g), "ic": L.inactive_loss(y, tau, gamma), "eac": L.excessive_loss(y, rho, gamma),
             "fso": L.fso_loss(wbar, S / S.norm(dim=1, keepdim=True))}
        for k, v in t.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    out = {k: v / n for k, v in sums.items()}
    out["weighted"] = sum(PAPER_WEIGHTS["d"].get(k, 0.0) * v for k, v in out.items())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=64)
    ap.add_argument("--patches", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="*", default=["tau_b", "tau_low", "no_ic", "frozen", "whiten", "whiten1"],
                    choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="eddp_refinement_diagnosis")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from unveil import EDDP
    from unveil._io import atomic_write_bytes, atomic_write_json, versions
    from unveil.data.synthetic import make_hard_synthetic, train_head
    from unveil.directions.pattern import positive_patterns
    from unveil.evaluate.recovery import matched_iou, score_pairs

    I, seed = args.concepts, args.seed
    t_all = time.perf_counter()
    data = make_hard_synthetic(dim=512, n_concepts=I, n_distractors=I // 2, n_classes=I, patches=4,
                               n_per_class=args.patches // (4 * I), random_state=seed)
    head, acc = train_head(data, epochs=20, random_state=seed)
    fit = EDDP(I, random_state=seed).fit(data.X, head=head)
    P0, P1 = fit.init_pairs_, fit.pairs_
    r0, r1 = score_pairs(P0, data), score_pairs(P1, data)
    x = data.X.permute(0, 2, 3, 1).reshape(-1, data.X.shape[1]).double()
    conc = data.patch_concepts()
    W0, b0, W1, b1 = (t.double() for t in (P0.decoders, P0.biases, P1.decoders, P1.biases))
    pos0, pos1 = x @ W0.T > b0, x @ W1.T > b1
    a1 = matched_iou(pos1, conc, I)["assignment"]
    truth = data.S.double() / data.S.double().norm(dim=1, keepdim=True)

    def enc(S):
        S = S / S.norm(dim=1, keepdim=True)
        return np.array([abs(float(S[a1[c]] @ truth[c])) for c in range(I)])

    freq = np.bincount(conc.numpy()[conc.numpy() >= 0], minlength=I) / conc.numel()
    turn = torch.nn.functional.cosine_similarity(W0, W1, dim=1).numpy()
    per = []
    for c in range(I):
        i0, i1 = r0.assignment[c], r1.assignment[c]
        per.append({"concept": c, "frequency": float(freq[c]), "iou": [r0.matched_iou[c], r1.matched_iou[c]],
                    "encoder_cosine": [r0.encoder_cosine[c], r1.encoder_cosine[c]],
                    "rate": [float(pos0[:, i0].double().mean()), float(pos1[:, i1].double().mean())],
                    "filter_cosine": float(turn[i1])})
    def pattern(W, b, pos):  # ŝ of filters W over the positive sets ``pos`` (possibly another detector's)
        return positive_patterns(x, W, b, positives=pos, shared=fit.shared_positives)[0]

    cross = {"initial filters, initial positives": float(enc(pattern(W0, b0, pos0)).mean()),
             "initial filters, refined positives": float(enc(pattern(W0, b0, pos1)).mean()),
             "refined filters, initial positives": float(enc(pattern(W1, b1, pos0)).mean()),
             "refined filters, refined positives": float(enc(pattern(W1, b1, pos1)).mean())}
    xc = x - x.mean(0)
    lam_max = float(torch.linalg.eigvalsh(xc.T @ xc / x.shape[0])[-1])
    alpha = data.alpha.permute(0, 2, 3, 1).reshape(-1, I).double()
    within = [float(alpha[conc == c, c].var() * data.S[c].double().norm() ** 2) for c in range(I)]
    spectrum = {"largest_eigenvalue": lam_max, "median_within_positive_concept_variance": float(np.median(within))}
    scale = float(fit.scale_)
    losses = {"initialisation": full_losses(x, W0, b0, P0.encoders.double(), scale, I, fit.resolved_batch_patches(),
                                            torch.Generator().manual_seed(1)),
              "refined": full_losses(x, W1, b1, P1.encoders.double(), scale, I, fit.resolved_batch_patches(),
                                     torch.Generator().manual_seed(1))}  # the same mini-batches for both
    rows = [{"variant": "initialisation", "iou": r0.mean_iou, "enc": r0.mean_encoder_cosine},
            {"variant": "default", "iou": r1.mean_iou, "enc": r1.mean_encoder_cosine,
             "seconds": fit.history_["seconds"], "min_filter_cosine": float(turn.min())}]
    print(f"initialisation {r0.mean_iou:.4f} / {r0.mean_encoder_cosine:.4f}; default {r1.mean_iou:.4f} / "
          f"{r1.mean_encoder_cosine:.4f}", flush=True)
    for name in args.variants:
        with refinement_variant(name, data.X):
            t = time.perf_counter()
            pv = EDDP(I, random_state=seed, **VARIANTS[name]).fit(data.X, head=head).pairs_
            r = score_pairs(pv, data)
        rows.append({"variant": name, "iou": r.mean_iou, "enc": r.mean_encoder_cosine,
                     "seconds": time.perf_counter() - t,
                     "min_filter_cosine": float(torch.nn.functional.cosine_similarity(
                         W0, pv.decoders.double(), dim=1).min())})
        print(f"{name}: {r.mean_iou:.4f} / {r.mean_encoder_cosine:.4f}", flush=True)

    drop = np.array([p["encoder_cosine"][0] - p["encoder_cosine"][1] for p in per])
    worst = [per[c] for c in np.argsort(-drop)[:12]]
    command = " ".join(["python benchmarks/eddp_refinement_diagnosis.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    md = [f"# Where the refinement loses the encoders (D = 512, {I} concepts, {args.patches} patches, seed {seed})", "",
          f"Head accuracy {acc:.3f}. Wall {time.perf_counter() - t_all:.0f} s.", "",
          f"- Filters turned by a cosine of at least {turn.min():.5f} (median {np.median(turn):.5f}).",
          f"- Concepts whose encoding cosine fell by more than 0.05: {int((drop > 0.05).sum())} of {I}; "
          f"below 0.4 after the refinement: {int(sum(p['encoder_cosine'][1] < 0.4 for p in per))}.",
          "- ŝ re-estimated, mean encoding cosine (detectors matched as in the refined fit): "
          + "; ".join(f"{k} {v:.3f}" for k, v in cross.items()) + ".",
          f"- Largest eigenvalue of the patch covariance {spectrum['largest_eigenvalue']:.2f}; a concept's variance "
          f"within its positives (median) {spectrum['median_within_positive_concept_variance']:.3f}.",
          "- Step-(d) detector losses (no URA term) over every patch, the same mini-batches, initialisation → refined: "
          + ", ".join(f"{k} {losses['initialisation'][k]:.4f} → {losses['refined'][k]:.4f}"
                      for k in ("weighted", "s", "sb", "ma", "ic", "fso")) + ".", "",
          "| concept | frequency | IoU | encoding cosine | detection rate | filter cosine |", "|---|---|---|---|---|---|"]
    for p in worst:
        md.append(f"| {p['concept']} | {p['frequency']:.4f} | {p['iou'][0]:.3f} → {p['iou'][1]:.3f} | "
                  f"{p['encoder_cosine'][0]:.3f} → {p['encoder_cosine'][1]:.3f} | {p['rate'][0]:.4f} → "
                  f"{p['rate'][1]:.4f} | {p['filter_cosine']:.5f} |")
    md += ["", "| variant | IoU | encoding cosine | smallest cosine of a filter with its initial one | fit s |",
           "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['iou']:.4f} | {r['enc']:.4f} | "
                  + (f"{r['min_filter_cosine']:.5f}" if "min_filter_cosine" in r else "–") + " | "
                  + (f"{r['seconds']:.0f}" if "seconds" in r else "–") + " |")
    md += ["", f"Command: `{command}`", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json",
                      {"schema": "unveil.eddp-refinement-diagnosis/1", "command": command, "seed": seed,
                       "n_concepts": I, "patches": args.patches, "head_accuracy": acc, "per_concept": per,
                       "cross": cross, "spectrum": spectrum, "losses": losses, "variants": rows, "versions": versions()})
    atomic_write_bytes(args.out / f"{args.name}.md", "\n".join(md).encode())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
