"""RCAV significance on the shipped WorldNet: EDDP's directions against noise directions with the same detectors.

At ``layer3`` and ``layer4``: EDDP (16 concepts, seed 0) is fitted on the maps of 300 world train
images (``ConceptWorld(300, split="train", seed=0)``) with the layer's head f⁺. Two sets of
directions are then tested with the paper's null (noise classifiers on permuted detector labels):

* ``EDDP``   — EDDP's pairs (detector w, b and signal vector ŝ);
* ``random`` — the same detectors with random unit vectors as encoders (no concept; but, unlike
  every positive-only pattern of relu'd maps, no component along the data mean, so not exchangeable
  with the noise vectors);
* ``permuted`` — the same detectors with one more noise classifier's pattern each (another seed):
  exchangeable with the null by construction; its significant pairs are false positives.

for both shifts (``everywhere``: α·ŝ at every position; ``detected``: weighted by σ(wᵀx − b)) and
both statistics (``sign``: the paper's RCAV score; ``logit``: mean class-specific change of the
log-odds). SDC / SCDP are reported for the prediction-interval t-test and the pooled empirical test
(Bonferroni over 16 x 7 tests), and for the shift ``everywhere`` the t-test that must also hold
against 100 random unit directions per direction (``random_null``, the intersection-union test). Influence is scored on all 300 images at layer4 (pool -> fc: the
pooled fast path) and on a class-balanced subset at layer3 (the whole layer4 -> pool -> fc runs on
every shifted map). The noise classifiers use a smaller subset than the paper (``max_patches``) to
keep the run at a few minutes on one CPU thread.

    python benchmarks/influence_worldnet.py          # ~4 min on one CPU thread
    python benchmarks/influence_worldnet.py --quick  # layer4 only, fewer noise vectors

Writes benchmarks/results/influence_worldnet.{json,md}.
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
from unveil.capture import capture, make_head
from unveil.data.world import ConceptWorld
from unveil.evaluate import influence as inf
from unveil.models import load_model

LAYERS = {  # layer: (influence images, noise vectors per direction)
    "layer3": (70, 20),
    "layer4": (300, 50),
}
N_FIT, N_CONCEPTS, SEED, MAX_PATCHES, EPOCHS = 300, 16, 0, 1000, 100
RANDOM_NULL = 100  # random unit directions per direction for the intersection-union column (shift "everywhere")


def world_images(n, seed=SEED):
    ds = ConceptWorld(n, split="train", seed=seed)
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(ds[i].image)).permute(2, 0, 1) for i in range(n)])
    return x.float().div_(255.0), np.array(ds.labels, dtype=np.int64), list(ds.class_names)


def balanced(labels, n):
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per] for c in classes]))


def random_encoders(pairs, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.nn.functional.normalize(torch.randn(pairs.n_concepts, pairs.n_features, generator=g), dim=1)
    return DirectionPairs(pairs.decoders, pairs.biases, S, names=[f"r{i}" for i in range(pairs.n_concepts)])


def permuted_encoders(maps, pairs, seed):
    """One more draw of the null per detector: a noise classifier's positive-only pattern (exchangeable with it)."""
    vec, _ = inf.permutation_noise_vectors(maps, pairs, 1, random_state=seed, max_patches=MAX_PATCHES, epochs=EPOCHS)
    return DirectionPairs(pairs.decoders, pairs.biases, vec[0], names=[f"p{i}" for i in range(pairs.n_concepts)])


