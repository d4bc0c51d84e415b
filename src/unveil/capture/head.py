"""The head f⁺: the part of the network above a layer, as a module mapping that layer's maps to logits.

:func:`make_head` traces the model with ``torch.fx``, finds the node that is the layer's output and
keeps the part of the graph that computes the logits from it. That works only when the layer's
output *dominates* the logits: nothing above the layer may need another value computed below it
(the inside of a residual block fails — its input is added back after it). :func:`valid_cuts`
lists the layers where the cut works. Reads of the input's batch size (``x.size(0)``,
``x.shape[0]``) are rewritten to read the layer output's batch size.

The head *shares* the model's modules and parameters (no copy, the model is not changed). It runs
them on detached parameters, so gradients reach the maps (for URA) but never the model's
parameters (their ``.grad`` stays untouched), and ``head.parameters()`` is empty: an optimiser
built on the head steps nothing. Modules run in the model's current mode (batch norm, dropout):
put the model in eval mode first (the CLI does). Python-level branches on ``self.training`` are
fixed when the head is made.
"""
from __future__ import annotations

import logging
import operator
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from .._errors import HeadError, LayerError
from .hooks import TokenLayout, hooks
from .layers import _probe_forward, get_layer, model_device_dtype, suggest

__all__ = ["make_head", "valid_cuts", "FrozenHead"]
logger = logging.getLogger("unveil")


class _ModuleTracer(fx.Tracer):
    """fx tracer that remembers, for every sub-module call, the node holding its output."""

    def __init__(self):
        super().__init__()
        self.module_outputs: Dict[str, List[Optional[fx.Node]]] = {}

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        try:
            name = self.path_of_module(m)
        except NameError:
            return out
        self.module_outputs.setdefault(name, []).append(out.node if isinstance(out, fx.Proxy) else None)
        return out


def _trace(model: nn.Module) -> Tuple[fx.Graph, Dict[str, List[Optional[fx.Node]]]]:
    tracer = _ModuleTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "no automatic head"
        raise HeadError(f"cannot build the head of {type(model).__name__} automatically: torch.fx cannot trace "
                        f"it ({type(exc).__name__}: {str(exc)[:300]}). Pass your own head= (an nn.Module "
                        f"mapping the layer's (N, D, H, W) maps to logits).") from None
    return graph, tracer.module_outputs


