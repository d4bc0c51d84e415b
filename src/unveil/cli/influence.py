"""``unveil influence``: RCAV influence of direction pairs on a model's classes, with the paper's null."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "influence", help="which concepts push which classes up or down (RCAV, permutation null)",
        description="Shift the layer's maps along each concept's encoding direction, rerun the rest of the model "
                    "and count, per class, on how many of its images the class probability rises (RCAV). "
                    "Significance against noise classifiers trained on permuted detector labels (Bonferroni). "
                    "Writes OUT/influence.json and OUT/influence.png.")
    from .capture import _model_args as model_options
    model_options(p)
    p.add_argument("--layer", required=True, help="the layer the pairs were fitted on")
    p.add_argument("--pairs", type=Path, required=True, help="direction pairs folder (from `unveil fit`)")
    p.add_argument("--images", type=Path, required=True, metavar="DIR",
                   help="image folder with one sub-folder per class (named by class index or name)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--alpha", type=float, default=5.0, help="step along each unit encoding direction (default 5)")
    p.add_argument("--null", choices=("permutation", "per_direction", "pooled"), default="permutation",
                   help="null distribution (default: the paper's permuted-label noise classifiers)")
    p.add_argument("--n-null", type=int, default=100, help="noise vectors per direction (default 100; 0: no test)")
    p.add_argument("--shift", choices=("everywhere", "detected"), default="everywhere",
                   help="add the shift at every position, or weighted by the concept's detector")
    p.add_argument("--statistic", choices=("logit", "sign"), default="logit",
                   help="per-image effect: the class-specific change of the log-odds (default; not saturated), or "
                        "the sign of the change of p(class) (the paper's RCAV score)")
    p.add_argument("--test", choices=("t", "empirical"), default="t",
                   help="p-value: the prediction-interval t against the direction's null (default) or the "
                        "permutation rank against the pooled null")
    p.add_argument("--random-null", type=int, default=None, metavar="N",
                   help="random unit directions per direction as a second reference: a pair must be significant "
                        "against both (default: as many as --n-null; 0: the paper's null alone)")
    p.add_argument("--significance", type=float, default=0.05, help="family-wise level (default 0.05)")
    p.add_argument("--top", type=int, default=3, help="concepts per sign and class in the figure (default 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_influence)


def _influence(args) -> int:
    import io
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._errors import OutputExistsError
    from .._io import atomic_write_bytes, atomic_write_json, versions
    from .._validation import check_in_range, check_input_size, check_positive_int
    from ..capture import capture, make_head
    from ..directions.pairs import DirectionPairs
    from ..evaluate.influence import influence, plot_influence_diagram
    from ..models import load_model
    from .apply import _class_names, _folder
    check_positive_int(args.batch_size, "--batch-size")
    check_positive_int(args.n_null, "--n-null", minimum=0)
    if args.random_null is not None:
        check_positive_int(args.random_null, "--random-null", minimum=0)
    check_positive_int(args.top, "--top")
    check_in_range(args.alpha, "--alpha")
    check_in_range(args.significance, "--significance", 0.0, 1.0, low_inclusive=False)
    if args.out.exists() and not args.out.is_dir():
        raise OutputExistsError(f"--out {str(args.out)!r} exists and is not a folder; pass a folder path (it is "
                                f"created if missing).")
    options = {} if args.image_size is None else {"image_size": check_input_size(args.image_size, "--image-size")}
    model, pre, model_id = load_model(args.model, weights=args.weights, **options)
    pairs = DirectionPairs.load(args.pairs)
    names = _class_names(args.model)
    images, labels = _folder(args.images, pre, names)
    maps = capture(model, args.layer, images, batch_size=args.batch_size)
    head = make_head(model, args.layer, input_size=pre.size)
    res = influence(head, maps, labels, pairs, alpha=args.alpha, null=args.null, n_null=args.n_null,
                    shift=args.shift, statistic=args.statistic, test=args.test, random_null=args.random_null,
                    significance=args.significance, random_state=args.seed,
                    batch_size=args.batch_size, class_names=names, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"model": model_id, "layer": args.layer, "pairs": str(args.pairs), "images": str(args.images),
           "n_images": int(len(labels)), "versions": versions(), **res.to_dict()}
    atomic_write_json(args.out / "influence.json", doc)
    ax = plot_influence_diagram(res, n=args.top)
    ax.set_title(f"{model_id} {args.layer}: SDC {res.sdc}, SCDP {res.scdp}", fontsize=8)
    ax.figure.tight_layout()
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png", dpi=120)
    plt.close(ax.figure)
    atomic_write_bytes(args.out / "influence.png", buf.getvalue())
    print(json.dumps({"sdc": res.sdc, "scdp": res.scdp, "n_tests": res.config["n_tests"],
                      "bonferroni_level": res.config["bonferroni_level"]}))
    print(f"wrote influence.json and influence.png to {args.out}")
    return 0
