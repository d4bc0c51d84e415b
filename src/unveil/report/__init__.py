"""Figures and the self-contained HTML report (matplotlib is imported lazily, Agg backend).

``build_report(results, dissections, train=..., val=..., detector_maps=...)`` returns one HTML string
(inline CSS, base64 PNG images, no external URL; all data text escaped) from the demo's typed results
(:class:`~unveil.experiments.results.DemoResults`, e.g. ``unveil.load_results(DIR)``);
``write_report(path, ...)`` writes it atomically. The plot functions of :mod:`unveil.report.figures`
take ``ax=None`` and return the Axes.
"""
from .figures import (detector_montage, plot_class_influence, plot_detector_heatmaps, plot_detector_montage,
                      plot_influence, plot_method_comparison)
from .html import build_report, write_report

__all__ = ["build_report", "write_report", "detector_montage", "plot_detector_montage",
           "plot_detector_heatmaps", "plot_influence", "plot_class_influence", "plot_method_comparison"]
