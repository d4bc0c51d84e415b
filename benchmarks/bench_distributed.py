"""Several processes: `unveil extract` and `EDDP.fit` on 1 vs 2 processes (torchrun, gloo, CPU).

Run:  nice python benchmarks/bench_distributed.py            (a few minutes on 2 CPU cores)
      python benchmarks/bench_distributed.py --quick    (smaller sizes, for a smoke test)

Writes ``benchmarks/results/distributed.json`` and ``distributed.md``.

Every configuration is launched as ``python -m torch.distributed.run --standalone --nproc_per_node N
benchmarks/bench_distributed.py --worker ...``, one CPU thread per process (``OMP_NUM_THREADS=1``),
so 2 processes use the machine's 2 cores. Times are measured inside the processes, between two
barriers (process start-up, imports and the rendezvous are not counted; they are a few seconds per
launch, once per job). Peak memory is each process's peak resident set (``ru_maxrss``: torch itself is
about 0.3 GB of it).

On a machine shared with other work, 2 processes do not always get 2 whole cores, so the wall-clock
speed-ups are lower bounds. The CPU time of the busiest process (``time.process_time``, all its
threads, up to the end of its own work) is reported too: it is the wall time the part would take with
a core per process, apart from waiting for each other.

1. extract: resnet18 (random weights) at 64 px, layer ``layer3`` (256 x 4 x 4 maps), a folder of PNG
   images (decode + preprocessing + forward + float16 shards of 32 images).
2. fit: on the store from 1., with the head (URA terms): ``EDDP(n_concepts=8)`` with 30 + 30
   refinement steps; reported separately: one streamed statistics pass over the store (the part of a
   fit that grows with the data: a fit makes 3-4 such passes) and the refinement's time per step
   (fixed in number: it does not grow with the data).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"


# ------------------------------------------------------------------------------------ worker
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _timed(fn):
    import torch.distributed as dist

    from unveil import _distributed as D
    if D.is_distributed():
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    cpu = time.process_time() - c0  # this process's CPU time (all its threads), before waiting for the others
    if D.is_distributed():
        dist.barrier()
    _CPU.append(cpu)
    return out, time.perf_counter() - t0


_CPU: list = []


def _worker(args) -> None:
    import torch

    from unveil import _distributed as D
    torch.set_num_threads(1)
    D.init_from_env(None, 600)
    result = {}
    if args.worker == "extract":
        from unveil.capture import extract
        from unveil.models import load_model, model_source
        model, pre, model_id = load_model("resnet18", image_size=args.size)
        store, seconds = _timed(lambda: extract(model, "layer3", args.images, args.out, batch_size=16, shard_size=32,
                                                preprocessing=pre, model_id=model_id,
                                                model_source=model_source("resnet18", image_size=args.size)))
        result = {"seconds": seconds, "n": len(store)}
    else:
        import sklearn.cluster  # noqa: F401 - imported before the clock starts (k-means)

        from unveil import EDDP
        from unveil._validation import make_generator
        from unveil.capture import ActivationStore, head_for_store
        from unveil.directions.eddp._source import _RankSource
        from unveil.directions.eddp.statistics import _stream_stats
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (seconds)
        store = ActivationStore.open(args.out)
        head = head_for_store(store)
        est = EDDP(n_concepts=8, random_state=0, steps={"b": args.steps, "d": args.steps})
        source = _RankSource(store) if D.is_distributed() else store
        _, stats_s = _timed(lambda: _stream_stats(source, est._batch_maps(store), 20_000, make_generator(0),
                                                  torch.device("cpu")))
        est, seconds = _timed(lambda: est.fit(store, head=head))
        steps = sum(est.history_[p]["steps_run"][0] for p in ("b", "d"))
        H, W = store.map_shape
        result = {"seconds": seconds, "stats_pass_seconds": stats_s, "n": len(store), "patches": len(store) * H * W,
                  "steps": steps, "world_size_meta": est.pairs_.meta["world_size"],
                  "stage_seconds": est.history_.get("stage_seconds")}
    rss = D.all_gather_object(_peak_rss_mb(), "gathering the peak memory")
    cpu = D.all_gather_object(list(_CPU), "gathering the CPU times")
    if D.rank() == 0:
        # cpu_seconds[r] = rank r's CPU time of each timed part (extract; or stats pass, fit)
        result.update(world_size=D.world_size(), peak_rss_mb=rss, cpu_seconds=cpu)
        Path(args.result).write_text(json.dumps(result))
    D.shutdown()


# ------------------------------------------------------------------------------------ driver
def _make_images(folder: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(4):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"c{i % 4}" / f"{i}.png")


def _launch(nproc: int, worker_args: list, result: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", UNVEIL_DIST_TIMEOUT="600")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(HERE),
           *worker_args, "--result", str(result)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(cmd)}):\n{run.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["launch_wall_seconds"] = wall
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", choices=["extract", "fit"], help=argparse.SUPPRESS)
    p.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args)

    n_images, steps, repeats = (64, 10, 1) if args.quick else (1536, 30, 2)
    load_start = list(os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="unveil_bench_dist_"))
    try:
        _make_images(tmp / "images", n_images, 72)
        runs = []
        for rep in range(repeats):
            for nproc in (1, 2):  # interleaved, so a change in the machine's load hits both
                out = tmp / f"store_{nproc}_{rep}"
                r = _launch(nproc, ["--worker", "extract", "--images", str(tmp / "images"), "--out", str(out)],
                            tmp / "r.json")
                runs.append({"task": "extract", "nproc": nproc, "repeat": rep, **r})
                print(f"extract, {nproc} process(es): {r['n'] / r['seconds']:.1f} images/s", flush=True)
        store = tmp / "store_1_0"
        for rep in range(repeats):
            for nproc in (1, 2):
                r = _launch(nproc, ["--worker", "fit", "--out", str(store), "--steps", str(steps)], tmp / "r.json")
                runs.append({"task": "fit", "nproc": nproc, "repeat": rep, **r})
                print(f"fit, {nproc} process(es): {r['seconds']:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def best(task, nproc, key):
        return min(r[key] for r in runs if r["task"] == task and r["nproc"] == nproc)

    def peak(task, nproc):
        return max(max(r["peak_rss_mb"]) for r in runs if r["task"] == task and r["nproc"] == nproc)

    fit_any = next(r for r in runs if r["task"] == "fit")

    def busiest_cpu(task, nproc, part):  # the CPU time of the busiest rank: the wall time on dedicated cores
        return min(max(c[part] for c in r["cpu_seconds"]) for r in runs if r["task"] == task and r["nproc"] == nproc)

    summary = {}
    for nproc in (1, 2):
        ext_s = best("extract", nproc, "seconds")
        stats_s = best("fit", nproc, "stats_pass_seconds")
        fit_s = best("fit", nproc, "seconds")
        summary[str(nproc)] = {
            "extract_images_per_s": n_images / ext_s,
            "stats_pass_patches_per_s": fit_any["patches"] / stats_s,
            "fit_seconds": fit_s,
            "refinement_seconds_per_step": min(r["stage_seconds"]["refinement"] / r["steps"] for r in runs
                                               if r["task"] == "fit" and r["nproc"] == nproc and r["stage_seconds"]),
            "extract_images_per_cpu_s_busiest_rank": n_images / busiest_cpu("extract", nproc, 0),
            "stats_pass_patches_per_cpu_s_busiest_rank": fit_any["patches"] / busiest_cpu("fit", nproc, 0),
            "fit_cpu_seconds_busiest_rank": busiest_cpu("fit", nproc, 1),
            "extract_peak_rss_mb_per_rank": peak("extract", nproc),
            "fit_peak_rss_mb_per_rank": peak("fit", nproc),
        }
    doc = {
        "benchmark": "distributed",
        "command": "python benchmarks/bench_distributed.py" + (" --quick" if args.quick else ""),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg())},
        "settings": {"model": "resnet18 (random weights)", "image_size": 64, "layer": "layer3",
                     "map": "256x4x4", "images": n_images, "batch_size": 16, "shard_size": 32,
                     "fit": {"n_concepts": 8, "steps": {"b": steps, "d": steps}, "head": True},
                     "threads_per_process": 1, "backend": "gloo", "repeats": repeats, "reported": "best of repeats"},
        "summary": summary, "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(doc, indent=2) + "\n")
    s1, s2 = summary["1"], summary["2"]
    rows = [
        ("extract: images/s", f"{s1['extract_images_per_s']:.1f}", f"{s2['extract_images_per_s']:.1f}",
         f"{s2['extract_images_per_s'] / s1['extract_images_per_s']:.2f}x"),
        ("fit: one streamed pass, patches/s", f"{s1['stats_pass_patches_per_s']:,.0f}",
         f"{s2['stats_pass_patches_per_s']:,.0f}",
         f"{s2['stats_pass_patches_per_s'] / s1['stats_pass_patches_per_s']:.2f}x"),
        (f"fit: whole fit ({2 * steps} steps), s", f"{s1['fit_seconds']:.1f}", f"{s2['fit_seconds']:.1f}",
         f"{s1['fit_seconds'] / s2['fit_seconds']:.2f}x"),
        ("extract: images per CPU-second of the busiest process", f"{s1['extract_images_per_cpu_s_busiest_rank']:.1f}",
         f"{s2['extract_images_per_cpu_s_busiest_rank']:.1f}",
         f"{s2['extract_images_per_cpu_s_busiest_rank'] / s1['extract_images_per_cpu_s_busiest_rank']:.2f}x"),
        ("fit: streamed pass, patches per CPU-second of the busiest process",
         f"{s1['stats_pass_patches_per_cpu_s_busiest_rank']:,.0f}",
         f"{s2['stats_pass_patches_per_cpu_s_busiest_rank']:,.0f}",
         f"{s2['stats_pass_patches_per_cpu_s_busiest_rank'] / s1['stats_pass_patches_per_cpu_s_busiest_rank']:.2f}x"),
        ("fit: whole fit, CPU-seconds of the busiest process", f"{s1['fit_cpu_seconds_busiest_rank']:.1f}",
         f"{s2['fit_cpu_seconds_busiest_rank']:.1f}",
         f"{s1['fit_cpu_seconds_busiest_rank'] / s2['fit_cpu_seconds_busiest_rank']:.2f}x"),
        ("fit: refinement, s per step", f"{s1['refinement_seconds_per_step']:.2f}",
         f"{s2['refinement_seconds_per_step']:.2f}",
         f"{s1['refinement_seconds_per_step'] / s2['refinement_seconds_per_step']:.2f}x"),
        ("extract: peak RSS per process, MB", f"{s1['extract_peak_rss_mb_per_rank']:.0f}",
         f"{s2['extract_peak_rss_mb_per_rank']:.0f}", ""),
        ("fit: peak RSS per process, MB", f"{s1['fit_peak_rss_mb_per_rank']:.0f}",
         f"{s2['fit_peak_rss_mb_per_rank']:.0f}", ""),
    ]
    md = ["# 1 vs 2 processes (torchrun, gloo, one CPU thread each)", "",
          f"`{doc['command']}`; {n_images} images, resnet18 at 64 px, layer3 (256x4x4), best of {repeats}; "
          f"{os.cpu_count()} CPU cores shared with other work (load average {load_start[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end).", "",
          "| | 1 process | 2 processes | speed-up |", "|---|---:|---:|---:|"]
    md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    (RESULTS / "distributed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
