"""Correcting a model: remove concepts (e.g. a shortcut) at a layer on every forward pass.

:class:`CorrectedModel` wraps the user's model; its ``forward`` runs the model with a forward hook
that applies ``x'_p = ReLU(x_p − m_p·k·v_i)`` at the layer (method.md §8; the edit of
:mod:`unveil.edit.intervention`). :func:`choose_strength` picks ``k`` on held-out data;
:func:`choose_concepts` also picks which of several candidate concepts to remove.

The default direction ``v_i`` is the detector's label-free **mean difference** (mean activation where
it fires minus where it does not, :func:`~unveil.edit.mean_difference_directions`), measured on
reference images: on real layers it removed a shortcut better than the signal vector ŝ_i in every run
measured, and aligned better with activation maximisation (README, "Which direction to edit with";
``benchmarks/results/editing_direction.md``). On planted linear data, where every concept is written
along one direction, ŝ_i is the exact encoder and the better choice (``direction="signal"``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .._errors import CorruptFileError, HeadError, LayerError, ValidationError
from .._io import load_bundle, save_bundle
from .._validation import check_in_range, check_positive_int
from ..capture.head import make_head
from ..capture.hooks import capture
from ..capture.layers import get_layer, model_device_dtype
from ..directions.pairs import DirectionPairs
from ..models.accuracy import top1_accuracy
from .counterfactual import check_images
from .intervention import check_strength, edit_layer, edit_maps, resolve_concepts, resolve_directions

__all__ = ["CorrectedModel", "choose_strength", "StrengthChoice", "choose_concepts", "ConceptChoice", "default_grid"]
logger = logging.getLogger("unveil")


def _subset_pairs(pairs, idx: Sequence[int]):
    idx = list(idx)
    return DirectionPairs(pairs.decoders[idx], pairs.biases[idx], pairs.encoders[idx], pairs.mean,
                          names=[pairs.names[i] for i in idx], meta=pairs.meta)


class CorrectedModel(nn.Module):
    """The user's model with concepts removed at one layer on every forward pass.

    Parameters
    ----------
    model : nn.Module
        Wrapped as is (registered as the sub-module ``model``; not copied, moved or switched to
        eval mode).
    layer : str
        The layer the pairs were fitted on.
    pairs : DirectionPairs
    concepts : int, str or list
        Concepts to remove (indices into ``pairs`` or names).
    strength : float or None
        k >= 0 (layer units; the directions are unit vectors), or None to remove, at each position,
        what the concept's detector reads (its signal value when the direction is ŝ).
    direction : {"mean-difference", "signal", "filter"} or tensor (len(concepts), D)
        Edit direction: each detector's mean difference measured on ``reference`` (default), the
        signal vector ŝ, the unit filter, or given vectors.
    reference : tensor (N, C, H, W), optional
        Images at the model's input where the concepts occur (and where they do not), e.g. the
        held-out images k was chosen on; needed for ``direction="mean-difference"`` only.
    direction_name : str, optional
        What tensor directions are, recorded by :meth:`save` (default ``"custom"``).
    nonneg : bool or None
        ReLU clamp after the edit; None detects a non-negative layer per batch.
    tokens : {"patches", "all"}
        For ViT layers (see :func:`unveil.capture.capture`).
    model_id : str, optional
        Recorded by :meth:`save` so the model can be found again (default ``pairs.meta["model_id"]``).

    Examples
    --------
    >>> fixed = CorrectedModel(model, "layer4", pairs, [7], strength=2.0, reference=held_x)  # doctest: +SKIP
    >>> CorrectedModel(model, "layer4", pairs, [7], 2.0, direction="signal")                # doctest: +SKIP
    >>> fixed(images).argmax(1)                                                    # doctest: +SKIP
    >>> fixed.save("corrected/"); CorrectedModel.load("corrected/", model)          # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, layer: str, pairs, concepts, strength: Optional[float] = None, *,
                 direction: Union[str, torch.Tensor] = "mean-difference", reference=None,
                 nonneg: Optional[bool] = None, tokens: str = "patches", model_id: Optional[str] = None,
                 direction_name: Optional[str] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValidationError(f"model must be a torch nn.Module, got {type(model).__name__}.")
        get_layer(model, layer)
        self.model = model
        self.layer = layer
        self.concepts = resolve_concepts(pairs, concepts)
        self.strength = check_strength(strength)
        maps = None
        if isinstance(direction, str) and direction == "mean-difference":
            if reference is None:
                raise ValidationError("the default edit direction 'mean-difference' is measured on images: pass "
                                      "reference=images (N, C, H, W) where the concepts occur, e.g. the held-out "
                                      "images, or direction='signal' to edit along the signal vectors.")
            maps = capture(model, layer, check_images(reference), tokens=tokens)
        V = resolve_directions(pairs, self.concepts, direction, maps=maps)
        self.direction_kind = (direction.replace("-", "_") if isinstance(direction, str)
                               else (direction_name or "custom"))
        self.pairs = _subset_pairs(pairs, self.concepts)
        self._directions = V.detach().cpu()
        self.nonneg = nonneg
        self.tokens = tokens
        self.model_id = model_id if model_id is not None else pairs.meta.get("model_id")
        if pairs.meta.get("layer") not in (None, layer):
            logger.warning("the direction pairs were fitted on layer %r but are applied to layer %r",
                           pairs.meta.get("layer"), layer)

    def edit(self, maps: torch.Tensor) -> torch.Tensor:
        """The edit applied to the layer's ``(N, D, H, W)`` maps."""
        return edit_maps(maps, self.pairs, list(range(len(self.concepts))), strength=self.strength, mode="remove",
                         direction=self._directions.to(maps.device), nonneg=self.nonneg)

    def forward(self, x, *args, **kwargs):
        with edit_layer(self.model, self.layer, self.edit, tokens=self.tokens):
            return self.model(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"layer={self.layer!r}, concepts={self.concepts}, strength={self.strength}, "
                f"direction={self.direction_kind!r}")

    # ----------------------------------------------------------------- persistence
    def save(self, path) -> Path:
        """Save the correction (not the model) as ``correction.json`` + ``correction.safetensors``.

        The folder holds the selected concepts' pairs, the directions, k, the layer and the
        concept ids; the model is referenced by ``model_id`` only.
        """
        p = self.pairs
        tensors = {"decoders": p.decoders, "biases": p.biases, "encoders": p.encoders, "mean": p.mean,
                   "directions": self._directions}
        meta = {"layer": self.layer, "concepts": self.concepts, "strength": self.strength,
                "direction": self.direction_kind, "nonneg": self.nonneg, "tokens": self.tokens,
                "model_id": self.model_id, "names": p.names, "pairs_meta": p.meta}
        return save_bundle(path, "correction", tensors, meta)

    @classmethod
    def load(cls, path, model: nn.Module) -> "CorrectedModel":
        """Rebuild a saved correction around ``model`` (the same model it was made for)."""
        tensors, doc = load_bundle(path, "correction")
        checks = {"layer": lambda v: isinstance(v, str) and bool(v),
                  "concepts": lambda v: isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool)
                                                                    and c >= 0 for c in v),
                  "strength": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and math.isfinite(v)),
                  "tokens": lambda v: v in (None, "patches", "all"),
                  "nonneg": lambda v: v is None or isinstance(v, bool),
                  "names": lambda v: v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v)),
                  "pairs_meta": lambda v: v is None or isinstance(v, dict),
                  "model_id": lambda v: v is None or isinstance(v, str),
                  "direction": lambda v: v is None or isinstance(v, str)}
        for key, ok in checks.items():
            if not ok(doc.get(key)):
                raise CorruptFileError(f"saved correction at {str(path)!r}: field {key!r} is "
                                       f"{type(doc.get(key)).__name__} {str(doc.get(key))[:40]!r}, which is not valid; "
                                       f"the file is corrupt or not trustworthy. Save the correction again.")
        try:
            concepts = [int(c) for c in doc["concepts"]]
            pairs = DirectionPairs(tensors["decoders"], tensors["biases"], tensors["encoders"], tensors["mean"],
                                   names=doc.get("names"), meta=doc.get("pairs_meta"))
            directions = tensors["directions"]
            layer = doc["layer"]
            strength = doc["strength"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"saved correction at {str(path)!r} is inconsistent ({exc}).") from None
        if directions.shape != pairs.decoders.shape:
            raise CorruptFileError(f"saved correction at {str(path)!r} is inconsistent: directions "
                                   f"{tuple(directions.shape)} vs decoders {tuple(pairs.decoders.shape)}.")
        obj = cls(model, layer, pairs, list(range(len(concepts))), strength, direction=directions,
                  nonneg=doc.get("nonneg"), tokens=doc.get("tokens", "patches"), model_id=doc.get("model_id"),
                  direction_name=str(doc.get("direction", "custom")))
        obj.concepts = concepts
        return obj


