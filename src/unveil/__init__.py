"""unveil: learn the concepts a vision network's layer uses, as encoding-decoding direction pairs.

Heavy modules (models, reports) are imported lazily; ``import unveil`` stays fast.
"""
from ._version import __version__
from ._errors import (BusyError, CorruptFileError, DistributedError, HeadError, LayerError,  # noqa: E402
                      NotFittedError, OutputExistsError, UnveilError, ValidationError)
from .directions import EDDP, DirectionPairs  # noqa: E402

__all__ = ["__version__", "EDDP", "DirectionPairs", "explain", "influence", "run_demo", "load_results", "UnveilError",
           "ValidationError", "NotFittedError", "CorruptFileError", "LayerError", "HeadError", "OutputExistsError",
           "BusyError", "DistributedError"]


def run_demo(out="unveil-demo", **kwargs):
    """``unveil demo`` from Python: :func:`unveil.experiments.demo.run_demo` (same keyword arguments), which
    writes ``results.json`` and ``eddp_pairs/``, with :func:`unveil.report.write_report` writing ``report.html``.
    Returns the content of ``results.json``.

    >>> res = unveil.run_demo("demo-out", fast=True, progress=False)  # doctest: +SKIP
    """
    from .experiments.demo import run_demo as run_experiment
    from .report import write_report
    kwargs.setdefault("write_report", write_report)
    return run_experiment(out, **kwargs)


def __getattr__(name):
    # ``unveil.explain(model, layer, pairs, images)``: the explain module is callable; imported on first use
    if name == "explain":
        import importlib
        return importlib.import_module(".explain", __name__)
    # ``unveil.influence(head, maps, labels, pairs)``: RCAV with the paper's null; a plain function
    if name == "influence":
        from .evaluate.influence import influence
        return influence
    # ``unveil.load_results(path)``: the demo's results.json, validated, as a typed DemoResults
    if name == "load_results":
        from .experiments.results import load_results
        return load_results
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
