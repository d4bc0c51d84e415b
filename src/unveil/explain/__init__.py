"""Per-image explanations with direction pairs: detector maps and concept contributions.

The module itself is callable: ``unveil.explain(model, layer, pairs, images)`` is
:func:`unveil.explain.explain`.
"""
import sys
import types

from .explanation import Explanation, explain, plot_explanation

__all__ = ["Explanation", "explain", "plot_explanation"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