# --------------------------------------------------------------------------- choosing k
@dataclass
class StrengthChoice:
    """The outcome of :func:`choose_strength`.

    Attributes
    ----------
    strength : float
        The chosen k.
    accuracy : float
        Accuracy on the held-out (e.g. poisoned) set at k.
    clean_accuracy : float or None
        Accuracy on the clean set at k.
    accuracy_base, clean_accuracy_base : accuracies at k = 0.
    table : list of dict
        ``{"strength", "accuracy", "clean_accuracy", "allowed"}`` per grid value.
    direction : str
        The edit direction k was chosen for (``"mean_difference"``, ``"signal"``, ``"filter"`` or
        ``"custom"`` for given vectors).
    """

    strength: float
    accuracy: float
    clean_accuracy: Optional[float]
    accuracy_base: float
    clean_accuracy_base: Optional[float]
    table: List[Dict] = field(default_factory=list)
    direction: str = "custom"

    def to_dict(self) -> dict:
        return {"strength": self.strength, "accuracy": self.accuracy, "clean_accuracy": self.clean_accuracy,
                "accuracy_base": self.accuracy_base, "clean_accuracy_base": self.clean_accuracy_base,
                "table": self.table, "direction": self.direction}


class _Evaluator:
    """Accuracy of the model with an edit at the layer, for many edits of the same images.

    Fast path: the layer's maps are captured once and the head (the network above the layer) is
    run on the edited maps. When no head can be cut (untraceable model, residual inside), every
    evaluation runs the whole model with the editing hook.
    """

    def __init__(self, model, layer, images, labels, batch_size, head=None, tokens="patches"):
        self.model, self.layer, self.batch_size, self.tokens = model, layer, batch_size, tokens
        self.images = check_images(images)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).flatten()
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValidationError(f"got {self.images.shape[0]} images but {self.labels.shape[0]} labels; pass one "
                                  f"label per image.")
        self.head = head
        if head is None:
            try:
                self.head = make_head(model, layer, tokens=tokens, input_size=int(images.shape[-1]))
            except (HeadError, LayerError) as exc:
                logger.info("no head for layer %r (%s); evaluating with full forward passes", layer, exc)
                self.head = None
        self.maps = None
        if self.head is not None:
            self.maps = capture(model, layer, self.images, batch_size=batch_size, tokens=tokens)

    @torch.no_grad()
    def accuracy(self, fn) -> float:
        if self.maps is not None:
            return top1_accuracy(lambda m: self.head(fn(m) if fn is not None else m), self.maps, self.labels,
                                 self.batch_size)
        device, dtype = model_device_dtype(self.model)

        def forward(xb):
            return self.model(xb.to(device=device, dtype=dtype))

        if fn is None:
            return top1_accuracy(forward, self.images, self.labels, self.batch_size)
        with edit_layer(self.model, self.layer, fn, tokens=self.tokens):
            return top1_accuracy(forward, self.images, self.labels, self.batch_size)


