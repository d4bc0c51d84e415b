"""``unveil world``: the procedural concept world (train WorldNet, export to Broden format, show samples)."""
from __future__ import annotations

import json
from pathlib import Path

MAX_ROWS = 100  # `world show`: one row is one image and its mask panels; more make an unreadable figure


def _check_data_args(args) -> None:
    """Refuse bad numbers with one line before any work is done."""
    from .._validation import check_input_size, check_positive_int
    if getattr(args, "n_images", None) is not None:
        check_positive_int(args.n_images, "--n-images")
    check_positive_int(args.seed, "--seed", minimum=0)
    check_input_size(args.image_size, "--image-size")


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
    e.add_argument("--out", type=Path, required=True,
                   help="output folder (new or empty; an earlier export only with --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier `unveil world export` in --out")
    _data_args(e, n_default=500)
    e.set_defaults(func=_export)

    s = sub.add_parser("show", help="save a grid of sample images with their masks (PNG)")
    s.add_argument("--out", type=Path, required=True, help="output image file (.png)")
    s.add_argument("--rows", type=int, default=6, help=f"number of images (one per row, at most {MAX_ROWS})")
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

    from .._errors import ValidationError
    from .._validation import check_positive_int
    from ..models.worldnet import SHORTCUT_WATERMARK, save_worldnet, train_worldnet
    for flag, value, low in (("--n-train", args.n_train, 1), ("--n-test", args.n_test, 1),
                             ("--epochs", args.epochs, 1), ("--seed", args.seed, 0), ("--threads", args.threads, 1)):
        check_positive_int(value, flag, minimum=low)
    out = args.out or Path("worldnet-shortcut.safetensors" if args.shortcut else "worldnet.safetensors")
    if out.suffix != ".safetensors" or out.is_dir():
        what = " (an existing folder)" if out.is_dir() else ""
        raise ValidationError(f"--out must be a checkpoint file path ending in .safetensors, got {str(out)!r}{what}; "
                              f"for example --out worldnet.safetensors.")
    torch.set_num_threads(args.threads)
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
    _check_data_args(args)
    ds = _world(args, args.n_images)
    export_broden(ds, args.out, progress=True, overwrite=args.overwrite)
    print(f"wrote {len(ds)} images, {len(ds.concepts)} concepts, {len(ds.class_names)} scene classes to {args.out}")
    return 0


def _show(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._errors import OutputExistsError, ValidationError
    from .._io import atomic_write_bytes
    from .._validation import check_positive_int
    from ..data.world import plot_samples
    import io
    _check_data_args(args)
    check_positive_int(args.rows, "--rows")
    if args.rows > MAX_ROWS:
        raise ValidationError(f"--rows must be at most {MAX_ROWS} (one image per row), got {args.rows}.")
    if args.out.suffix.lower() != ".png":
        raise ValidationError(f"--out must be a file name ending in .png (the grid is written as PNG), got "
                              f"{str(args.out)!r}.")
    if args.out.is_dir():
        raise OutputExistsError(f"--out {str(args.out)!r} is an existing folder; pass a file path such as "
                                f"{str(args.out / 'samples.png')!r}.")
    ds = _world(args, args.rows)
    fig = plot_samples(ds, list(range(args.rows)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}")
    return 0


def _stats(args) -> int:
    from ..data.world import concept_statistics
    _check_data_args(args)
    ds = _world(args, args.n_images)
    print(json.dumps(concept_statistics(ds), indent=1))
    return 0
