"""Forward hooks in a context manager, and :func:`capture` of a layer's feature maps.

Feature maps are always ``(N, D, H, W)``:

- a conv layer's ``(N, D, H, W)`` output is kept as is;
- a vector output ``(N, D)`` becomes ``(N, D, 1, 1)``;
- a token output ``(N, T, D)`` (a ViT block) becomes maps whose positions are tokens. With
  ``tokens="patches"`` (the default) the ``P`` leading prefix tokens (CLS, register/distillation
  tokens) are dropped and the ``T − P`` patch tokens are laid out on their grid ``(N, D, h, w)``
  (row-major, as a patch embedding flattens them; ``(N, D, T − P, 1)`` when no square grid fits).
  With ``tokens="all"`` every token is kept, prefix tokens first: ``(N, D, T, 1)``.
  ``P`` is ``prefix_tokens`` if given, else the model's ``num_prefix_tokens`` attribute (timm's
  convention), else 1 when ``T − 1`` is a perfect square and ``T`` is not, else 0.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._errors import LayerError, ValidationError
from .._progress import progress as _progress
from .layers import get_layer

__all__ = ["hooks", "Recording", "TokenLayout", "capture", "Capturer", "model_device_dtype"]
logger = logging.getLogger("unveil")

TOKEN_MODES = ("patches", "all")


class _StopForward(BaseException):
    """Raised by a hook to end a forward pass once the wanted layer has been recorded."""


class Recording:
    """What :func:`hooks` recorded: ``outputs[name]`` is the list of that layer's outputs, one per call."""

    def __init__(self, names: Sequence[str]):
        self.outputs: Dict[str, List] = {n: [] for n in names}
        self.stop_when_done = False

    def clear(self) -> None:
        for v in self.outputs.values():
            v.clear()

    def __getitem__(self, name: str):
        outs = self.outputs[name]
        if not outs:
            raise LayerError(f"layer {name!r} was not called during the forward pass, so nothing was captured; "
                             f"pick a layer the model uses (see list_layers).")
        return outs[-1]


def _detach(out, clone: bool):
    if isinstance(out, torch.Tensor):
        return out.detach().clone() if clone else out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(o, clone) for o in out)
    return out


