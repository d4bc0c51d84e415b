"""Experiments: orchestration only. Each module runs one study end to end with the library's layers below it
(data, capture, models, directions, evaluate, edit, explain) and returns JSON-ready numbers; none of them
defines a method or a metric of its own, and none imports the report or the command line.

- :mod:`~unveil.experiments.demo`: ``unveil demo``, EDDP and baselines on the concept world (dissection,
  influence, S³, explanations); :func:`unveil.run_demo` adds the HTML report.
- :mod:`~unveil.experiments.shortcut`: find the watermark concept of ``worldnet-shortcut`` and remove it.
- :mod:`~unveil.experiments.synthetic`: ``unveil synthetic``, EDDP and baselines against planted truth.
"""
