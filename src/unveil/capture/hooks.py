"""The one place forward hooks are put on a model: :func:`on_layer`, :func:`hooks`, :func:`capture`.

- :func:`on_layer` is the primitive everything that reads or rewrites a layer uses (capture, the
  edits of :mod:`unveil.edit`, the explanations of :mod:`unveil.explain`): inside its ``with``
  block it *records* the layer's output as feature maps and/or *replaces* it by ``fn(maps)``,
  written back in the layer's own layout.
- :func:`hooks` records the raw outputs of several layers (any type: :func:`list_layers`,
  the head's probe).
- :func:`capture` / :class:`Capturer`: a layer's maps for a tensor of images (with
  :func:`on_layer`).

Feature maps are always ``(N, D, H, W)`` (:class:`TokenLayout` converts both ways):

- a conv layer's ``(N, D, H, W)`` output is kept as is;
- a vector output ``(N, D)`` becomes ``(N, D, 1, 1)``;
- a token output ``(N, T, D)`` (a ViT block) becomes maps whose positions are tokens. With
  ``tokens="patches"`` (the default) the ``P`` leading prefix tokens (CLS, register/distillation
  tokens) are dropped and the ``T − P`` patch tokens are laid out on their grid ``(N, D, h, w)``
  (row-major, as a patch embedding flattens them; ``(N, D, T − P, 1)`` when no square grid fits).
  With ``tokens="all"`` every token is kept, prefix tokens first: ``(N, D, T, 1)``.
  ``P`` is ``prefix_tokens`` if given, else the model's ``num_prefix_tokens`` attribute (timm's
  convention; 0 for a layer whose ``T`` tokens exactly fill the model's ``grid_size``, such as the
  patch embedding below the prefix tokens), else 1 when ``T − 1`` is a perfect square and ``T``
  is not, else 0.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._errors import LayerError, ValidationError
from .._progress import progress as _progress
from .._validation import check_positive_int
from .layers import get_layer, model_device_dtype

__all__ = ["on_layer", "LayerRecord", "hooks", "Recording", "TokenLayout", "capture", "Capturer",
           "model_device_dtype"]
logger = logging.getLogger("unveil")

TOKEN_MODES = ("patches", "all")


class _StopForward(BaseException):
    """Raised by a hook to end a forward pass once the wanted layer has been recorded.

    ``args[0]`` is the record it was raised for, so a :func:`on_layer` block swallows only its own.
    """


@contextmanager
def _forward_hooks(model: nn.Module, fns: Sequence[Tuple[str, Callable]]) -> Iterator[None]:
    """Register each ``(layer name, fn)`` as a forward hook; remove them all on exit (also on errors).

    The only ``register_forward_hook`` of the package. The layers are looked up (with "did you
    mean" errors) before any hook is registered.
    """
    modules = [(get_layer(model, n), fn) for n, fn in fns]
    handles = []
    try:
        for module, fn in modules:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


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
    """Record the raw outputs of ``layers`` during the forward passes run inside the ``with`` block.

    The outputs are kept as the layers return them (any type: tensors, tuples, ...); for one
    layer's output as ``(N, D, H, W)`` maps, or to change it, use :func:`on_layer`. Every hook is
    removed when the block exits, also when it raises.

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
    rec = Recording(names)

    def make_hook(name):
        def hook(_m, _inp, out):
            rec.outputs[name].append(_detach(out, clone))
            if rec.stop_when_done and all(rec.outputs[n] for n in names):
                raise _StopForward(rec)
        return hook

    with _forward_hooks(model, [(n, make_hook(n)) for n in names]):
        yield rec


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
        grids = []  # the patch grids the model declares (timm's convention)
        for holder in ((getattr(model, "patch_embed", None), model) if model is not None else ()):
            g = getattr(holder, "grid_size", None) if holder is not None else None
            if isinstance(g, (tuple, list)) and len(g) == 2:
                grids.append((int(g[0]), int(g[1])))
        if prefix_tokens is None and model is not None:
            prefix_tokens = getattr(model, "num_prefix_tokens", None)
            if prefix_tokens is not None and any(a * b == T for a, b in grids):
                prefix_tokens = 0  # exactly the patch grid: a layer below the prefix tokens (the patch embedding)
        if prefix_tokens is None:
            prefix_tokens = 1 if (T > 1 and _is_square(T - 1) and not _is_square(T)) else 0
        P = int(prefix_tokens)
        if not 0 <= P < T:
            raise ValidationError(f"prefix_tokens must be in [0, {T - 1}] for layer {layer!r} with {T} tokens, "
                                  f"got {P}.")
        if tokens == "all":
            return cls("tokens", tokens, T, P, (T, 1))
        n = T - P
        grid = next((g for g in grids if g[0] * g[1] == n), None)
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

    def to_output(self, maps: torch.Tensor, original: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(N, D, H, W)`` maps -> what the layer outputs (the inverse of :meth:`to_maps`).

        With ``tokens="patches"`` the maps lack the prefix tokens; ``original`` (the layer's output
        the maps came from) supplies them, unchanged, in front of the patch tokens. Without it such
        maps cannot be turned back (:class:`LayerError`).
        """
        if self.kind == "map":
            return maps
        if self.kind == "vector":
            return maps.mean(dim=(2, 3))
        patches = maps.flatten(2).transpose(1, 2)
        if not self.n_dropped:
            return patches
        if original is None:
            raise LayerError(f"the maps hold only the patch tokens; the {self.n_prefix} prefix token(s) (CLS) "
                             f"that the rest of the network needs were dropped. Capture with tokens='all'.")
        return torch.cat([original[:, :self.n_dropped, :], patches], dim=1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(d["kind"], d.get("tokens", "patches"), int(d.get("n_tokens", 0)), int(d.get("n_prefix", 0)),
                   tuple(int(v) for v in d.get("grid", (0, 0))))


class LayerRecord:
    """What :func:`on_layer` recorded: the layer's maps, one entry per call of the layer.

    Attributes
    ----------
    layer : str
    maps : list of tensor (N, D, H, W)
        The layer's output as maps, as the layer produced it (before any ``replace``), in the
        layer's device and dtype; empty without ``record=True``.
    layouts : list of TokenLayout
        The layout of each call (also filled without ``record``).
    """

    def __init__(self, layer: str):
        self.layer = layer
        self.maps: List[torch.Tensor] = []
        self.layouts: List[TokenLayout] = []

    @property
    def calls(self) -> int:
        """How often the layer ran inside the block."""
        return len(self.layouts)

    def _check_called(self, what: List) -> None:
        if not what:
            raise LayerError(f"layer {self.layer!r} was not called during the forward pass, so nothing was "
                             f"recorded; pick a layer the model uses (see list_layers).")

    @property
    def last(self) -> torch.Tensor:
        """The maps of the layer's last call (:class:`LayerError` if it was not called or not recorded)."""
        self._check_called(self.maps)
        return self.maps[-1]

    @property
    def layout(self) -> TokenLayout:
        """The layout of the layer's last call."""
        self._check_called(self.layouts)
        return self.layouts[-1]


@contextmanager
def on_layer(model: nn.Module, layer: str, *, record: bool = False,
             replace: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, tokens: str = "patches",
             prefix_tokens: Optional[int] = None, layout: Optional[TokenLayout] = None, detach: bool = True,
             clone: bool = True, stop: bool = False) -> Iterator[LayerRecord]:
    """Record and/or replace ``layer``'s output, as ``(N, D, H, W)`` maps, in the forward passes of the block.

    Every call of the layer inside the ``with`` block turns its output into maps with
    :class:`TokenLayout` (conv maps as they are, vectors as ``(N, D, 1, 1)``, ViT tokens on their
    patch grid, see the module docstring), then

    1. with ``record``, appends the maps to the yielded :class:`LayerRecord`'s ``maps``;
    2. with ``stop``, ends the forward pass there: the ``with`` block is left at once, without an
       error (use it as ``with on_layer(..., stop=True) as rec: model(x)``);
    3. with ``replace``, makes the layer output ``replace(maps)`` instead, written back in the
       layer's own layout (prefix tokens dropped by ``tokens="patches"`` are passed through
       unchanged). ``replace`` must return maps of the shape it got. Without ``replace`` the
       output is not touched.

    The hook is removed when the block exits, also when it raises.

    Parameters
    ----------
    model : nn.Module
        Used as given (not moved, mode unchanged).
    layer : str
        Dotted module name (see :func:`unveil.capture.list_layers`); checked before anything runs.
    record : bool
        Keep the maps of every call.
    replace : callable maps -> maps, optional
        The new output.
    tokens, prefix_tokens :
        How token outputs become maps (same meaning as in :func:`capture`).
    layout : TokenLayout, optional
        Use this layout (e.g. a store's) instead of inferring one from each call's output; a call
        whose token count differs raises :class:`LayerError`.
    detach, clone : bool
        Recorded maps are detached from the graph (``detach=False`` keeps them differentiable) and
        copied, so in-place operations of the layers above cannot change them.
    stop : bool
        End the forward pass right after the layer's first call (a capture needs nothing above it).

    Yields
    ------
    LayerRecord

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten())
    >>> with on_layer(net, "0", record=True) as rec:
    ...     _ = net(torch.ones(1, 1, 2, 2))
    >>> rec.last.shape
    torch.Size([1, 2, 2, 2])
    >>> with on_layer(net, "0", replace=lambda m: m * 0):
    ...     net(torch.ones(1, 1, 2, 2)).abs().sum().item()
    0.0
    """
    if tokens not in TOKEN_MODES:
        raise ValidationError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}.")
    if not (record or stop or replace is not None):
        raise ValidationError("on_layer does nothing without record=True, stop=True or replace=fn; pass one.")
    if replace is not None and not callable(replace):
        raise ValidationError(f"replace must be a function mapping (N, D, H, W) maps to maps, got "
                              f"{type(replace).__name__}.")
    rec = LayerRecord(layer)

    def hook(_m, _inp, out):
        lay = layout if layout is not None else TokenLayout.infer(out, model, tokens, prefix_tokens, layer)
        maps = lay.to_maps(out)
        rec.layouts.append(lay)
        if record:
            kept = maps.detach() if detach else maps
            rec.maps.append(kept.clone() if clone else kept)
        if stop:
            raise _StopForward(rec)
        if replace is not None:
            return lay.to_output(replace(maps), original=out)
        return None

    with _forward_hooks(model, [(layer, hook)]):
        try:
            yield rec
        except _StopForward as exc:
            if not (exc.args and exc.args[0] is rec):
                raise


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
        # the first batch runs the whole forward, to count the layer's calls; later ones stop after it
        with on_layer(self.model, self.layer, record=True, tokens=self.tokens, prefix_tokens=self.prefix_tokens,
                      layout=self.layout, clone=True, stop=self.layout is not None) as rec:
            self.model(x)
        if not rec.maps:
            raise LayerError(f"layer {self.layer!r} was not called during the forward pass; pick a layer the "
                             f"model uses (see list_layers).")
        if len(rec.maps) > 1 and self.layout is None:
            raise LayerError(f"layer {self.layer!r} is called {len(rec.maps)} times per forward pass (a shared "
                             f"module), so its output is ambiguous; pick a layer that runs once (see list_layers).")
        if self.layout is None:
            self.layout = rec.layouts[0]
        return rec.maps[0].to(device="cpu", dtype=torch.float32).contiguous()


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