def measure(maps, labels, pairs, head, pooled, shift, statistic, n_null, random_null=0):
    def compute(rn):
        return inf._compute(maps, labels, pairs, head, alpha=5.0, normalize=True, n_null=n_null, null="permutation",
                            significance=0.05, tol=1e-6, pooled_head=pooled, random_state=SEED, batch_size=64,
                            chunk_elements=2 ** 21, concept_names=None, class_names=None, device=None,
                            progress=False, shift=shift, max_patches=MAX_PATCHES, epochs=EPOCHS, lr=0.01, test="t",
                            statistic=statistic, random_null=rn)
    core = compute(0)
    level = core["config"]["bonferroni_level"]
    out = {"n_tests": core["config"]["n_tests"], "bonferroni_level": level}
    p_emp = inf._pooled_empirical_p(core["score"], core["null_scores"])
    n_ref = int(np.isfinite(core["null_scores"]).sum(axis=(0, 1)).min())
    for test, p in (("t", core["p_value"]), ("empirical", p_emp)):
        sig = np.nan_to_num(p, nan=1.0) < level
        out[test] = {"sdc": int(sig.any(1).sum()), "scdp": int(sig.sum())}
    out["empirical"]["can_reach_level"] = bool(2.0 / (n_ref + 1) < level)
    if random_null:  # the intersection-union test: significant against the noise vectors and random directions
        sig = np.nan_to_num(compute(random_null)["p_value"], nan=1.0) < level
        out["t_random"] = {"sdc": int(sig.any(1).sum()), "scdp": int(sig.sum()), "random_null": random_null}
    s = core["score"]
    out["mean_abs_score"] = float(np.nanmean(np.abs(s)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("unveil").setLevel(logging.ERROR)
    t0 = time.time()
    x, labels, class_names = world_images(N_FIT)
    net, _, model_id = load_model("worldnet")
    layers = {"layer4": (300, 20)} if args.quick else LAYERS
    rows, fits = [], {}
    for layer, (n_inf, n_null) in layers.items():
        maps = capture(net, layer, x)
        head = make_head(net, layer)
        pooled = net.fc if layer == "layer4" else None
        t1 = time.time()
        pairs = EDDP(n_concepts=N_CONCEPTS, random_state=SEED).fit(maps, head=head).pairs_
        fits[layer] = {"eddp_fit_s": round(time.time() - t1, 1), "maps": list(maps.shape)}
        keep = balanced(labels, n_inf) if n_inf < len(labels) else np.arange(len(labels))
        m_inf, y_inf = maps[torch.as_tensor(keep)], labels[keep]
        fits[layer]["n_influence_images"] = int(len(keep))
        controls = (("EDDP", pairs), ("random", random_encoders(pairs, SEED + 1)),
                    ("permuted", permuted_encoders(maps, pairs, SEED + 1)))
        for dname, dp in controls:
            for shift in ("everywhere", "detected"):
                for statistic in ("sign", "logit"):
                    t2 = time.time()
                    r = measure(m_inf, y_inf, dp, head, pooled, shift, statistic, n_null,
                                random_null=RANDOM_NULL if shift == "everywhere" else 0)
                    rows.append({"layer": layer, "directions": dname, "shift": shift, "statistic": statistic,
                                 "n_null": n_null, "seconds": round(time.time() - t2, 1), **r})
                    print(rows[-1], flush=True)
    wall = time.time() - t0
    doc = {"model": model_id, "n_fit_images": N_FIT, "n_concepts": N_CONCEPTS, "seed": SEED, "alpha": 5.0,
           "max_patches": MAX_PATCHES, "epochs": EPOCHS, "fits": fits, "rows": rows, "wall_s": round(wall, 1),
           "versions": versions(),
           "command": "python benchmarks/influence_worldnet.py" + (" --quick" if args.quick else "")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "influence_worldnet.json").write_text(json.dumps(doc, indent=2))
    lines = ["# RCAV on WorldNet: EDDP directions vs noise encoders with the same detectors", "",
             f"EDDP(n_concepts={N_CONCEPTS}, random_state={SEED}) on {N_FIT} world train images; alpha = 5 (unit "
             f"encoders); paper's null with max_patches = {MAX_PATCHES}, {EPOCHS} Adam epochs; Bonferroni over "
             f"16 x {len(class_names)} at 0.05. SDC / SCDP per test (empirical: '-' when its smallest p-value "
             f"cannot reach the level). Wall {wall:.0f} s.", "",
             "| layer | images | noise vectors | directions | shift | statistic | t: SDC / SCDP | empirical: SDC / SCDP "
             f"| t, + {RANDOM_NULL} random: SDC / SCDP | mean abs score |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        emp = (f"{r['empirical']['sdc']} / {r['empirical']['scdp']}" if r["empirical"]["can_reach_level"] else "-")
        tr = f"{r['t_random']['sdc']} / {r['t_random']['scdp']}" if "t_random" in r else "-"
        lines.append(f"| {r['layer']} | {fits[r['layer']]['n_influence_images']} | {r['n_null']} | {r['directions']} "
                     f"| {r['shift']} | {r['statistic']} | {r['t']['sdc']} / {r['t']['scdp']} | {emp} "
                     f"| {tr} | {r['mean_abs_score']:.3g} |")
    lines += ["", f"Command: `{doc['command']}`"]
    (args.out / "influence_worldnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