@torch.no_grad()
def default_grid(pairs, concepts, maps: torch.Tensor,
                 multipliers: Sequence[float] = (0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8)) -> List[float]:
    """Strengths to try: multiples of the concepts' median signal value on their detected positions.

    The scale is measured along the signal vectors and shared by every direction, so controls
    (filter, random directions) are compared at the same norms.
    """
    idx = resolve_concepts(pairs, concepts)
    sub = _subset_pairs(pairs, idx)
    a = sub.signal_values(maps)
    y = sub.detect(maps)
    vals = [a[:, j][y[:, j] > 0.5] for j in range(len(idx))]
    vals = torch.cat([v for v in vals if v.numel()]) if any(v.numel() for v in vals) else a.flatten()
    scale = float(vals.abs().median()) if vals.numel() else 1.0
    if not scale > 0:
        scale = 1.0
    return [float(m) * scale for m in multipliers]


def choose_strength(model: nn.Module, layer: str, pairs, concepts, images, labels, clean_images=None,
                    clean_labels=None, *, grid: Optional[Sequence[float]] = None, max_clean_drop: float = 0.005,
                    direction: Union[str, torch.Tensor] = "mean-difference", nonneg: Optional[bool] = None,
                    batch_size: int = 64, head: Optional[nn.Module] = None, tokens: str = "patches",
                    _evaluators=None) -> StrengthChoice:
    """Pick the removal strength k on held-out data.

    k maximises the accuracy on ``images`` (e.g. a held-out *poisoned* split, where the shortcut
    misleads the model) among the grid values whose accuracy on ``clean_images`` is at most
    ``max_clean_drop`` below the unedited model's (0.005 = half a point). Ties go to the smaller k.
    Without a clean set there is no constraint (the accuracy on ``images`` alone is maximised).

    Parameters
    ----------
    model, layer, pairs, concepts :
        As for :class:`CorrectedModel`.
    images, labels :
        Held-out images (N, C, H, W) and their true labels.
    clean_images, clean_labels : optional
        Clean held-out images for the constraint.
    grid : sequence of float, optional
        Strengths to try (default :func:`default_grid` on the held-out maps; 0 is always tried).
    max_clean_drop : float
        Allowed drop of clean accuracy (a fraction, not percent).
    direction : {"mean-difference", "signal", "filter"} or tensor (len(concepts), D)
        As for :class:`CorrectedModel`; ``"mean-difference"`` (default) is measured on ``images`` and
        ``clean_images`` together (pass the same images as ``reference`` to :class:`CorrectedModel`).
    nonneg, tokens :
        As for :class:`CorrectedModel`.
    batch_size : int
    head : nn.Module, optional
        The network above the layer (maps -> logits). Default: cut automatically with
        :func:`unveil.capture.make_head` (maps are then captured once); without one, every grid
        value runs the whole model.

    Returns
    -------
    StrengthChoice

    Examples
    --------
    >>> choice = choose_strength(model, "layer4", pairs, [7], val_x, val_y, clean_x, clean_y)  # doctest: +SKIP
    >>> CorrectedModel(model, "layer4", pairs, [7], choice.strength,
    ...                reference=torch.cat([val_x, clean_x]))                              # doctest: +SKIP
    """
    idx = resolve_concepts(pairs, concepts)
    batch_size = check_positive_int(batch_size, "batch_size")
    max_clean_drop = check_in_range(max_clean_drop, "max_clean_drop", 0.0, 1.0)
    if not isinstance(direction, str):
        resolve_directions(pairs, idx, direction)  # shape check before any capture
    ev, ev_clean = _evaluators if _evaluators is not None else _make_evaluators(
        model, layer, images, labels, clean_images, clean_labels, batch_size, head, tokens)
    V = resolve_directions(pairs, idx, direction, maps=_reference_maps(direction, ev, ev_clean, model, layer,
                                                                        batch_size, tokens))
    if grid is None:
        grid = _grid_from(ev, model, layer, pairs, idx, batch_size, tokens)
    grid = sorted({0.0, *[check_strength(float(k)) for k in grid]})

    base = ev.accuracy(None)
    base_clean = ev_clean.accuracy(None) if ev_clean is not None else None
    table = []
    for k in grid:
        if k == 0.0:
            acc, cacc = base, base_clean
        else:
            def fn(m, _k=k):
                return edit_maps(m, pairs, idx, strength=_k, direction=V.to(m.device), nonneg=nonneg)
            acc = ev.accuracy(fn)
            cacc = ev_clean.accuracy(fn) if ev_clean is not None else None
        allowed = cacc is None or cacc >= base_clean - max_clean_drop - 1e-12
        table.append({"strength": k, "accuracy": acc, "clean_accuracy": cacc, "allowed": bool(allowed)})
        logger.info("strength %.4g: accuracy %.4f, clean %s", k, acc, cacc)
    best = max((r for r in table if r["allowed"]), key=lambda r: (r["accuracy"], -r["strength"]))
    return StrengthChoice(best["strength"], best["accuracy"], best["clean_accuracy"], base, base_clean, table,
                          direction.replace("-", "_") if isinstance(direction, str) else "custom")