def _is_placeholder(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "placeholder"


def _batch_size_read(n: fx.Node) -> bool:
    """``x.size(0)`` or ``x.shape[0]`` on the model input."""
    if n.op == "call_method" and n.target == "size" and n.args and _is_placeholder(n.args[0]):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return dim == 0
    if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 and n.args[1] == 0:
        src = n.args[0]
        return (isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr
                and _is_placeholder(src.args[0]) and src.args[1] == "shape")
    return False


def _above(graph: fx.Graph, cut: fx.Node):
    """Nodes needed for the output when ``cut`` is given; (nodes, None) or (None, offending node)."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    needed, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n is cut or _batch_size_read(n):
            continue
        if n.op == "placeholder":
            return None, n
        stack.extend(n.all_input_nodes)
    return needed, None


def _cut_node(module_outputs, layer: str) -> Tuple[Optional[fx.Node], str]:
    nodes = module_outputs.get(layer)
    if not nodes:
        return None, "it is not called in the traced forward pass"
    if len(nodes) > 1:
        return None, f"it is called {len(nodes)} times per forward pass (a shared module)"
    if nodes[0] is None:
        return None, "its output is not a single tensor"
    return nodes[0], ""


def valid_cuts(model: nn.Module) -> List[str]:
    """Layers whose output alone determines the logits (where :func:`make_head` can cut the model).

    Examples
    --------
    >>> from unveil.models import load_model
    >>> model, _, _ = load_model("resnet18")
    >>> [c for c in valid_cuts(model) if c.startswith("layer") and "." not in c]
    ['layer1', 'layer2', 'layer3', 'layer4']
    """
    return _cuts(model, *_trace(model))


def _cuts(model: nn.Module, graph: fx.Graph, outputs) -> List[str]:
    ok = []
    for name, _ in model.named_modules():
        node = _cut_node(outputs, name)[0] if name else None
        if node is not None and _above(graph, node)[0] is not None:
            ok.append(name)
    return ok


class FrozenHead(nn.Module):
    """The network above a layer: ``(N, D, H, W)`` maps (as :func:`capture` returns them) -> logits.

    Shares the model's modules; runs them on detached parameters (see the module docstring).
    ``.to(device)`` moves a private copy of the parameters, never the model.
    """

    def __init__(self, graph_module: fx.GraphModule, layout: TokenLayout, layer: str, model_name: str):
        super().__init__()
        self.__dict__["_graph_module"] = graph_module  # not registered: parameters() stays empty
        self.layout, self.layer, self.model_name = layout, layer, model_name
        self._state: Optional[Dict[str, torch.Tensor]] = None

    def _tensors(self) -> Dict[str, torch.Tensor]:
        gm = self._graph_module
        return {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}

    def _apply(self, fn, recurse=True):
        src = self._state if self._state is not None else self._tensors()
        self._state = {k: fn(v.detach()) for k, v in src.items()}
        return self

    def forward(self, maps: torch.Tensor, _buffers: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        if maps.dim() != 4:
            raise HeadError(f"the head of layer {self.layer!r} takes (N, D, H, W) maps, got shape {tuple(maps.shape)}.")
        x = self.layout.to_output(maps)
        if x is maps:
            x = maps.clone()  # in-place modules above the layer (ReLU(inplace=True)) must not change the caller's maps
        if self._state is not None:
            state = dict(self._state)
        else:
            state = {k: v.detach() for k, v in self._tensors().items()}
        if _buffers:
            state.update(_buffers)
        try:
            return torch.func.functional_call(self._graph_module, state, (x,), strict=False)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise HeadError(f"the head of layer {self.layer!r} ({self.model_name}) failed on maps of shape "
                            f"{tuple(maps.shape)} ({type(exc).__name__}: {str(exc)[:300]}); pass maps captured "
                            f"from that layer of that model.") from None

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, model={self.model_name}, layout={self.layout.kind}"


def make_head(model: nn.Module, layer: str, tokens: str = "patches", prefix_tokens: Optional[int] = None,
              input_size: Optional[int] = None, layout: Optional[TokenLayout] = None,
              check: bool = True) -> FrozenHead:
    """The head f⁺ of ``model`` above ``layer``: maps as :func:`capture` returns them -> logits.

    Parameters
    ----------
    model : nn.Module
        A ``torch.fx``-traceable model (otherwise :class:`HeadError`; pass your own head then).
    layer : str
        Dotted module name; must be a valid cut (:func:`valid_cuts`), else :class:`LayerError`
        naming the layers that work.
    tokens, prefix_tokens :
        Same meaning as in :func:`capture`; the head accepts exactly what capture returns.
    input_size : int, optional
        Side of the random probe image used to learn the layer's output layout and to check
        ``head(capture(x)) == model(x)`` (default: ``model.image_size`` if set, else 224).
    layout : TokenLayout, optional
        Known layout (e.g. from a store); skips the probe when ``check`` is False.
    check : bool
        Run the probe check (in eval mode a mismatch raises :class:`HeadError`).

    Returns
    -------
    FrozenHead

    Examples
    --------
    >>> import torch
    >>> from unveil.models import load_model
    >>> from unveil.capture import capture
    >>> model, _, _ = load_model("resnet18")
    >>> head = make_head(model, "layer3", input_size=64)
    >>> x = torch.rand(2, 3, 64, 64)
    >>> bool(torch.allclose(head(capture(model, "layer3", x)), model(x), atol=1e-4))
    True
    """
    get_layer(model, layer)
    graph, outputs = _trace(model)
    cut, why = _cut_node(outputs, layer)
    offender = None
    if cut is not None:
        needed, offender = _above(graph, cut)
    if cut is None or offender is not None:
        ok = _cuts(model, graph, outputs)
        if offender is not None:
            why = ("the network above it also needs values computed before it (e.g. a residual connection "
                   "that skips over it), so its output alone does not determine the logits")
        near = suggest(layer, ok, n=5)
        hint = (f" Layers that work: {', '.join(repr(n) for n in near)}" + (f" (and {len(ok) - len(near)} more; "
                f"see valid_cuts(model))." if len(ok) > len(near) else ".")) if ok else " No layer of this model works."
        raise LayerError(f"cannot cut {type(model).__name__} at layer {layer!r}: {why}.{hint} Or pass your own head=.")

    new = fx.Graph()
    x = new.placeholder("maps")
    env: Dict[fx.Node, fx.Node] = {cut: x}
    for n in graph.nodes:
        if n not in needed or n is cut:
            continue
        if _batch_size_read(n):
            env[n] = new.call_method("size", (x, 0))
        elif n.op == "output":
            new.output(fx.graph.map_arg(n.args[0], lambda a: env[a]))
        else:
            env[n] = new.node_copy(n, lambda a: env[a])
    new.lint()
    gm = fx.GraphModule(model, new, class_name=f"{type(model).__name__}Head")

    if layout is None or check:
        probe_layout = _probe(model, layer, gm, tokens, prefix_tokens, input_size, layout, check)
        layout = layout or probe_layout
    head = FrozenHead(gm, layout, layer, type(model).__name__)
    head.train(model.training)  # mirrors the mode the model's modules run in (touches only the wrapper)
    if layout.n_dropped:
        raise LayerError(f"layer {layer!r} outputs tokens with {layout.n_prefix} prefix token(s) (CLS) that "
                         f"tokens='patches' drops, but the network above the layer needs them; capture and make "
                         f"the head with tokens='all' (every token kept as a position of (N, D, T, 1) maps).")
    return head


def _probe(model, layer, gm, tokens, prefix_tokens, input_size, layout, check) -> TokenLayout:
    size = int(input_size or getattr(model, "image_size", None) or 224)
    device, dtype = model_device_dtype(model)
    g = torch.Generator().manual_seed(0)
    xin = torch.rand(2, 3, size, size, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        with hooks(model, layer, clone=True) as rec:
            try:
                logits = _probe_forward(model, xin)  # on copies of the buffers: running stats untouched
            except Exception as exc:  # noqa: BLE001
                raise HeadError(f"the probe forward of a (2, 3, {size}, {size}) image through {type(model).__name__} "
                                f"failed ({type(exc).__name__}: {exc}); pass input_size= the model accepts.") from None
        out = rec[layer]
        found = TokenLayout.infer(out, model, tokens, prefix_tokens, layer)
        if layout is not None and layout.kind != found.kind:
            raise HeadError(f"the stored layout of layer {layer!r} ({layout.kind}) does not match the model's "
                            f"output ({found.kind}); the store was made with another model.")
        if check and not found.n_dropped and isinstance(logits, torch.Tensor):
            head = FrozenHead(gm, found, layer, type(model).__name__)
            buffers = {k: v.clone() for k, v in gm.named_buffers()}
            got = head(found.to_maps(out), _buffers=buffers)
            if got.shape != logits.shape or not torch.allclose(got, logits, rtol=1e-4, atol=1e-4 * (1 + float(logits.abs().max()))):
                msg = (f"the head cut at layer {layer!r} does not reproduce {type(model).__name__}'s output "
                       f"(max difference {float((got - logits).abs().max()) if got.shape == logits.shape else 'shape'}).")
                if model.training:
                    logger.warning("%s The model is in train mode (dropout, batch statistics); call model.eval().", msg)
                else:
                    raise HeadError(msg + " Pass your own head=.")
    return found
