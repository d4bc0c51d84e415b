"""Interventions with direction pairs: counterfactuals and corrected models (method.md §8).

- :func:`edit_maps` / :func:`edit_layer`: the edit ``x'_p = x_p ∓ m_p·k·ŝ_i`` on maps, or inside a
  model's forward pass (see :mod:`unveil.edit.intervention` for the exact definition);
- :func:`counterfactual`: new class probabilities after removing / inserting concepts;
- :class:`CorrectedModel` + :func:`choose_strength`: remove concepts (a shortcut) on every forward.
"""
from .correction import CorrectedModel, StrengthChoice, choose_strength, default_grid
from .counterfactual import Counterfactual, counterfactual
from .intervention import edit_layer, edit_maps

__all__ = ["edit_maps", "edit_layer", "counterfactual", "Counterfactual", "CorrectedModel", "choose_strength",
           "StrengthChoice", "default_grid"]
