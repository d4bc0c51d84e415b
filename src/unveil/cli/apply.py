"""``unveil explain`` and ``unveil correct``: apply direction pairs to a model."""
from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    e = subparsers.add_parser("explain", help="explain predictions with concepts (PNG + json per image)",
                              description="For each image: the prediction, the concept detectors' maps and each "
                                          "concept's contribution (the change of the predicted class's logit when "
                                          "the concept is removed at the layer with its signal vector).")
    e.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    _model_args(e)
    e.add_argument("--top-k", type=int, default=5, help="number of concepts listed per image")
    e.add_argument("--strength", type=float, default=None,
                   help="removal strength k (default: each position's own signal value)")
    e.add_argument("--out", type=Path, required=True, help="output folder (<image stem>.png and .json)")
    e.set_defaults(func=_explain)

    c = subparsers.add_parser("correct", help="remove concepts (e.g. a shortcut) from a model at a layer",
                              description="Save a correction: the model with the given concepts removed at the "
                                          "layer (x' = ReLU(x - m*k*v) on every forward; v is each detector's mean "
                                          "difference by default). k is --strength, or is chosen on held-out data "
                                          "with --choose-on, or (neither) what the detector reads at each position. "
                                          "Load it with CorrectedModel.load(DIR, model).")
    _model_args(c)
    c.add_argument("--concepts", type=int, nargs="+", required=True, metavar="I", help="concept indices to remove")
    c.add_argument("--out", type=Path, required=True, help="folder to save the correction in")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--strength", type=float, default=None, help="removal strength k (layer units)")
    g.add_argument("--choose-on", type=Path, default=None, metavar="DIR",
                   help="held-out image folder with class sub-folders (e.g. a poisoned split): k maximises its "
                        "accuracy")
    c.add_argument("--clean", type=Path, default=None, metavar="DIR",
                   help="clean held-out image folder (class sub-folders): with --choose-on, clean accuracy may "
                        "drop by at most --max-clean-drop")
    c.add_argument("--max-clean-drop", type=float, default=0.005, help="allowed clean accuracy drop (default 0.005)")
    c.add_argument("--select", action="store_true",
                   help="with --choose-on: keep only those of --concepts (taken in the order given, best first) "
                        "whose removal raises the held-out accuracy; k is chosen for the kept ones")
    c.add_argument("--direction", choices=("mean-difference", "signal", "filter"), default="mean-difference",
                   help="edit direction: each detector's mean difference (default: mean of the positions it fires at "
                        "minus the others', measured on --reference, else on the --choose-on and --clean images), "
                        "the signal vector, or the filter")
    c.add_argument("--reference", type=Path, default=None, metavar="DIR",
                   help="image folder (class sub-folders not needed) where the concepts occur, to measure the mean "
                        "difference on (default: the --choose-on and --clean images)")
    c.set_defaults(func=_correct)


def _model_args(p) -> None:
    from .capture import _model_args as model_options
    model_options(p)
    p.add_argument("--layer", required=True, help="the layer the pairs were fitted on")
    p.add_argument("--pairs", type=Path, required=True, help="direction pairs folder (from `unveil fit`)")
    p.add_argument("--batch-size", type=int, default=32)


def _check_args(args) -> None:
    """Refuse bad numbers with one line before the model is loaded."""
    from .._validation import check_in_range, check_input_size, check_positive_int
    check_positive_int(args.batch_size, "--batch-size")
    if args.image_size is not None:
        check_input_size(args.image_size, "--image-size")
    if getattr(args, "top_k", None) is not None:
        check_positive_int(args.top_k, "--top-k")
    if args.strength is not None:
        check_in_range(args.strength, "--strength", low=0.0)
    for c in getattr(args, "concepts", None) or []:
        check_positive_int(c, "--concepts (each index)", minimum=0)
    if getattr(args, "max_clean_drop", None) is not None:
        check_in_range(args.max_clean_drop, "--max-clean-drop", low=0.0, high=1.0)


