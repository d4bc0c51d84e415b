"""How far a calibrated RCAV test can see on WorldNet: each direction's alignment with the class gradients.

For a small step α the logit statistic of RCAV (the class contrast of the log-odds change, shifted
at every position) is linear in the direction: ``score(u, k) ≈ α · uᵀg_k`` with ``g_k`` the gradient
of the mean class-k contrast with respect to a shift added at every position. Against the reference
of random unit directions (the default test of :func:`unveil.influence`, needed to keep the
family-wise rate on random directions), whose ``rᵀĝ_k`` has standard deviation 1/√D, a direction
can only be significant when ``|cos(u, g_k)|`` exceeds about ``t_crit / √D``: the prediction-interval
t quantile at the Bonferroni level over I × K tests, with as many random references as the test uses.

Per layer this script fits EDDP as ``benchmarks/influence_worldnet.py`` does (16 concepts on 300 world
train images, seed 0), computes g_k on a class-balanced set of images, and prints, for EDDP's
encoders, random unit vectors, one more permuted-label noise pattern per detector and the data
mean, the largest |cos| with any class gradient, against that bound. For ``shift="detected"`` (the
shift weighted by the detector's σ(w_iᵀx − b_i) at each position) the gradient depends on the
detector: for each detector i and class k, g_k^(i) of the shift u·σ_i; EDDP's ŝ_i and the permuted
pattern of detector i are compared with their own detector's gradients.

    python benchmarks/influence_alignment.py      # about 30 s on one CPU thread

Writes ``benchmarks/results/influence_alignment.{json,md}`` (``influence_alignment_<I>`` with
``--concepts I`` other than 16).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from influence_worldnet import balanced, permuted_encoders, world_images  # noqa: E402

LAYERS = {"layer3": 140, "layer4": 300}  # class-balanced images per layer (influence_worldnet.py's RCAV uses 70 at layer3)


def class_gradients(head, maps: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(K, D): the gradient of the mean class-k log-odds contrast ℓ_k − mean_{j≠k} ℓ_j over the class-k
    maps with respect to one vector added at every position."""
    out = []
    for k in range(n_classes):
        u = torch.zeros(maps.shape[1], requires_grad=True)
        logp = torch.log_softmax(head(maps[y == k] + u[None, :, None, None]), 1)
        stat = (logp[:, k] - (logp.sum(1) - logp[:, k]) / (n_classes - 1)).mean()
        out.append(torch.autograd.grad(stat, u)[0])
    return torch.stack(out)


def detected_cosines(head, maps: torch.Tensor, y: torch.Tensor, n_classes: int, pairs, sets) -> dict:
    """(I, K) |cos(v_i, g_k^(i))| per set of encoders, g_k^(i) the class-k gradient of a shift weighted by
    detector i's σ(w_iᵀx − b_i) at each position."""
    W, b = pairs.decoders.float(), pairs.biases.float()
    mask = torch.sigmoid(torch.einsum("ndhw,id->nihw", maps, W) - b[None, :, None, None])
    unit = {n: E / E.norm(dim=1, keepdim=True) for n, E in sets.items()}
    out = {n: torch.zeros(W.shape[0], n_classes) for n in sets}
    for i in range(W.shape[0]):
        for k in range(n_classes):
            u = torch.zeros(maps.shape[1], requires_grad=True)
            logp = torch.log_softmax(head(maps[y == k] + u[None, :, None, None] * mask[y == k, i][:, None]), 1)
            stat = (logp[:, k] - (logp.sum(1) - logp[:, k]) / (n_classes - 1)).mean()
            g = torch.autograd.grad(stat, u)[0]
            if float(g.norm()) > 0:
                for n in sets:
                    out[n][i, k] = (unit[n][i] @ (g / g.norm())).abs()
    return out


