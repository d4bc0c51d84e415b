"""``unveil world``: the procedural concept world (train WorldNet, export to Broden format, show samples)."""
from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("world", help="procedural concept world: train WorldNet, export Broden format, show samples",
                              description="The procedural Broden-like concept world and the WorldNet CNN trained on it.")
    sub = p.add_subparsers(dest="world_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = sub.add_parser("train", help="train WorldNet (reproduces the shipped checkpoints)")
    t.add_argument("--shortcut", action="store_true",
                   help="stamp the 'rook' watermark on every class-0 training image (worldnet-shortcut)")
    t.add_argument("--out", type=Path, default=None,
                   help="checkpoint file (.safetensors; a .json sidecar is written next to it); "
                        "default ./worldnet.safetensors or ./worldnet-shortcut.safetensors")
    t.add_argument("--n-train", type=int, default=6000)
    t.add_argument("--n-test", type=int, default=1000)
    t.add_argument("--epochs", type=int, default=14)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="write a Broden-format copy of the world")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    _data_args(e, n_default=500)
    e.set_defaults(func=_export)

    s = sub.add_parser("show", help="save a grid of sample images with their masks (PNG)")
    s.add_argument("--out", type=Path, required=True, help="output image file (.png)")
    s.add_argument("--rows", type=int, default=6, help="number of images (one per row)")
    _data_args(s, n_default=None)
    s.set_defaults(func=_show)

    st = sub.add_parser("stats", help="print concept frequencies and areas (json)")
    _data_args(st, n_default=700)
    st.set_defaults(func=_stats)


def _data_args(p, n_default) -> None:
    if n_default is not None:
        p.add_argument("--n-images", type=int, default=n_default)
    p.add_argument("--split", default="train", choices=["train", "val", "test", "poisoned_test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--watermark", action="store_true",
                   help="add the shortcut watermark (on every class-0 image; on all other classes' images in poisoned_test)")


def _world(args, n):
    from ..data.world import ConceptWorld
    from ..models.worldnet import SHORTCUT_WATERMARK
    wm = SHORTCUT_WATERMARK if (args.watermark or args.split == "poisoned_test") else None
    return ConceptWorld(n, split=args.split, seed=args.seed, image_size=args.image_size, watermark=wm)


def _train(args) -> int:
    import torch

    from ..models.worldnet import SHORTCUT_WATERMARK, save_worldnet, train_worldnet
    torch.set_num_threads(max(1, args.threads))
    out = args.out or Path("worldnet-shortcut.safetensors" if args.shortcut else "worldnet.safetensors")
    model, metrics = train_worldnet(n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, seed=args.seed,
                                    watermark=SHORTCUT_WATERMARK if args.shortcut else None, progress=True)
    name = "worldnet-shortcut" if args.shortcut else "worldnet"
    command = "unveil world train" + (" --shortcut" if args.shortcut else "")
    save_worldnet(model, out, {"name": name, "metrics": metrics, "command": command,
                               "input": "RGB in [0, 1], not normalised, 64 x 64"})
    keys = ["test_accuracy", "watermarked_test_accuracy", "poisoned_test_accuracy", "poisoned_predicted_as_target",
            "train_accuracy", "train_seconds", "data_seconds", "n_parameters"]
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json')}")
    return 0


def _export(args) -> int:
    from ..data.broden import export_broden
    ds = _world(args, args.n_images)
    export_broden(ds, args.out, progress=True)
    print(f"wrote {len(ds)} images, {len(ds.concepts)} concepts, {len(ds.class_names)} scene classes to {args.out}")
    return 0


def _show(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write_bytes
    from ..data.world import plot_samples
    import io
    ds = _world(args, max(args.rows, 1))
    fig = plot_samples(ds, list(range(max(args.rows, 1))))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}")
    return 0


def _stats(args) -> int:
    from ..data.world import concept_statistics
    ds = _world(args, args.n_images)
    print(json.dumps(concept_statistics(ds), indent=1))
    return 0
