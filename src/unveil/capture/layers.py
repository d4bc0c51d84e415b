"""Layers by name: the dotted names of ``model.named_modules()``, with "did you mean" errors.

The bottom of :mod:`unveil.capture`: it imports nothing from the rest of the package but the core
modules. (:func:`~unveil.capture.list_layers`, which needs hooks and heads, is in :mod:`.listing`.)
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from .._errors import LayerError
from .._validation import suggest

__all__ = ["layer_names", "get_layer", "suggest", "model_device_dtype"]


def layer_names(model: nn.Module) -> List[str]:
    """Dotted names of every sub-module of ``model`` (the root itself excluded), in definition order."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name``; raises :class:`LayerError` with the closest names otherwise.

    Examples
    --------
    >>> from torch import nn
    >>> get_layer(nn.Sequential(nn.Linear(2, 2)), "0")
    Linear(in_features=2, out_features=2, bias=True)
    """
    if not isinstance(name, str) or not name:
        raise LayerError(f"a layer name must be a non-empty string (a dotted name of model.named_modules()), "
                         f"got {name!r}.")
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = suggest(name, names)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise LayerError(f"no layer named {name!r} in {type(model).__name__} ({len(names)} layers).{hint} "
                     f"List the layers with unveil.capture.list_layers(model) or `unveil layers --model M`.")


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (or buffer); CPU/float32 if it has none."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _probe_forward(model: nn.Module, x: torch.Tensor):
    """Run ``model(x)`` without grad on copies of its buffers (running statistics stay untouched)."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        return torch.func.functional_call(model, buffers, (x,), strict=False)
