"""Figures of the report: detector montages, detector heatmaps, the influence heatmap, method bars.

Montages are plain image arrays (:func:`detector_montage`, no matplotlib needed); the plot
functions draw on a matplotlib Axes (``ax=None`` makes a new pyplot figure), return the Axes and
never call ``show()``. Matplotlib is imported lazily. The report itself draws on
:func:`new_figure` figures (``matplotlib.figure.Figure`` rendered by the Agg canvas), so writing a
report never touches pyplot's global state or the user's backend.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["detector_montage", "upsample_maps", "new_figure", "overlay_mask", "plot_detector_montage", "plot_detector_heatmaps",
           "plot_influence", "plot_class_influence", "plot_method_comparison", "plot_contributions", "plot_probabilities", "png_bytes", "figure_png", "safe_text"]

_MASK_RGB = np.array([255, 0, 255], np.float32)


def _plt():
    import matplotlib.pyplot as plt
    return plt


def new_figure(figsize=(6.0, 4.0)):
    """A matplotlib Figure outside pyplot (Agg canvas): no global state, no backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def safe_text(s) -> str:
    """A label for matplotlib text: ``$`` escaped so that mathtext never parses user names."""
    return str(s).replace("$", r"\$")


def upsample_maps(maps, size) -> np.ndarray:
    """Bilinearly upsample maps ``(N, h, w)`` to ``size`` = (H, W) (the dissection's convention)."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    if t.dim() == 2:
        t = t[None]
    if tuple(t.shape[-2:]) == tuple(size):
        return t.numpy()
    return F.interpolate(t[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0].numpy()


def _boundary(mask: np.ndarray) -> np.ndarray:
    m = mask
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overlay_mask(image: np.ndarray, mask: np.ndarray, scale: int = 2, dim: float = 0.35) -> np.ndarray:
    """The image (H, W, 3 uint8) with pixels outside ``mask`` dimmed and the mask outlined in magenta."""
    img = np.asarray(image, np.float32)
    m = np.asarray(mask, bool)
    if scale > 1:
        img = img.repeat(scale, 0).repeat(scale, 1)
        m = m.repeat(scale, 0).repeat(scale, 1)
    out = np.where(m[..., None], img, dim * img)
    out[_boundary(m)] = _MASK_RGB
    return np.clip(out, 0, 255).astype(np.uint8)


def detector_montage(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], threshold: float = 0.5,
                     scale: int = 2, gap: int = 3, boxes: Optional[Sequence] = None) -> np.ndarray:
    """One row of images with a detector's mask overlaid.

    Parameters
    ----------
    images : sequence of uint8 (H, W, 3)
    maps : sequence of (h, w) detector values, upsampled bilinearly to (H, W) and thresholded
        at ``threshold`` (as in the dissection).
    scale : nearest-neighbour enlargement of every image.
    boxes : optional (y0, x0, y1, x1) fractions per image (the map cell of the maximum), drawn in yellow.

    Returns
    -------
    uint8 array (H·scale, n·(W·scale + gap) − gap, 3)

    Examples
    --------
    >>> img = np.zeros((8, 8, 3), np.uint8)
    >>> detector_montage([img, img], [np.ones((2, 2)), np.zeros((2, 2))]).shape
    (16, 35, 3)
    """
    if len(images) == 0:
        return np.full((8, 8, 3), 255, np.uint8)
    tiles = []
    for k, (im, mp) in enumerate(zip(images, maps)):
        h, w = im.shape[:2]
        up = upsample_maps(mp, (h, w))[0]
        tile = overlay_mask(im, up > threshold, scale=scale)
        if boxes is not None and boxes[k] is not None:
            y0, x0, y1, x1 = boxes[k]
            H, W = tile.shape[:2]
            r0, c0 = int(round(y0 * H)), int(round(x0 * W))
            r1, c1 = max(int(round(y1 * H)) - 1, r0), max(int(round(x1 * W)) - 1, c0)
            yellow = np.array([255, 220, 0], np.uint8)
            tile[r0, c0:c1 + 1] = tile[r1, c0:c1 + 1] = yellow
            tile[r0:r1 + 1, c0] = tile[r0:r1 + 1, c1] = yellow
        tiles.append(tile)
    H = max(t.shape[0] for t in tiles)
    W = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    out = np.full((H, W, 3), 255, np.uint8)
    x = 0
    for t in tiles:
        out[:t.shape[0], x:x + t.shape[1]] = t
        x += t.shape[1] + gap
    return out


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 image array (H, W, 3) as PNG bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def figure_png(fig, dpi: int = 90) -> bytes:
    """Render a matplotlib Figure to PNG bytes (a pyplot-managed figure is closed afterwards)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        if getattr(fig.canvas, "manager", None) is not None:
            _plt().close(fig)
    return buf.getvalue()