def _reference_maps(direction, ev, ev_clean, model, layer, batch_size, tokens):
    """The held-out (and clean) maps a ``"mean-difference"`` direction is measured on; None otherwise."""
    if not (isinstance(direction, str) and direction == "mean-difference"):
        return None
    parts = []
    for e in (ev, ev_clean):
        if e is None:
            continue
        if e.maps is None:
            parts.append(capture(model, layer, e.images, batch_size=batch_size, tokens=tokens))
        else:
            parts.append(e.maps)
    return torch.cat(parts)


def _grid_from(ev, model, layer, pairs, idx, batch_size, tokens) -> List[float]:
    """:func:`default_grid` on the evaluator's held-out maps (the first 256 images when there are none)."""
    maps = ev.maps
    if maps is None:
        maps = capture(model, layer, ev.images[:256], batch_size=batch_size, tokens=tokens)
    return default_grid(pairs, idx, maps)


def _make_evaluators(model, layer, images, labels, clean_images, clean_labels, batch_size, head, tokens):
    ev = _Evaluator(model, layer, images, labels, batch_size, head, tokens)
    ev_clean = None
    if clean_images is not None:
        if clean_labels is None:
            raise ValidationError("clean_images needs clean_labels (one label per clean image).")
        ev_clean = _Evaluator(model, layer, clean_images, clean_labels, batch_size, ev.head, tokens)
    return ev, ev_clean


