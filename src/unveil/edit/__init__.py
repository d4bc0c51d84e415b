"""Interventions with direction pairs: counterfactuals and corrected models (method.md §8).

- :func:`edit_maps` / :func:`edit_layer`: the edit ``x'_p = x_p ∓ m_p·k·ŝ_i`` on maps, or inside a
  model's forward pass (see :mod:`unveil.edit.intervention` for the exact definition);
- :func:`counterfactual`: new class probabilities after removing / inserting concepts;
- :class:`CorrectedModel` + :func:`choose_strength` / :func:`choose_concepts`: remove concepts (a
  shortcut) on every forward, k (and which candidates) chosen on held-out data; by default along each
  detector's mean difference (README, "Which direction to edit with");
- :func:`mean_difference_directions`: each detector's label-free difference of means (the default
  direction of a correction; the signal vector ŝ is the other choice).
"""
from .correction import ConceptChoice, CorrectedModel, StrengthChoice, choose_concepts, choose_strength, default_grid
from .counterfactual import Counterfactual, counterfactual
from .intervention import edit_layer, edit_maps, mean_difference_directions

__all__ = ["edit_maps", "edit_layer", "mean_difference_directions", "counterfactual", "Counterfactual", "CorrectedModel", "choose_strength",
           "StrengthChoice", "choose_concepts", "ConceptChoice", "default_grid"]
