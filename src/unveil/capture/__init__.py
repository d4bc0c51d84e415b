"""Model side: layer names, hooks, captured feature maps, the head f⁺ and the on-disk activation store.

Data flows one way: images -> :func:`capture` / :func:`extract` -> :class:`ActivationStore` ->
estimators (which never see the model; they get the head from :func:`make_head` /
:func:`head_for_store`).
"""
from .head import FrozenHead, make_head, valid_cuts
from .hooks import TokenLayout, capture, hooks
from .layers import LayerInfo, get_layer, layer_names, list_layers
from .store import ActivationStore, extract, head_for_store

__all__ = ["layer_names", "get_layer", "list_layers", "LayerInfo", "hooks", "capture", "TokenLayout",
           "make_head", "valid_cuts", "FrozenHead", "ActivationStore", "extract", "head_for_store"]