@dataclass
class ConceptChoice:
    """The outcome of :func:`choose_concepts`.

    Attributes
    ----------
    concepts : list of int
        The kept concepts (a subset of the candidates, in their order).
    choice : StrengthChoice
        k chosen for the kept concepts together.
    steps : list of dict
        ``{"concept", "accuracy", "clean_accuracy", "strength", "kept"}`` per candidate: the held-out
        accuracies with that candidate added to the concepts kept before it (k re-chosen).
    """

    concepts: List[int]
    choice: StrengthChoice
    steps: List[Dict] = field(default_factory=list)

    @property
    def strength(self) -> float:
        return self.choice.strength

    def to_dict(self) -> dict:
        return {"concepts": self.concepts, "strength": self.choice.strength, "choice": self.choice.to_dict(),
                "steps": self.steps}


def choose_concepts(model: nn.Module, layer: str, pairs, candidates, images, labels, clean_images=None,
                    clean_labels=None, *, grid: Optional[Sequence[float]] = None, max_clean_drop: float = 0.005,
                    direction: Union[str, torch.Tensor] = "mean-difference", nonneg: Optional[bool] = None,
                    batch_size: int = 64, head: Optional[nn.Module] = None, tokens: str = "patches",
                    _evaluators=None) -> ConceptChoice:
    """Pick which candidate concepts to remove, and k, on held-out data (greedy forward selection).

    A shortcut is often split over several detectors, and a detector that is only partly about it
    (one that also fires on other patterns) costs clean accuracy for little gain. The first
    candidate is always kept; each next candidate is kept when removing it *as well* (with k
    re-chosen by :func:`choose_strength`'s rule) raises the held-out accuracy. List the candidates
    best first (e.g. by IoU with the shortcut's mask).

    Parameters
    ----------
    candidates : sequence of int or str
        Concepts that may be removed, best first.
    direction : {"mean-difference", "signal", "filter"} or tensor (len(candidates), D)
        Edit directions; a tensor has one row per *candidate* (the rows of the kept ones are used);
        ``"mean-difference"`` (default) is measured on ``images`` and ``clean_images`` together.
    grid : sequence of float, optional
        Strengths to try for every subset (default :func:`default_grid` over all candidates, so every
        subset is tried at the same strengths).
    Other parameters are as for :func:`choose_strength`.

    Returns
    -------
    ConceptChoice

    Examples
    --------
    >>> sel = choose_concepts(model, "layer2", pairs, [41, 60, 8], pois_x, pois_y, clean_x, clean_y)  # doctest: +SKIP
    >>> CorrectedModel(model, "layer2", pairs, sel.concepts, sel.strength,
    ...                reference=torch.cat([pois_x, clean_x]))                                         # doctest: +SKIP
    """
    idx = resolve_concepts(pairs, candidates)
    batch_size = check_positive_int(batch_size, "batch_size")
    rows = None
    if not isinstance(direction, str):
        rows = resolve_directions(pairs, idx, direction)
    ev, ev_clean = _evaluators if _evaluators is not None else _make_evaluators(
        model, layer, images, labels, clean_images, clean_labels, batch_size, head, tokens)
    name = direction
    if isinstance(direction, str) and direction == "mean-difference":
        rows = resolve_directions(pairs, idx, direction, maps=_reference_maps(direction, ev, ev_clean, model, layer,
                                                                               batch_size, tokens))
    if grid is None:
        grid = _grid_from(ev, model, layer, pairs, idx, batch_size, tokens)

    def trial(pos):
        d = direction if rows is None else rows[pos]
        return choose_strength(model, layer, pairs, [idx[p] for p in pos], images, labels, clean_images,
                               clean_labels, grid=grid, max_clean_drop=max_clean_drop, direction=d, nonneg=nonneg,
                               batch_size=batch_size, tokens=tokens, _evaluators=(ev, ev_clean))

    kept = [0]
    best = trial(kept)
    steps = [{"concept": idx[0], "accuracy": best.accuracy, "clean_accuracy": best.clean_accuracy,
              "strength": best.strength, "kept": True}]
    for p in range(1, len(idx)):
        c = trial(kept + [p])
        keep = c.accuracy > best.accuracy
        steps.append({"concept": idx[p], "accuracy": c.accuracy, "clean_accuracy": c.clean_accuracy,
                      "strength": c.strength, "kept": bool(keep)})
        logger.info("candidate %d: held-out accuracy %.4f (best so far %.4f) -> %s", idx[p], c.accuracy,
                    best.accuracy, "kept" if keep else "dropped")
        if keep:
            kept, best = kept + [p], c
    if isinstance(name, str):
        best = replace(best, direction=name.replace("-", "_"))
    return ConceptChoice([idx[p] for p in kept], best, steps)
