"""A few minutes on a CUDA machine: does EDDP give the same answer on the GPU, and how fast is it at scale?

1. The paper recipe (seed 0) fitted on the CPU and on CUDA: matched IoU / RMSE of each, and the
   share of patches on which the two fits' detections agree.
2. The ``scale`` setting (D = 512, I = 64, 32 distractors) at growing numbers of patches: EDDP's
   fit seconds on CUDA (per stage), matched IoU, encoding cosine, and the supervised ceiling's IoU
   on the smallest size (fitted on the GPU too).
3. ``unveil extract``/``unveil fit`` device plumbing: ``check_device("cuda")`` and a store fitted
   with ``device="cuda"`` (the head follows the data).

Writes ``OUT/gpu_check.json`` (``$OUT`` when set, else ``benchmarks/results``) and prints a table.
Each part is guarded: a failure is recorded, the next part still runs. ``--budget`` (seconds) stops
the size sweep before it would overrun.

    python benchmarks/gpu_check.py --budget 270
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch


def _paper(device: str) -> dict:
    from unveil import EDDP
    from unveil.data.synthetic import make_synthetic, train_head
    from unveil.evaluate.recovery import score_pairs

    data = make_synthetic(random_state=0)
    head, acc = train_head(data, epochs=300, random_state=0)
    out = {"head_accuracy": acc}
    dets = {}
    for dev in ("cpu", device):
        t = time.perf_counter()
        est = EDDP(n_concepts=3, random_state=0, device=dev).fit(data.X.to(dev), head=head)
        if dev != "cpu":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        rep = score_pairs(est.pairs_.to("cpu"), data)
        out[dev] = {"seconds": sec, "mean_iou": rep.mean_iou, "rmse": rep.rmse_overall,
                    "encoder_cosine": rep.mean_encoder_cosine}
        dets[dev] = est.pairs_.to("cpu").detect(data.X) > 0.5
    out["detection_agreement"] = float((dets["cpu"] == dets[device]).float().mean())
    return out


def _scale(device: str, sizes, n_concepts: int, budget: float, t0: float) -> list:
    from unveil import EDDP
    from unveil.experiments.synthetic import SupervisedCeiling, _make_data
    from unveil.evaluate.recovery import score_pairs

    rows = []
    for k, n in enumerate(sizes):
        left = budget - (time.perf_counter() - t0)
        if rows and left < 3 * rows[-1]["wall_seconds"]:
            rows.append({"patches": n, "skipped": f"{left:.0f} s of budget left"})
            break
        w0 = time.perf_counter()
        data = _make_data("scale", 0, False, n_concepts, patches=n)
        X = data.X.to(device)
        torch.cuda.synchronize()
        row = {"patches": int(X.shape[0] * X.shape[2] * X.shape[3]), "data_seconds": time.perf_counter() - w0}
        t = time.perf_counter()
        est = EDDP(n_concepts=n_concepts, random_state=0, device=device).fit(X)
        torch.cuda.synchronize()
        row["fit_seconds"] = time.perf_counter() - t
        row["stage_seconds"] = est.history_.get("stage_seconds")
        rep = score_pairs(est.pairs_.to("cpu"), data)
        row.update(mean_iou=rep.mean_iou, encoder_cosine=rep.mean_encoder_cosine)
        if k == 0:
            t = time.perf_counter()
            ceil = SupervisedCeiling(n_concepts).fit(X, data.concept[:, None, :].to(device))
            row["ceiling_seconds"] = time.perf_counter() - t
            row["ceiling_iou"] = score_pairs(ceil.pairs_.to("cpu"), data).mean_iou
        row["wall_seconds"] = time.perf_counter() - w0
        rows.append(row)
        print(json.dumps(row), flush=True)
        del X, data
        torch.cuda.empty_cache()
    return rows


def _plumbing(device: str) -> dict:
    from unveil import EDDP
    from unveil._device import check_device
    from unveil.data.synthetic import make_synthetic, train_head

    dev = check_device(device)
    data = make_synthetic(random_state=1, n_per_class=200)
    head, _ = train_head(data, epochs=100, random_state=1)  # on the CPU: the fit copies it to the data's device
    est = EDDP(n_concepts=3, random_state=0, device=device).fit(data.X, head=head)
    return {"device": str(dev), "fit_from_cpu_data_and_cpu_head": True,
            "pairs_device": str(est.pairs_.decoders.device)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    ap.add_argument("--concepts", type=int, default=64)
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole check")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out_dir = Path(os.environ.get("OUT") or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; run it on a machine with a GPU.", file=sys.stderr)
        return 1
    res = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    for name, fn in (("plumbing", lambda: _plumbing(args.device)), ("paper", lambda: _paper(args.device)),
                     ("scale", lambda: _scale(args.device, args.sizes, args.concepts, args.budget, t0))):
        try:
            res[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on to the next part
            res[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        print(name, json.dumps(res[name], indent=1, default=str)[:3000], flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    res["seconds"] = time.perf_counter() - t0
    (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out_dir / 'gpu_check.json'} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