def bound(D: int, n_tests: int, n_ref: int, level: float = 0.05) -> float:
    """The smallest |cos(u, g_k)| a direction needs to pass the t-test against ``n_ref`` random unit
    directions at the Bonferroni level."""
    from scipy.stats import t as student_t
    t_crit = student_t.ppf(1 - level / n_tests / 2, n_ref - 1) * math.sqrt(1 + 1 / n_ref)
    return float(t_crit / math.sqrt(D))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("unveil").setLevel(logging.ERROR)
    from unveil import EDDP
    from unveil._io import atomic_write_bytes, atomic_write_json, versions
    from unveil.capture import capture, make_head
    from unveil.models import load_model

    t0 = time.time()
    x, labels, class_names = world_images(300)
    net, _, model_id = load_model("worldnet")
    K, I = len(class_names), args.concepts
    doc = {"schema": "unveil.influence-alignment/1", "model": model_id, "n_concepts": I, "layers": {},
           "command": "python benchmarks/influence_alignment.py" + (f" --concepts {I}" if I != 16 else ""),
           "versions": versions()}
    md = [f"# Alignment of directions with the class gradients (WorldNet, {I} concepts, {K} classes)", ""]
    for layer, n_img in LAYERS.items():
        maps = capture(net, layer, x)
        head = make_head(net, layer)
        D = maps.shape[1]
        pairs = EDDP(n_concepts=I, random_state=0).fit(maps, head=head).pairs_
        keep = balanced(labels, n_img)
        G = class_gradients(head, maps[torch.as_tensor(keep)], torch.as_tensor(labels[keep]), K)
        Gu = G / G.norm(dim=1, keepdim=True)
        gen = torch.Generator().manual_seed(1)
        sets = {"EDDP encoders": pairs.encoders.float(), "random unit (2000)": torch.randn(2000, D, generator=gen),
                "permuted-label pattern": permuted_encoders(maps, pairs, 1).encoders.float(),
                "data mean": maps.mean((0, 2, 3))[None]}
        bounds = {n: bound(D, I * K, n) for n in (20, 100)}
        rows = {}
        for name, E in sets.items():
            c = (E / E.norm(dim=1, keepdim=True)) @ Gu.T
            best = c.abs().max(1).values
            rows[name] = {"median_max_abs_cos": float(best.median()), "max_abs_cos": float(best.max()),
                          "share_pairs_above_bound_100": float((c.abs() > bounds[100]).float().mean())}
        m_k, y_k = maps[torch.as_tensor(keep)], torch.as_tensor(labels[keep])
        det = detected_cosines(head, m_k, y_k, K, pairs, {"EDDP encoders": sets["EDDP encoders"],
                                                          "permuted-label pattern": sets["permuted-label pattern"]})
        detected = {n: {"median_max_abs_cos": float(c.max(1).values.median()), "max_abs_cos": float(c.max()),
                        "pairs_above_bound_100": int((c > bounds[100]).sum())} for n, c in det.items()}
        doc["layers"][layer] = {"D": D, "images": int(len(keep)), "bounds": bounds, "rows": rows,
                                "detected": detected}
        md += [f"## {layer} (D = {D}, {len(keep)} class-balanced images)", "",
               f"Bound on |cos| for a significant pair ({I} × {K} tests, Bonferroni at 0.05): "
               f"{bounds[20]:.3f} with 20 random references, {bounds[100]:.3f} with 100.", "",
               "| directions | median over directions of max_k abs(cos) | largest | share of pairs above the bound (100 refs) |",
               "|---|---|---|---|"]
        md += [f"| {n} | {r['median_max_abs_cos']:.3f} | {r['max_abs_cos']:.3f} | "
               f"{r['share_pairs_above_bound_100']:.3f} |" for n, r in rows.items()]
        md += ["", f"Shift where the detector fires (`shift=\"detected\"`), each direction against its own detector's "
               f"gradients ({I} × {K} pairs):", "",
               "| directions | median over directions of max_k abs(cos) | largest | number of pairs above the bound (100 refs) |",
               "|---|---|---|---|"]
        md += [f"| {n} | {r['median_max_abs_cos']:.3f} | {r['max_abs_cos']:.3f} | {r['pairs_above_bound_100']} |"
               for n, r in detected.items()]
        md.append("")
        print(f"{layer}: bounds {bounds}; " + "; ".join(f"{n} {r['median_max_abs_cos']:.3f} / {r['max_abs_cos']:.3f}"
                                                         for n, r in rows.items()), flush=True)
    doc["wall_s"] = round(time.time() - t0, 1)
    md += [f"Wall {doc['wall_s']:.0f} s. Command: `{doc['command']}`", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "influence_alignment" + (f"_{I}" if I != 16 else "")
    atomic_write_json(args.out / f"{name}.json", doc)
    atomic_write_bytes(args.out / f"{name}.md", "\n".join(md).encode())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
