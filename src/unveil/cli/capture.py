"""``unveil layers`` / ``unveil extract`` / ``unveil fit``: the model side of the command line."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("layers", help="list a model's layers with their output shapes",
                              description="List the layers (dotted module names) of a model, the shape of each "
                                          "layer's output for one image, and whether a head can be cut there.")
    _model_args(p)
    p.add_argument("--input-size", type=int, default=None,
                   help="side of the square probe image (default: the model's input size)")
    p.add_argument("--all", action="store_true", help="also list layers the probe forward does not reach")
    p.set_defaults(func=_layers)

    e = subparsers.add_parser("extract", help="capture a layer's feature maps over an image folder into a store",
                              description="Run the model over a folder of images (recursive; class sub-folders "
                                          "become labels) and store the layer's feature maps as memory-mapped "
                                          "shards. Re-running the same command resumes an interrupted extraction.")
    _model_args(e)
    e.add_argument("--layer", required=True, help="dotted layer name (see `unveil layers`)")
    e.add_argument("--images", required=True, type=Path, help="image folder (.jpg .jpeg .png .webp .bmp)")
    e.add_argument("--out", required=True, type=Path, help="store folder to write")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage dtype")
    e.add_argument("--subsample", type=int, default=None, metavar="K",
                   help="keep K random positions per image (maps stored as (D, K, 1); fit then runs without head)")
    e.add_argument("--shard-size", type=int, default=256, help="images per shard (the unit of resumption)")
    e.add_argument("--tokens", choices=["patches", "all"], default="patches",
                   help="ViT layers: drop the CLS/prefix tokens and use the patch grid, or keep every token")
    e.add_argument("--seed", type=int, default=0, help="seed of --subsample")
    e.add_argument("--device", default=None, help="torch device to run the model on (default: cpu)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a different extraction found in --out (only the store's own files are deleted)")
    _dist_args(e)
    e.set_defaults(func=_extract)

    f = subparsers.add_parser("fit", help="learn direction pairs (EDDP) from an activation store",
                              description="Fit EDDP on a store made by `unveil extract`; the head (the network "
                                          "above the layer) is rebuilt from the store's model and layer.")
    f.add_argument("store", type=Path, help="activation store folder")
    f.add_argument("--concepts", type=int, required=True, metavar="I", help="number of concepts")
    f.add_argument("--levels", default=None, metavar="SIZES",
                   help="concepts at several granularities: 'auto' or comma-separated level sizes summing to "
                        "--concepts, the finest last (default: one level)")
    f.add_argument("--out", type=Path, required=True, help="folder to save the direction pairs in")
    f.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply the optimisation steps of every phase (e.g. 0.2 for a quick look)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default=None, help="torch device (default: cpu)")
    f.add_argument("--no-head", action="store_true", help="fit without the head (no URA terms)")
    f.add_argument("--model", default=None,
                   help="the store's model, named again: needed for package.module:factory models (unveil never "
                        "imports code named in a store's files); checked against the store")
    f.add_argument("--weights", type=Path, default=None,
                   help="the weights file the store was extracted with (checked against its recorded sha256)")
    f.add_argument("--overwrite", action="store_true", help="replace direction pairs already saved in --out")
    _dist_args(f)
    f.set_defaults(func=_fit)


def _dist_args(p) -> None:
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others before it gives up with an error "
                        "(default: $UNVEIL_DIST_TIMEOUT or 300)")


def _distributed(func):
    """Run a command in every process of a torchrun launch: join the process group first (``--device
    cuda`` becomes ``cuda:LOCAL_RANK``), leave it after. An error that another process reported (and
    prints itself) ends this one quietly with exit code 1, so a failure is printed once."""
    import functools

    @functools.wraps(func)
    def run(args) -> int:
        from .. import _distributed as D
        from .._device import check_device
        from .._errors import UnveilError
        args.device = check_device(D.rank_device(args.device), "--device")  # before choosing NCCL for it
        owned = D.init_from_env(args.device, args.dist_timeout)
        ok = False
        try:
            code = func(args)
            ok = True
            return code
        except UnveilError as exc:
            if getattr(exc, "mirrored", False):
                return 1
            raise
        finally:
            if owned:
                D.shutdown(sync=ok)
    return run


def _model_args(p) -> None:
    p.add_argument("--model", required=True,
                   help="resnet18, efficientnet-lite0, vit-tiny, worldnet, worldnet-shortcut or package.module:factory")
    p.add_argument("--weights", type=Path, default=None, help=".safetensors or torch state_dict file to load")
    p.add_argument("--image-size", type=int, default=None, help="input image size (default: the model's)")


def _load(args):
    from .._device import check_device
    from .._validation import check_input_size
    from ..models import load_model, model_source
    device = check_device(getattr(args, "device", None), "--device")
    options = {} if args.image_size is None else {"image_size": check_input_size(args.image_size, "--image-size")}
    model, pre, model_id = load_model(args.model, weights=args.weights, **options)
    if device is not None:
        model.to(device)  # our own freshly loaded model, not a user's object
    return model, pre, model_id, model_source(args.model, args.weights, **options)


def _layers(args) -> int:
    from ..capture import list_layers
    from .._validation import check_input_size
    model, pre, model_id, _ = _load(args)
    size = pre.size if args.input_size is None else check_input_size(args.input_size, "--input-size")
    infos = list_layers(model, size)
    rows = [(i.name, i.type, "x".join(str(v) for v in i.shape[1:]) if i.shape else "-",
             {True: "yes", False: "no", None: "?"}[i.cut]) for i in infos if args.all or i.shape]
    w = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(("layer", "type", "output", "head"))]
    print(f"{model_id}: {len(infos)} layers, output shapes for one {size}x{size} image "
          f"('head': whether `unveil fit` can use the network above the layer)")
    print("  ".join(h.ljust(w[k]) for k, h in enumerate(("layer", "type", "output", "head"))))
    for r in rows:
        print("  ".join(c.ljust(w[k]) for k, c in enumerate(r)))
    return 0


@_distributed
def _extract(args) -> int:
    from .. import _distributed as D
    from ..capture import extract
    model, pre, model_id, source = _load(args)
    store = extract(model, args.layer, args.images, args.out, batch_size=args.batch_size, dtype=args.dtype,
                    shard_size=args.shard_size, subsample=args.subsample, seed=args.seed, progress=True,
                    model_id=model_id, model_source=source, preprocessing=pre, tokens=args.tokens,
                    overwrite=args.overwrite)
    if D.rank() != 0:
        return 0
    m = store.manifest
    shape = "x".join(str(v) for v in (store.n_features, *store.map_shape))
    print(f"stored {len(store)} maps ({shape}, {m['dtype']}) of {model_id} layer {args.layer!r} in {args.out}"
          + (f"; {m['n_skipped']} file(s) skipped (listed in manifest.json)" if m["n_skipped"] else "")
          + (f"; {len(store.class_names)} classes" if store.class_names else ""))
    return 0


def parse_levels(text):
    """``--levels``: None, 'auto', 'none' or comma-separated ints."""
    from .._errors import ValidationError
    if text is None or text.lower() == "none":
        return None
    if text == "auto":
        return "auto"
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValidationError(f"--levels must be 'auto', 'none' or comma-separated sizes such as 4,8,20; "
                              f"got {text!r}.") from None


@_distributed
def _fit(args) -> int:
    import math

    from ..directions import EDDP
    from .. import _distributed as D
    from .._device import check_device
    from .._errors import OutputExistsError, ValidationError
    from .._io import _is_ours
    from ..capture import ActivationStore, head_for_store
    if not (math.isfinite(args.epochs_scale) and 0 < args.epochs_scale <= 1000):
        raise ValidationError(f"--epochs-scale must be a finite number in (0, 1000], got {args.epochs_scale}.")
    device = check_device(args.device, "--device")
    lead = D.rank() == 0  # under torchrun every process fits; only rank 0 prints and writes

    def check_out():
        if (args.out / "pairs.json").exists() and _is_ours(args.out / "pairs.json", "pairs") and not args.overwrite:
            # checked before the fit, so a long fit never ends in a refusal to save
            raise OutputExistsError(f"{str(args.out)!r} already holds saved direction pairs; pass --overwrite to "
                                    f"replace them, or choose another --out.")
    D.on_rank0(check_out, "checking --out")
    store = ActivationStore.open(args.store)
    head = None
    if args.no_head:
        if lead:
            print("fitting without a head (--no-head): no URA terms")
    elif store.subsampled:
        if lead:
            print(f"the store is subsampled ({store.manifest.get('subsample')} positions per image): fitting "
                  f"without a head (no URA terms)")
    else:
        head = head_for_store(store, model_name=args.model, weights=args.weights)
    est = EDDP(n_concepts=args.concepts, random_state=args.seed, progress=lead,
               device=None if device is None else str(device),
               levels=parse_levels(args.levels))
    est.resolved_levels()  # a bad --levels fails here, before any work
    if args.epochs_scale != 1.0:
        defaults = est.resolved_steps()
        est.steps = {k: int(round(v * args.epochs_scale)) for k, v in defaults.items()}
    est.fit(store, head=head)
    pairs = est.pairs_.with_meta({"model_id": store.model_id, "layer": store.layer,
                                  "store": str(Path(args.store).resolve()),
                                  "store_plan_id": store.manifest.get("plan_id"), "seed": args.seed,
                                  "head": head is not None})
    D.on_rank0(lambda: pairs.save(args.out, overwrite=args.overwrite), "saving the direction pairs")
    if not lead:
        return 0
    print(f"saved {pairs.n_concepts} direction pairs (D = {pairs.n_features}, layer {store.layer!r}) to {args.out}")
    return 0
