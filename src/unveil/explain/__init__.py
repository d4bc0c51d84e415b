"""Per-image explanations with direction pairs: detector maps and concept contributions."""
from .explanation import Explanation, explain, plot_explanation

__all__ = ["Explanation", "explain", "plot_explanation"]