@contextmanager
def hooks(model: nn.Module, layers: Union[str, Sequence[str]], clone: bool = True) -> Iterator[Recording]:
    """Record the outputs of ``layers`` during the forward passes run inside the ``with`` block.

    Every hook is removed when the block exits, also when it raises.

    Parameters
    ----------
    model : nn.Module
    layers : str or sequence of str
        Dotted names of ``model.named_modules()``.
    clone : bool
        Store copies (True) so later in-place operations of the model cannot change them.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    >>> with hooks(net, "0") as rec:
    ...     _ = net(torch.ones(2, 3))
    >>> rec["0"].shape
    torch.Size([2, 4])
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = [(n, get_layer(model, n)) for n in names]
    rec = Recording(names)
    handles = []
    try:
        for name, module in modules:
            def hook(_m, _inp, out, _name=name):
                rec.outputs[_name].append(_detach(out, clone))
                if rec.stop_when_done and all(rec.outputs[n] for n in names):
                    raise _StopForward
            handles.append(module.register_forward_hook(hook))
        yield rec
    finally:
        for h in handles:
            h.remove()


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (or buffer); CPU/float32 if it has none."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _is_square(n: int) -> bool:
    r = math.isqrt(n)
    return r * r == n


@dataclass(frozen=True)
class TokenLayout:
    """How a layer's output becomes ``(N, D, H, W)`` maps (see the module docstring) and back.

    ``kind`` is ``"map"`` (4-D output), ``"vector"`` (2-D) or ``"tokens"`` (3-D ``(N, T, D)``).
    """

    kind: str = "map"
    tokens: str = "patches"
    n_tokens: int = 0
    n_prefix: int = 0
    grid: Tuple[int, int] = (0, 0)

    @property
    def n_dropped(self) -> int:
        return self.n_prefix if (self.kind == "tokens" and self.tokens == "patches") else 0

    @classmethod
    def infer(cls, out: torch.Tensor, model: Optional[nn.Module] = None, tokens: str = "patches",
              prefix_tokens: Optional[int] = None, layer: str = "?") -> "TokenLayout":
        if tokens not in TOKEN_MODES:
            raise ValidationError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}.")
        if not isinstance(out, torch.Tensor):
            raise LayerError(f"layer {layer!r} returns a {type(out).__name__}, not a tensor; pick a layer whose "
                             f"output is one tensor (N, D, H, W), (N, T, D) or (N, D), e.g. a sub-module of it.")
        if out.dim() == 4:
            return cls("map", tokens, 0, 0, (int(out.shape[2]), int(out.shape[3])))
        if out.dim() == 2:
            return cls("vector", tokens, 0, 0, (1, 1))
        if out.dim() != 3:
            raise LayerError(f"layer {layer!r} outputs shape {tuple(out.shape)}; expected (N, D, H, W) maps, "
                             f"(N, T, D) tokens or (N, D) vectors. Pick another layer.")
        T = int(out.shape[1])
        if prefix_tokens is None:
            prefix_tokens = getattr(model, "num_prefix_tokens", None) if model is not None else None
        if prefix_tokens is None:
            prefix_tokens = 1 if (T > 1 and _is_square(T - 1) and not _is_square(T)) else 0
        P = int(prefix_tokens)
        if not 0 <= P < T:
            raise ValidationError(f"prefix_tokens must be in [0, {T - 1}] for layer {layer!r} with {T} tokens, "
                                  f"got {P}.")
        if tokens == "all":
            return cls("tokens", tokens, T, P, (T, 1))
        n = T - P
        grid = None
        for holder in (getattr(model, "patch_embed", None), model):
            g = getattr(holder, "grid_size", None) if holder is not None else None
            if isinstance(g, (tuple, list)) and len(g) == 2 and int(g[0]) * int(g[1]) == n:
                grid = (int(g[0]), int(g[1]))
                break
        if grid is None:
            grid = (math.isqrt(n), math.isqrt(n)) if _is_square(n) else (n, 1)
        return cls("tokens", tokens, T, P, grid)

    def to_maps(self, out: torch.Tensor) -> torch.Tensor:
        """Layer output -> ``(N, D, H, W)`` maps."""
        if self.kind == "map":
            return out
        if self.kind == "vector":
            return out[:, :, None, None]
        if out.dim() != 3 or out.shape[1] != self.n_tokens:
            raise LayerError(f"expected (N, {self.n_tokens}, D) tokens, got shape {tuple(out.shape)}; the "
                             f"input size changed the number of tokens.")
        t = out[:, self.n_dropped:, :].transpose(1, 2)
        return t.reshape(t.shape[0], t.shape[1], *self.grid)

    def to_output(self, maps: torch.Tensor) -> torch.Tensor:
        """``(N, D, H, W)`` maps -> what the layer outputs (the inverse of :meth:`to_maps`)."""
        if self.kind == "map":
            return maps
        if self.kind == "vector":
            return maps.mean(dim=(2, 3))
        if self.n_dropped:
            raise LayerError(f"the maps hold only the patch tokens; the {self.n_prefix} prefix token(s) (CLS) "
                             f"that the rest of the network needs were dropped. Capture with tokens='all'.")
        return maps.flatten(2).transpose(1, 2)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(d["kind"], d.get("tokens", "patches"), int(d.get("n_tokens", 0)), int(d.get("n_prefix", 0)),
                   tuple(int(v) for v in d.get("grid", (0, 0))))


class Capturer:
    """Callable that maps an image batch to the layer's ``(B, D, H, W)`` maps (float32, CPU).

    The first batch runs the whole forward (to check the layer is called exactly once); later
    batches stop the forward right after the layer. The model is used as given: not moved, mode
    unchanged; the images are moved to the model's device and dtype.
    """

    def __init__(self, model: nn.Module, layer: str, tokens: str = "patches", prefix_tokens: Optional[int] = None):
        if tokens not in TOKEN_MODES:
            raise ValidationError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}.")
        get_layer(model, layer)
        self.model, self.layer, self.tokens, self.prefix_tokens = model, layer, tokens, prefix_tokens
        self.layout: Optional[TokenLayout] = None
        self.device, self.dtype = model_device_dtype(model)
        if model.training:
            logger.warning("%s is in train mode: captured activations use batch statistics and dropout. Call "
                           "model.eval() first for inference activations.", type(model).__name__)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.dtype)
        with hooks(self.model, self.layer, clone=True) as rec:
            rec.stop_when_done = self.layout is not None
            try:
                self.model(x)
            except _StopForward:
                pass
            outs = rec.outputs[self.layer]
        if not outs:
            raise LayerError(f"layer {self.layer!r} was not called during the forward pass; pick a layer the "
                             f"model uses (see list_layers).")
        if len(outs) > 1 and self.layout is None:
            raise LayerError(f"layer {self.layer!r} is called {len(outs)} times per forward pass (a shared module), "
                             f"so its output is ambiguous; pick a layer that runs once (see list_layers).")
        out = outs[0]
        if self.layout is None:
            self.layout = TokenLayout.infer(out, self.model, self.tokens, self.prefix_tokens, self.layer)
        return self.layout.to_maps(out).to(device="cpu", dtype=torch.float32).contiguous()


def capture(model: nn.Module, layer: str, images, batch_size: int = 64, tokens: str = "patches",
            prefix_tokens: Optional[int] = None, progress: bool = False) -> torch.Tensor:
    """The feature maps of ``layer`` for a tensor of images.

    Parameters
    ----------
    model : nn.Module
        Used as given (not moved, not switched to eval mode; do that yourself).
    layer : str
        Dotted module name (see :func:`unveil.capture.list_layers`).
    images : tensor (N, 3, H, W)
        Preprocessed images; moved batch by batch to the model's device.
    batch_size : int
    tokens : {"patches", "all"}
        For token outputs (ViT): drop the prefix tokens and use the patch grid, or keep every token
        (see the module docstring).
    prefix_tokens : int, optional
        Number of leading prefix tokens (default: ``model.num_prefix_tokens`` or a guess).
    progress : bool
        Show a progress bar.

    Returns
    -------
    maps : float32 CPU tensor (N, D, H, W)

    Examples
    --------
    >>> import torch
    >>> from unveil.models import load_model
    >>> model, _, _ = load_model("resnet18")
    >>> capture(model, "layer3", torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 256, 4, 4])
    """
    from .._validation import check_positive_int
    batch_size = check_positive_int(batch_size, "batch_size")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValidationError(f"images must be a (N, C, H, W) tensor, got "
                              f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}.")
    if images.shape[0] == 0:
        raise ValidationError("images is empty (N = 0); pass at least one image.")
    cap = Capturer(model, layer, tokens, prefix_tokens)
    out = [cap(images[i:i + batch_size]) for i in _progress(range(0, images.shape[0], batch_size),
                                                            enabled=progress, desc=f"capture {layer}")]
    return torch.cat(out)
