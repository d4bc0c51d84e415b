"""Experiments: orchestration only. Each module runs one study end to end with the library's layers below it
(data, capture, models, directions, evaluate, edit, explain) and returns JSON-ready numbers; none of them
defines a method or a metric of its own, and none imports the report or the command line.

- :mod:`~unveil.experiments.demo`: ``unveil demo``, EDDP and baselines on the concept world (dissection,
  influence, S³, explanations); :func:`unveil.run_demo` adds the HTML report.
- :mod:`~unveil.experiments.shortcut`: find the watermark concept of ``worldnet-shortcut`` and remove it.
- :mod:`~unveil.experiments.synthetic`: ``unveil synthetic``, EDDP and baselines against planted truth.
- :mod:`~unveil.experiments.editing`: which direction to edit with, scored against planted truth.
- :mod:`~unveil.experiments.results`: the demo's ``results.json`` as typed dataclasses
  (:class:`~unveil.experiments.results.DemoResults`) and :func:`load_results`, which reads and validates it.
- :mod:`~unveil.experiments.typed`: the same for the synthetic benchmark
  (:class:`~unveil.experiments.typed.SyntheticBenchmarkResult`, :func:`load_synthetic_results`) and the shortcut
  experiment (:class:`~unveil.experiments.typed.ShortcutResult`, :func:`load_shortcut_results`).
"""

__all__ = ["load_results", "DemoResults", "load_synthetic_results", "SyntheticBenchmarkResult",
           "load_shortcut_results", "ShortcutResult"]
_TYPED = ("load_synthetic_results", "SyntheticBenchmarkResult", "load_shortcut_results", "ShortcutResult")


def __getattr__(name):
    # imported on first use: ``import unveil.experiments`` stays light
    if name in ("load_results", "DemoResults"):
        from . import results
        return getattr(results, name)
    if name in _TYPED:
        from . import typed
        return getattr(typed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
