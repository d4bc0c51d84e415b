"""Model side: layer names, hooks, captured feature maps, the head f⁺ and the on-disk activation store.

Data flows one way: images -> :func:`capture` / :func:`extract` -> :class:`ActivationStore` ->
estimators (which never see the model; they get the head from :func:`make_head` /
:func:`head_for_store`).

Every hook on a layer goes through :func:`on_layer` (record and/or replace the layer's output as
``(N, D, H, W)`` maps); :mod:`unveil.edit` and :mod:`unveil.explain` use it too.

Modules, each importing only those before it (and the core ``unveil._*`` modules):
``layers`` (names, lookup) -> ``hooks`` (:func:`on_layer`, :class:`TokenLayout`, :func:`capture`)
-> ``head`` (:func:`make_head`) -> ``listing`` (:func:`list_layers`) and ``store``
(:class:`ActivationStore`; it also rebuilds a store's model with :mod:`unveil.models`, which
imports nothing from here).
"""
from .head import FrozenHead, make_head, valid_cuts
from .hooks import LayerRecord, TokenLayout, capture, hooks, on_layer
from .layers import get_layer, layer_names
from .listing import LayerInfo, list_layers
from .store import ActivationStore, extract, head_for_store

__all__ = ["layer_names", "get_layer", "list_layers", "LayerInfo", "on_layer", "LayerRecord", "hooks", "capture",
           "TokenLayout", "make_head", "valid_cuts", "FrozenHead", "ActivationStore", "extract", "head_for_store"]