def _load(args):
    from ..directions.pairs import DirectionPairs
    from ..models import load_model
    _check_args(args)
    options = {} if args.image_size is None else {"image_size": args.image_size}
    model, pre, model_id = load_model(args.model, weights=args.weights, **options)
    pairs = DirectionPairs.load(args.pairs)
    return model, pre, model_id, pairs


def _class_names(model_name: str):
    """Class names of the shipped world models (None for others)."""
    if model_name in ("worldnet", "worldnet-shortcut"):
        from ..data.world import CLASS_RULES
        return [name for name, _, _ in CLASS_RULES]
    return None


def _explain(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import io

    from .._errors import OutputExistsError, ValidationError
    from .._io import atomic_write_bytes, atomic_write_json
    from ..data.images import load_image
    from ..explain import explain, plot_explanation
    if args.out.exists() and not args.out.is_dir():
        raise OutputExistsError(f"--out {str(args.out)!r} exists and is not a folder; pass a folder path (it is "
                                f"created if missing).")
    model, pre, model_id, pairs = _load(args)
    tensors = []
    for path in args.images:
        try:
            tensors.append(load_image(path, pre))
        except ValidationError:  # too large to decode (the message names the file)
            raise
        except (OSError, ValueError) as exc:
            raise ValidationError(f"cannot read image {str(path)!r} ({type(exc).__name__}: {exc}); pass image "
                                  f"files (.jpg, .png, ...).") from None
    stems = [p.stem for p in args.images]
    if len(set(stems)) != len(stems):
        stems = [f"{k:03d}_{s}" for k, s in enumerate(stems)]
    images = torch.stack(tensors)
    expls = explain(model, args.layer, pairs, images, top_k=args.top_k, remove_strength=args.strength,
                    batch_size=args.batch_size, class_names=_class_names(args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    for path, stem, img, ex in zip(args.images, stems, images, expls):
        fig, ax = plt.subplots(figsize=(3.2, 3.8))
        plot_explanation(ex, img, ax=ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        atomic_write_bytes(args.out / f"{stem}.png", buf.getvalue())
        doc = {"image": str(path), "model": model_id, "layer": args.layer, "pairs": str(args.pairs), **ex.to_dict()}
        atomic_write_json(args.out / f"{stem}.json", doc)
        top = ", ".join(f"{ex.names[i]} {float(ex.contributions[i]):+.2f}" for i in ex.top[:3])
        label = ex.class_name if ex.class_name is not None else f"class {ex.predicted}"
        print(f"{path}: {label} (p = {float(ex.probs[ex.predicted]):.2f}); top concepts: {top}")
    print(f"wrote {len(expls)} explanation(s) (.png + .json) to {args.out}")
    return 0


def _folder(path, pre, class_names):
    """Images and labels of a folder with class sub-folders (names matched to the model's classes)."""
    import numpy as np

    from .._errors import ValidationError
    from ..data.images import load_batch, scan_images
    folder = scan_images(path)
    if folder.class_names is None:
        raise ValidationError(f"{str(path)!r} has no class sub-folders; put the images in one sub-folder per class "
                              f"(named by class index 0, 1, ... or by class name).")
    mapping = {}
    for name in folder.class_names:
        if name.isdigit():
            mapping[name] = int(name)
        elif class_names is not None and name in class_names:
            mapping[name] = class_names.index(name)
        else:
            known = f" or one of {class_names}" if class_names else ""
            raise ValidationError(f"class sub-folder {name!r} of {str(path)!r} is not a class index{known}; name the "
                                  f"sub-folders by the model's class indices.")
    images, kept, skipped = load_batch(folder, range(len(folder)), pre)
    if not kept:
        raise ValidationError(f"no readable images in {str(path)!r}.")
    labels = np.array([mapping[folder.class_names[folder.labels[i]]] for i in kept], dtype=np.int64)
    return images, labels


def _plain_folder(path, pre):
    """The images of a folder, with or without class sub-folders."""
    from .._errors import ValidationError
    from ..data.images import load_batch, scan_images
    folder = scan_images(path)
    images, kept, _ = load_batch(folder, range(len(folder)), pre)
    if not kept:
        raise ValidationError(f"no readable images in {str(path)!r}.")
    return images


def _mean_difference(model, args, pairs, images):
    import torch

    from .._errors import ValidationError
    from ..capture import capture
    from ..edit import mean_difference_directions
    maps = capture(model, args.layer, images, batch_size=args.batch_size)
    V = mean_difference_directions(maps, pairs, args.concepts)
    bad = [c for c, ok in zip(args.concepts, torch.isfinite(V).all(1).tolist()) if not ok]
    if bad:
        where = "--reference" if args.reference is not None else "--choose-on"
        raise ValidationError(f"concepts {bad} are detected at no position (or at every position) of the {where} "
                              f"images, so their mean difference is undefined; use images where they occur, or "
                              f"--direction signal.")
    return V


def _correct(args) -> int:
    import torch

    from .._errors import ValidationError
    from ..edit import CorrectedModel, choose_concepts, choose_strength
    _check_args(args)  # bad numbers first, before the combination of options
    if args.select and args.choose_on is None:
        raise ValidationError("--select chooses concepts on held-out images: pass --choose-on DIR.")
    if args.direction == "mean-difference" and args.choose_on is None and args.reference is None:
        raise ValidationError("--direction mean-difference (the default) is measured on images where the concepts "
                              "occur: pass --choose-on DIR (held-out images) or --reference DIR, or use --direction "
                              "signal.")
    if args.reference is not None and args.direction != "mean-difference":
        raise ValidationError(f"--reference is used to measure the mean difference only; drop it or use --direction "
                              f"mean-difference (got --direction {args.direction}).")
    model, pre, model_id, pairs = _load(args)
    strength = args.strength
    choice = steps = None
    direction = args.direction
    concepts = list(args.concepts)
    if direction == "mean-difference" and args.reference is not None:
        direction = _mean_difference(model, args, pairs, _plain_folder(args.reference, pre))
    if args.choose_on is not None:
        names = _class_names(args.model)
        x, y = _folder(args.choose_on, pre, names)
        xc = yc = None
        if args.clean is not None:
            xc, yc = _folder(args.clean, pre, names)
        if isinstance(direction, str) and direction == "mean-difference":
            direction = _mean_difference(model, args, pairs, x if xc is None else torch.cat([x, xc]))
        if args.select:
            sel = choose_concepts(model, args.layer, pairs, concepts, x, y, xc, yc, direction=direction,
                                  max_clean_drop=args.max_clean_drop, batch_size=args.batch_size)
            if not isinstance(direction, str):
                direction = direction[[concepts.index(c) for c in sel.concepts]]
            concepts, choice, steps = sel.concepts, sel.choice, sel.steps
        else:
            choice = choose_strength(model, args.layer, pairs, concepts, x, y, xc, yc, direction=direction,
                                     max_clean_drop=args.max_clean_drop, batch_size=args.batch_size)
        strength = choice.strength
    fixed = CorrectedModel(model, args.layer, pairs, concepts, strength, model_id=model_id, direction=direction,
                           direction_name=args.direction.replace("-", "_"))
    fixed.save(args.out)
    if choice is not None:
        doc = {**choice.to_dict(), "direction": args.direction.replace("-", "_")}
        if steps is not None:
            doc["selection"] = steps  # per candidate: held-out accuracy with it added, and whether it was kept
        print(json.dumps(doc, indent=2))
        print(f"chosen strength k = {strength:.4g}: held-out accuracy {choice.accuracy_base:.4f} -> {choice.accuracy:.4f}"
              + (f", clean {choice.clean_accuracy_base:.4f} -> {choice.clean_accuracy:.4f}"
                 if choice.clean_accuracy is not None else ""))
    ktxt = "k = what the detector reads at each position" if strength is None else f"k = {strength:.4g}"
    print(f"saved the correction of {model_id} (layer {args.layer!r}, concepts {concepts}, direction "
          f"{args.direction}, {ktxt}) to {args.out}")
    return 0