def plot_detector_montage(montage: np.ndarray, title: Optional[str] = None, ax=None):
    """Show a :func:`detector_montage` array; returns the Axes."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(montage.shape[1] / 60, montage.shape[0] / 60 + 0.3))
    ax.imshow(montage, interpolation="nearest")
    if title:
        ax.set_title(safe_text(title), fontsize=8)
    ax.set_axis_off()
    return ax


def plot_detector_heatmaps(image: np.ndarray, maps: Sequence[np.ndarray], titles: Sequence[str],
                           axes=None, threshold: float = 0.5):
    """One image and, next to it, each detector's upsampled map as a heatmap over the image.

    Parameters
    ----------
    image : uint8 (H, W, 3)
    maps : sequence of (h, w) detector values in [0, 1]
    titles : one title per map
    axes : sequence of ``1 + len(maps)`` Axes, or None (a new one-row figure)

    Returns
    -------
    list of Axes
    """
    plt = _plt()
    if axes is None:
        _, axes = plt.subplots(1, 1 + len(maps), figsize=(1.7 * (1 + len(maps)), 1.9))
    axes = list(np.ravel(axes))
    h, w = image.shape[:2]
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image", fontsize=7)
    for ax, mp, t in zip(axes[1:], maps, titles):
        up = upsample_maps(mp, (h, w))[0]
        ax.imshow((0.45 * image).astype(np.uint8), interpolation="nearest")
        ax.imshow(up, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.75, interpolation="bilinear")
        if (up > threshold).any():
            ax.contour(up > threshold, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(safe_text(t), fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


def plot_influence(scores: np.ndarray, significant: np.ndarray, row_names: Sequence[str],
                   col_names: Sequence[str], ax=None, label: str = "RCAV score", vmax: Optional[float] = None):
    """Heatmap of RCAV scores (rows = directions, columns = classes); ``*`` marks significant pairs.

    ``vmax`` sets the colour range ±vmax (default 1, the range of the sign score, or the largest
    |score| when a score exceeds it). Returns the Axes.
    """
    plt = _plt()
    scores = np.asarray(scores, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.75 * scores.shape[1], 0.9 + 0.22 * scores.shape[0]))
    if vmax is None:
        top = float(np.nanmax(np.abs(scores))) if np.isfinite(scores).any() else 1.0
        vmax = 1.0 if top <= 1.0 else top
    im = ax.imshow(np.nan_to_num(scores, nan=0.0), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    from matplotlib import patheffects
    for (i, k), sig in np.ndenumerate(np.asarray(significant, bool)):
        if sig:  # a white star with a black outline reads on every cell colour
            ax.text(k, i, "*", ha="center", va="center", fontsize=11, color="white", fontweight="bold",
                    path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    ax.set_xticks(range(len(col_names)))
    ax.set_xticklabels([safe_text(c) for c in col_names], rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_names)))
    ax.set_yticklabels([safe_text(r) for r in row_names], fontsize=7)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label(safe_text(label), fontsize=7)
    cb.ax.tick_params(labelsize=6)
    return ax


def plot_class_influence(scores: Sequence[float], significant: Sequence[bool], names: Sequence[str], n: int = 3,
                         ax=None, title: Optional[str] = None, xmax: Optional[float] = None):
    """One class's concept → class diagram: its ``n`` most positive and ``n`` most negative concepts.

    ``scores`` / ``significant`` hold one value per concept (direction) for this class. Bars to the
    right (red) raise the class, to the left (blue) lower it; significant concepts are drawn solid and
    marked ``*``, the others pale and hatched. Returns the Axes.
    """
    if ax is None:
        _, ax = _plt().subplots(figsize=(3.0, 0.5 + 0.28 * 2 * n))
    s = np.nan_to_num(np.asarray(scores, dtype=float), nan=0.0)
    sig = np.asarray(significant, bool)
    order = np.argsort(s, kind="stable")
    pos = [int(i) for i in order[::-1][:n] if s[i] > 0]
    neg = [int(i) for i in order[:n] if s[i] < 0][::-1]
    picks = pos + neg
    top = xmax if xmax is not None else (float(np.abs(s).max()) if s.size and np.abs(s).max() > 0 else 1.0)
    y = np.arange(len(picks))[::-1]
    for yy, i in zip(y, picks):
        ax.barh(yy, s[i], height=0.7, color="#c0392b" if s[i] > 0 else "#2e6fb0", alpha=1.0 if sig[i] else 0.35,
                hatch=None if sig[i] else "//", edgecolor="black", linewidth=0.3)
    ax.set_yticks(y)
    ax.set_yticklabels([safe_text(names[i]) + (" *" if sig[i] else "") for i in picks], fontsize=6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlim(-1.05 * top, 1.05 * top)
    ax.tick_params(axis="x", labelsize=6)
    ax.spines[["top", "right"]].set_visible(False)
    if title:
        ax.set_title(safe_text(title), fontsize=7)
    return ax


def plot_method_comparison(summaries: dict, keys: Sequence[str] = ("S1", "S2", "n_distinct"), ax=None):
    """Grouped bars of dissection summaries per method (``{method: {key: value}}``); returns the Axes."""
    plt = _plt()
    methods = list(summaries)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 1.1 * len(methods), 2.4))
    width = 0.8 / max(len(keys), 1)
    x = np.arange(len(methods))
    for j, key in enumerate(keys):
        vals = [float(summaries[m].get(key, 0.0)) for m in methods]
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, vals, width, label=safe_text(key))
    ax.set_xticks(x)
    ax.set_xticklabels([safe_text(m) for m in methods], fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=7)
    return ax


def plot_contributions(contributions: Sequence[float], names: Sequence[str], ax=None, title: Optional[str] = None):
    """Horizontal bars of concept contributions (Δ logit when the concept is removed), first on top."""
    if ax is None:
        _, ax = _plt().subplots(figsize=(3.2, 0.5 + 0.3 * len(names)))
    vals = np.asarray(contributions, dtype=float)
    ypos = np.arange(len(vals))[::-1]
    ax.barh(ypos, vals, color=["#2f7d32" if v >= 0 else "#c62828" for v in vals])
    ax.set_yticks(ypos)
    ax.set_yticklabels([safe_text(n) for n in names], fontsize=6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_xlabel("Δ logit of the predicted class", fontsize=6)
    if title:
        ax.set_title(safe_text(title), fontsize=7)
    return ax


def plot_probabilities(before: Sequence[float], after: Sequence[float], class_names: Sequence[str], ax=None,
                       title: Optional[str] = None):
    """Grouped bars: class probabilities before and after an edit."""
    if ax is None:
        _, ax = _plt().subplots(figsize=(3.6, 2.2))
    b, a = np.asarray(before, float), np.asarray(after, float)
    x = np.arange(len(b))
    ax.bar(x - 0.2, b, width=0.4, label="before", color="#5b7db1")
    ax.bar(x + 0.2, a, width=0.4, label="concept removed", color="#e08a2c")
    ax.set_xticks(x)
    ax.set_xticklabels([safe_text(c) for c in class_names], rotation=35, ha="right", fontsize=6)
    ax.set_ylim(0, 1)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_ylabel("probability", fontsize=6)
    ax.legend(fontsize=6, frameon=False)
    if title:
        ax.set_title(safe_text(title), fontsize=7)
    return ax
