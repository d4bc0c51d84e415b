"""Capture benchmark: extraction throughput vs a bare forward pass, and EDDP.fit memory vs store size.

Run:  python benchmarks/bench_capture.py            (a few minutes on 2 CPU cores)
      python benchmarks/bench_capture.py --quick    (smaller sizes, for a smoke test)

1. resnet18 (random weights, eval mode) at 64 px and 224 px, layer ``layer4``:
   - bare forward: ``model(x)`` under ``no_grad`` on preprocessed tensors;
   - extract (tensor): :func:`unveil.capture.extract` from the same tensors (capture + float16 shards);
   - extract (folder): from a folder of JPEG files (decode + resize/crop + capture + shards).
   Throughput in images/s (best of 3, interleaved); the ratio is extraction / forward.
2. Peak memory of ``EDDP.fit(store)`` on a store of N and of 10·N images (each fit in a fresh
   process; peak anonymous resident memory above the level before the fit, sampled every 2 ms
   from /proc/self/status; memory-mapped store pages are file-backed and not counted).
   Target: ratio < 1.5.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _featurizer() -> nn.Module:
    """A fixed random conv net whose 'relu' layer gives (64, 8, 8) maps of 32 px images, with a head above."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 64, 4, 4))
    net.add_module("relu", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(64, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


# ------------------------------------------------------------------------------ throughput
def bench_throughput(size: int, n: int, batch: int, tmp: Path, repeats: int = 3) -> dict:
    from PIL import Image

    from unveil.capture import extract
    from unveil.data.images import Preprocessing
    from unveil.models import load_model

    model, _, _ = load_model("resnet18")
    pre = Preprocessing.imagenet(size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    folder = tmp / f"img{size}"
    rng = np.random.default_rng(0)
    src = round(size * 1.25)
    for i in range(n):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (src, src + 16, 3), dtype=np.uint8)).save(
            folder / f"c{i % 2}" / f"{i}.jpg", quality=90)

    def forward():
        with torch.no_grad():
            for i in range(0, n, batch):
                model(x[i:i + batch])

    runs = {"forward": forward,
            "tensor": lambda k: extract(model, "layer4", x, tmp / f"t{size}_{k}", batch_size=batch, dtype="float16"),
            "folder": lambda k: extract(model, "layer4", folder, tmp / f"f{size}_{k}", batch_size=batch,
                                        dtype="float16", preprocessing=pre)}
    forward()  # warm-up
    best = {name: float("inf") for name in runs}
    for k in range(repeats):  # interleaved, best of `repeats`: the machine is shared
        for name, fn in runs.items():
            t = time.perf_counter()
            fn() if name == "forward" else fn(k)
            best[name] = min(best[name], time.perf_counter() - t)
    fwd, ext_tensor, ext_folder = (n / best[k] for k in ("forward", "tensor", "folder"))
    return {"size": size, "n_images": n, "forward_img_s": fwd, "extract_tensor_img_s": ext_tensor,
            "extract_folder_img_s": ext_folder}


# ---------------------------------------------------------------------------------- memory
_CHILD = r"""
import json, resource, sys, threading, time
import torch
torch.set_num_threads(1)
from unveil import EDDP
from unveil.capture import ActivationStore, make_head
sys.path.insert(0, sys.argv[3])
from bench_capture import _featurizer

def anon_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0

store = ActivationStore.open(sys.argv[1])
head = make_head(_featurizer(), "relu", input_size=32)
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.002)
base = anon_kb()
th = threading.Thread(target=sample, daemon=True)
th.start()
t = time.perf_counter()
EDDP(n_concepts=8, steps=json.loads(sys.argv[2]), random_state=0).fit(store, head=head)
secs = time.perf_counter() - t
stop.set(); th.join()
print(json.dumps({"n": len(store), "peak_anon_mb": (max(peak[0], anon_kb()) - base) / 1024, "seconds": secs}))
"""


def bench_memory(n: int, steps: dict, tmp: Path) -> list:
    from unveil.capture import extract

    model = _featurizer()
    out = []
    for k, size in enumerate((n, 10 * n)):
        g = torch.Generator().manual_seed(k)
        x = torch.rand(size, 3, 32, 32, generator=g)
        path = tmp / f"store{size}"
        extract(model, "relu", x, path, batch_size=256, dtype="float16", shard_size=1024)
        del x
        res = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(steps), str(Path(__file__).parent)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"EDDP fit on {size} maps failed:\n{res.stderr[-3000:]}")
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        rec["store_mb"] = sum(f.stat().st_size for f in path.rglob("*.npy")) / 2**20
        out.append(rec)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument("--skip-memory", action="store_true", help="only the throughput part")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for every measurement (default 1: on a shared, oversubscribed "
                         "machine OpenMP spin-waiting makes multi-threaded timings meaningless)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    sizes = [(64, 64 if args.quick else 256, 32), (224, 16 if args.quick else 64, 16)]
    n_mem = 800 if args.quick else 1000  # N·64 positions >= EDDP's max_init_patches (50 000) in both runs
    steps = {"b": 10, "d": 10} if args.quick else {"b": 30, "d": 30}
    results = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results["throughput"] = [bench_throughput(s, n, b, tmp) for s, n, b in sizes]
        if not args.skip_memory:
            try:
                results["memory"] = bench_memory(n_mem, steps, tmp)
            except (ImportError, RuntimeError) as exc:  # EDDP missing or failing: report, keep the rest
                results["memory_error"] = str(exc)[-500:]

    print(f"\n## Extraction throughput (resnet18, layer4, random weights, CPU, {results['torch_threads']} torch "
          f"thread(s), load average {results['load_average'][0]:.1f} on {results['cpu_count']} cores)\n")
    print("| input | images | forward img/s | extract (tensor) img/s | ratio | extract (JPEG folder) img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['size']} px | {r['n_images']} | {r['forward_img_s']:.1f} | {r['extract_tensor_img_s']:.1f} | "
              f"{r['extract_tensor_img_s'] / r['forward_img_s']:.2f} | {r['extract_folder_img_s']:.1f} | "
              f"{r['extract_folder_img_s'] / r['forward_img_s']:.2f} |")
    if "memory" in results:
        a, b = results["memory"]
        print("\n## EDDP.fit peak memory vs store size (64x8x8 maps, 8 concepts, steps "
              f"{steps}, with head)\n")
        print("| maps | store on disk MB | peak anon RSS above start MB | fit seconds |")
        print("|---|---|---|---|")
        for r in (a, b):
            print(f"| {r['n']} | {r['store_mb']:.1f} | {r['peak_anon_mb']:.1f} | {r['seconds']:.1f} |")
        ratio = b["peak_anon_mb"] / max(a["peak_anon_mb"], 1e-9)
        results["memory_ratio"] = ratio
        print(f"\npeak memory ratio 10·N / N = {ratio:.2f} (target < 1.5)")
    elif "memory_error" in results:
        print(f"\nEDDP memory part not run: {results['memory_error']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
