"""Per-image explanations: where each concept is, and how much it pushed the prediction.

For an image with predicted class c, the explanation holds

- the prediction (class, softmax probabilities, logits);
- the detector maps ``y_{p,i} = σ(w_iᵀx_p − b_i)`` on the layer's grid, shape (I, h, w);
- each concept's **contribution**: ``logit_c(x) − logit_c(x without concept i)``, where concept i
  is removed at the layer with its signal vector, ``x'_p = x_p − m_p·k_p·ŝ_i`` with
  ``m_p = σ(w_iᵀx_p − b_i)`` and, by default, ``k_p = â_{p,i}`` — the concept's own signal value
  at p, i.e. exactly what the detector reads above the data mean (after the edit a fully detected
  position reads ``w_iᵀμ``). ``remove_strength=k`` uses a fixed k instead. The result is
  ReLU-clamped when the layer is non-negative (detected per batch, or ``nonneg=``). Each concept
  is removed alone; contributions are not additive in general. A positive contribution means the
  concept supported the predicted class.

The maps are recorded, and the removal runs, inside the model's forward pass
(:func:`unveil.capture.on_layer`, a forward hook on the layer removed afterwards), so it works for
any model, also where no head can be cut.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .._errors import ValidationError
from .._validation import check_positive_int
from ..capture.hooks import on_layer
from ..capture.layers import model_device_dtype
from ..edit.counterfactual import check_images
from ..edit.intervention import check_strength, edit_maps

__all__ = ["Explanation", "explain", "plot_explanation"]


@dataclass
class Explanation:
    """The explanation of one image (see the module docstring).

    Attributes
    ----------
    predicted : int
        Predicted class index.
    probs, logits : tensor (K,)
    maps : tensor (I, h, w)
        Detector activations on the layer's grid.
    contributions : tensor (I,)
        ``logit_c − logit_c(concept i removed)`` for the predicted class c.
    top : list of int
        The ``top_k`` concepts with the largest contributions, largest first.
    names : list of str
        Concept names (from the pairs).
    class_name : str or None
    strength : float or None
        The removal strength used (None: each position's signal value).
    """

    predicted: int
    probs: torch.Tensor
    logits: torch.Tensor
    maps: torch.Tensor
    contributions: torch.Tensor
    top: List[int]
    names: List[str]
    class_name: Optional[str] = None
    strength: Optional[float] = None

    def to_dict(self, include_maps: bool = True) -> dict:
        """JSON-able dict (maps as nested lists when ``include_maps``)."""
        d = {"predicted": self.predicted, "class_name": self.class_name,
             "probability": float(self.probs[self.predicted]), "probs": self.probs.tolist(),
             "logits": self.logits.tolist(), "strength": self.strength,
             "top": [{"concept": i, "name": self.names[i], "contribution": float(self.contributions[i]),
                      "max_activation": float(self.maps[i].max())} for i in self.top],
             "contributions": self.contributions.tolist(), "names": list(self.names)}
        if include_maps:
            d["maps"] = self.maps.tolist()
        return d


@torch.no_grad()
def explain(model: nn.Module, layer: str, pairs, images, *, top_k: int = 5, remove_strength: Optional[float] = None,
            nonneg: Optional[bool] = None, batch_size: int = 32, class_names: Optional[Sequence[str]] = None,
            tokens: str = "patches") -> List[Explanation]:
    """Explain the model's prediction for each image with the concepts of ``pairs``.

    Parameters
    ----------
    model : nn.Module
        Used as given (mode and device unchanged; put it in eval mode first).
    layer : str
        The layer the pairs were fitted on.
    pairs : DirectionPairs
    images : tensor (N, C, H, W)
        Preprocessed images.
    top_k : int
        Number of concepts listed in ``Explanation.top``.
    remove_strength : float or None
        k for the removal; None removes each position's signal value (the default, see the
        module docstring).
    nonneg : bool or None
        ReLU clamp after the removal; None detects a non-negative layer per batch.
    batch_size : int
    class_names : sequence of str, optional
    tokens : {"patches", "all"}
        For ViT layers.

    Returns
    -------
    list of Explanation, one per image.

    Examples
    --------
    >>> expl = explain(model, "layer4", pairs, images[:2])   # doctest: +SKIP
    >>> expl[0].top, expl[0].contributions[expl[0].top]      # doctest: +SKIP
    """
    images = check_images(images)
    top_k = check_positive_int(top_k, "top_k")
    batch_size = check_positive_int(batch_size, "batch_size")
    k = check_strength(remove_strength)
    device, dtype = model_device_dtype(model)
    I = pairs.n_concepts
    out: List[Explanation] = []
    for s in range(0, images.shape[0], batch_size):
        xb = images[s:s + batch_size].to(device=device, dtype=dtype)
        with on_layer(model, layer, record=True, tokens=tokens) as seen:
            logits = model(xb).float()
        if not seen.maps:
            raise ValidationError(f"layer {layer!r} was not called during the forward pass; pick the layer the "
                                  f"pairs were fitted on.")
        X = seen.last
        det = pairs.detect(X.float()).cpu()  # also checks the width against the pairs
        use_nonneg = bool((X >= 0).all()) if nonneg is None else bool(nonneg)
        pred = logits.argmax(1)
        rows = torch.arange(xb.shape[0], device=logits.device)
        base = logits[rows, pred]
        contrib = torch.empty(xb.shape[0], I)
        for i in range(I):
            def remove(m, _i=i):
                return edit_maps(m, pairs, [_i], strength=k, mode="remove", nonneg=use_nonneg)
            with on_layer(model, layer, replace=remove, tokens=tokens):
                li = model(xb).float()
            contrib[:, i] = (base - li[rows, pred]).cpu()
        probs = logits.softmax(1).cpu()
        for n in range(xb.shape[0]):
            c = int(pred[n])
            order = torch.argsort(contrib[n], descending=True)[:min(top_k, I)].tolist()
            out.append(Explanation(predicted=c, probs=probs[n], logits=logits[n].cpu(), maps=det[n],
                                   contributions=contrib[n].clone(), top=order, names=list(pairs.names),
                                   class_name=(str(class_names[c]) if class_names is not None and c < len(class_names)
                                               else None), strength=k))
    return out


_COLOURS = np.array([(1.0, 0.1, 0.1), (0.1, 0.5, 1.0), (1.0, 0.85, 0.0), (0.2, 0.9, 0.3), (0.9, 0.3, 0.9),
                     (1.0, 0.55, 0.0), (0.0, 0.9, 0.9), (0.6, 0.4, 0.2)])


def _image_hwc(image) -> np.ndarray:
    img = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 3:
        raise ValidationError(f"image must be (C, H, W) or (H, W, C), got shape {img.shape}.")
    if img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    lo, hi = float(img.min()), float(img.max())
    if lo < 0 or hi > 1.0 + 1e-6:
        img = (img - lo) / max(hi - lo, 1e-12)  # normalised inputs: stretch for display
    return np.clip(img, 0, 1)


def plot_explanation(expl: Explanation, image, ax=None, n_concepts: int = 3, alpha: float = 0.55):
    """Draw the image with the top concepts' detector maps overlaid, and their contributions.

    Parameters
    ----------
    expl : Explanation
    image : tensor (C, H, W) or array (H, W, C)
        The image that was explained (values outside [0, 1] are stretched for display).
    ax : matplotlib Axes, optional
    n_concepts : int
        How many of ``expl.top`` to draw (each in its own colour).
    alpha : float
        Overlay opacity at full activation.

    Returns
    -------
    matplotlib Axes (``show()`` is never called).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 3.6))
    img = _image_hwc(image)
    H, W = img.shape[:2]
    shown = expl.top[:max(0, int(n_concepts))]
    canvas = img.copy()
    handles = []
    for r, i in enumerate(shown):
        m = torch.nn.functional.interpolate(expl.maps[i][None, None].float(), size=(H, W), mode="bilinear",
                                            align_corners=False)[0, 0].clamp(0, 1).numpy()
        col = _COLOURS[r % len(_COLOURS)]
        a = alpha * m[..., None]
        canvas = canvas * (1 - a) + col[None, None, :] * a
        handles.append(Patch(color=col, label=f"{expl.names[i]}: {float(expl.contributions[i]):+.2f}"))
    ax.imshow(np.clip(canvas, 0, 1), interpolation="nearest")
    label = expl.class_name if expl.class_name is not None else f"class {expl.predicted}"
    ax.set_title(f"{label} (p = {float(expl.probs[expl.predicted]):.2f})", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=6, frameon=False,
                  title="Δ logit when removed", title_fontsize=6)
    return ax
