"""What a model's layers are: :func:`list_layers` (name, type, output shape, calls, whether a head can be cut).

It sits above :mod:`.layers`, :mod:`.hooks` and :mod:`.head` (it probes the model with hooks and
asks :func:`~unveil.capture.valid_cuts` where it can be cut).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from .._errors import ValidationError
from .head import valid_cuts
from .hooks import hooks
from .layers import _probe_forward, layer_names, model_device_dtype

__all__ = ["list_layers", "LayerInfo"]


@dataclass
class LayerInfo:
    """One sub-module: its name, class, output shape for one image, calls per forward, and whether a
    head (the network above it) can be cut there automatically (None when the model is not traceable)."""

    name: str
    type: str
    shape: Optional[Tuple[int, ...]]
    calls: int
    cut: Optional[bool] = None


def _shape_of(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return tuple(out[0].shape)
    return None


def list_layers(model: nn.Module, input_size: int = 224, with_cuts: bool = True) -> List[LayerInfo]:
    """Every layer with its output shape (one forward of a random ``(1, 3, S, S)`` image with hooks).

    The forward runs on copies of the model's buffers, so batch-norm statistics of a model in train
    mode are not changed; the model is neither moved nor switched to eval mode.

    Parameters
    ----------
    model : nn.Module
    input_size : int
        Side ``S`` of the square probe image.
    with_cuts : bool
        Also say, per layer, whether :func:`unveil.capture.make_head` can cut the model there.

    Returns
    -------
    list of LayerInfo
        In ``named_modules()`` order; ``shape`` is None for a layer the forward did not reach.

    Examples
    --------
    >>> from unveil.models import load_model
    >>> model, _, _ = load_model("resnet18")
    >>> [(l.name, l.shape) for l in list_layers(model, 64) if l.name == "layer4"]
    [('layer4', (1, 512, 2, 2))]
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValidationError(f"input_size must be a positive integer, got {input_size!r}.")
    names = layer_names(model)
    device, dtype = model_device_dtype(model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, input_size, input_size, generator=g).to(device=device, dtype=dtype)
    with hooks(model, names, clone=False) as rec:
        try:
            _probe_forward(model, x)
        except Exception as exc:  # noqa: BLE001 - a wrong input size is the usual cause
            raise ValidationError(f"a forward pass of a (1, 3, {input_size}, {input_size}) image through "
                                  f"{type(model).__name__} failed ({type(exc).__name__}: {exc}); pass the "
                                  f"input size the model expects (--input-size).") from None
        infos = [LayerInfo(n, type(m).__name__, _shape_of(rec.outputs[n][0]) if rec.outputs.get(n) else None,
                           len(rec.outputs.get(n, [])))
                 for n, m in model.named_modules() if n]
    if with_cuts:
        try:
            ok = set(valid_cuts(model))
        except Exception:  # noqa: BLE001 - untraceable model: cut unknown
            ok = None
        for info in infos:
            info.cut = None if ok is None else info.name in ok
    return infos
