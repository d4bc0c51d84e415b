"""Activation maximisation of concept detectors: evidence that signal vectors are encoding directions.

Protocol (our choice; the paper's is not public)
------------------------------------------------
For every detector i an input image is optimised to maximise the detector's mean pre-sigmoid
activation over the layer's positions, ``mean_p (w_iᵀx_p − b_i)`` (the sigmoid saturates and would
stop the gradients). The image is parametrised as in feature-visualisation practice:

- a Fourier spectrum per colour channel, scaled by ``1 / max(f, 1/S)`` (f the spatial frequency,
  S the side), turned into an image by an inverse real FFT;
- a fixed colour decorrelation (the square root of a natural-image colour covariance);
- a sigmoid to [0, 1], then ``transform`` (e.g. the model's normalisation).

Every step the image is shifted by a random jitter of up to ``jitter`` pixels (torch.roll);
Adam on the spectrum. The *start image* is the image of the initial (small random) spectrum.

The **induced change of the layer representation** is measured two ways (no jitter), with
``Δx_p = x_p(optimised image) − x_p(start image)``:

- **where the concept is written** (``delta``, the reported cosines): ``Σ_p a_p Δx_p`` with
  ``a_p = σ(w_iᵀx_p − b_i) / Σ_q σ(w_iᵀx_q − b_i)`` on the optimised image — the detector's own
  response as weights, so the change is read at the positions where the concept was put;
- **over all positions** (``delta_all``, ``cos_*_all``): ``mean_p Δx_p``. This is the measurement we
  made first. It also averages in whatever the optimisation changed elsewhere in the image, which
  dilutes the concept's direction; both are reported.

The weights are chosen by the decoder w_i, so if anything they favour w_i over ŝ_i. We report
``cos(Δx, ŝ_i)``, ``cos(Δx, w_i)`` and ``cos(Δx, Pattern-CAV_i)``, where Pattern-CAV_i is the difference of the mean activation of the
positions the detector fires on (``y > 0.5``) and of the others, on reference maps. If the signal
vector is the direction in which the network *writes* the concept, Δx aligns with ŝ_i more than
with the decoder w_i.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .._validation import check_in_range, check_maps, check_positive_int, make_generator

__all__ = ["ActMaxResult", "maximize_detectors", "pattern_cav_directions"]

# square root of a natural-image RGB colour covariance (as used by the lucid feature-visualisation
# library), normalised by its largest column norm
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR_SQRT = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


def _describe(v: torch.Tensor) -> Optional[dict]:
    """Mean, standard deviation, median and count of the finite entries (None when there are none)."""
    v = v[torch.isfinite(v)]
    if not v.numel():
        return None
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "median": float(v.median()), "n": int(v.numel())}


@dataclass
class ActMaxResult:
    """Outcome of :func:`maximize_detectors` (one row per detector).

    Attributes
    ----------
    detectors : list of int
    images, start_images : tensor (n, 3, S, S) in [0, 1] (before ``transform``)
    delta : tensor (n, D)
        Induced change of the layer representation where the detector responds (weighted by it).
    cos_signal, cos_filter, cos_pattern_cav : tensor (n,)
        Cosines of ``delta`` with ŝ_i, w_i and Pattern-CAV_i (NaN when no reference maps).
    delta_all, cos_signal_all, cos_filter_all, cos_pattern_cav_all : tensor
        The same for the change of the mean over all positions.
    objective_start, objective_end : tensor (n,)
        Mean pre-sigmoid detector activation before / after the optimisation.
    """

    detectors: List[int]
    images: torch.Tensor
    start_images: torch.Tensor
    delta: torch.Tensor
    cos_signal: torch.Tensor
    cos_filter: torch.Tensor
    cos_pattern_cav: torch.Tensor
    objective_start: torch.Tensor
    objective_end: torch.Tensor
    delta_all: Optional[torch.Tensor] = None
    cos_signal_all: Optional[torch.Tensor] = None
    cos_filter_all: Optional[torch.Tensor] = None
    cos_pattern_cav_all: Optional[torch.Tensor] = None

    def summary(self) -> dict:
        """Mean, standard deviation and median of each cosine over the detectors, and the win rates."""
        out = {name: _describe(getattr(self, name)) for name in ("cos_signal", "cos_filter", "cos_pattern_cav")}
        out["signal_beats_filter"] = float((self.cos_signal > self.cos_filter).float().mean())
        ok = torch.isfinite(self.cos_pattern_cav)
        out["signal_beats_pattern_cav"] = (float((self.cos_signal[ok] > self.cos_pattern_cav[ok]).float().mean())
                                           if ok.any() else None)
        out["objective_gain_mean"] = float((self.objective_end - self.objective_start).mean())
        if self.cos_signal_all is not None:
            all_pos = {name: _describe(getattr(self, name + "_all"))
                       for name in ("cos_signal", "cos_filter", "cos_pattern_cav")}
            all_pos["signal_beats_filter"] = float((self.cos_signal_all > self.cos_filter_all).float().mean())
            out["all_positions"] = all_pos
        return out


def pattern_cav_directions(maps, pairs, detectors: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Pattern-CAV per detector: mean of its firing positions minus mean of the others, (n, D).

    The detector's positives are the concept examples (:func:`unveil.edit.mean_difference_directions`,
    not normalised). Rows of detectors that fire nowhere (or everywhere) are NaN.
    """
    from ..directions.editing_directions import mean_difference_directions
    idx = None if detectors is None else [int(i) for i in detectors]
    return mean_difference_directions(maps, pairs, idx, normalize=False)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-30).float()


class _FourierImage(nn.Module):
    def __init__(self, n: int, size: int, decorrelate: bool, gen: torch.Generator, init_scale: float = 0.01):
        super().__init__()
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        freq = torch.sqrt(fx ** 2 + fy ** 2)
        self.register_buffer("scale", 1.0 / torch.maximum(freq, torch.tensor(1.0 / size)))
        self.spectrum = nn.Parameter(torch.randn(n, 3, size, size // 2 + 1, 2, generator=gen) * init_scale)
        self.size, self.decorrelate = size, decorrelate

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        img = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")
        img = img / 4.0
        if self.decorrelate:
            img = torch.einsum("nchw,dc->ndhw", img, _COLOR_SQRT.to(img))
        return torch.sigmoid(img)


def _layer_maps(model, layer, images, tokens="patches"):
    """The layer's maps for ``images``, differentiable (not detached, not copied)."""
    from ..capture.hooks import on_layer
    with on_layer(model, layer, record=True, detach=False, clone=False, tokens=tokens) as rec:
        model(images)
    return rec.last


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No gradient for the model's parameters inside the block; their ``requires_grad`` is restored after."""
    params_req = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, r in zip(model.parameters(), params_req):
            p.requires_grad_(r)


def _maximize_batch(model, layer, pairs, det, W, b, *, size, steps, lr, jitter, decorrelate, transform, gen,
                    device, dtype, tokens) -> tuple:
    """Optimise one image per detector of ``det``: (images, start images, delta, delta_all, objective at the
    start, objective at the end), all on the CPU."""
    param = _FourierImage(det.numel(), size, decorrelate, gen).to(device)
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    with torch.no_grad():
        start = param().to(dtype)
        x0 = _layer_maps(model, layer, transform(start), tokens).float()
    check_maps(x0.detach(), "layer maps", n_features=pairs.n_features, allow_patches=False,
               context=f"these direction pairs (layer {pairs.meta.get('layer', '?')!r})")

    def objective(maps):
        z = torch.einsum("ndhw,nd->nhw", maps.float(), W[det]) - b[det][:, None, None]
        return z.mean(dim=(1, 2))

    o0 = objective(x0).detach()
    for _ in range(steps):
        img = param().to(dtype)
        if jitter:
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
            img = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
        loss = -objective(_layer_maps(model, layer, transform(img), tokens)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = param().to(dtype)
        x1 = _layer_maps(model, layer, transform(final), tokens).float()
        resp = torch.sigmoid(torch.einsum("ndhw,nd->nhw", x1, W[det].float()) - b[det].float()[:, None, None])
        a = resp.flatten(1) / resp.flatten(1).sum(1, keepdim=True).clamp_min(1e-30)
        delta = torch.einsum("ndp,np->nd", (x1 - x0).flatten(2), a).cpu()
    delta_all = (x1.mean(dim=(2, 3)) - x0.mean(dim=(2, 3))).detach().cpu()
    return (final.detach().float().cpu(), start.detach().float().cpu(), delta, delta_all, o0.cpu(),
            objective(x1).detach().cpu())


def maximize_detectors(model: nn.Module, layer: str, pairs, detectors: Optional[Sequence[int]] = None, *,
                       image_size: Optional[int] = None, steps: int = 128, lr: float = 0.05, jitter: int = 2,
                       decorrelate: bool = True, transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                       reference_maps=None, batch_size: int = 16, random_state=0,
                       tokens: str = "patches") -> ActMaxResult:
    """Optimise one input image per detector to maximise it, and measure what changed at the layer.

    Parameters
    ----------
    model : nn.Module
        Used as given (put it in eval mode first); its parameters get no gradient updates (their
        ``.grad`` may be written; it is cleared after each step).
    layer : str
    pairs : DirectionPairs
    detectors : sequence of int, optional
        Default: every detector.
    image_size : int, optional
        Default ``model.image_size`` or 224.
    steps, lr, jitter, decorrelate :
        Optimisation settings (see the module docstring).
    transform : callable, optional
        Applied to the [0, 1] image before the model (e.g. normalisation).
    reference_maps : tensor (N, D, H, W), optional
        Layer activations on real data for the Pattern-CAV directions (NaN cosines without them).
    batch_size : int
        Detectors optimised together.
    random_state : int or Generator

    Returns
    -------
    ActMaxResult

    Examples
    --------
    >>> res = maximize_detectors(model, "layer3", pairs, reference_maps=maps, steps=64)  # doctest: +SKIP
    >>> res.summary()["cos_signal"]["mean"]                                               # doctest: +SKIP
    """
    from ..capture.hooks import model_device_dtype
    from ..directions.editing_directions import resolve_concepts
    idx = resolve_concepts(pairs, list(range(pairs.n_concepts)) if detectors is None else detectors)
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    check_in_range(lr, "lr", 0, None, low_inclusive=False)
    jitter = check_positive_int(jitter, "jitter", minimum=0)
    size = check_positive_int(int(image_size or getattr(model, "image_size", None) or 224), "image_size", minimum=8)
    transform = transform or (lambda t: t)
    gen = make_generator(random_state)
    device, dtype = model_device_dtype(model)
    pcav = (pattern_cav_directions(reference_maps, pairs, idx) if reference_maps is not None
            else torch.full((len(idx), pairs.n_features), float("nan")))
    W = pairs.decoders.to(device)
    b = pairs.biases.to(device)
    outs: List[tuple] = []
    with _frozen(model):
        for s in range(0, len(idx), batch_size):
            det = torch.tensor(idx[s:s + batch_size], device=device)
            outs.append(_maximize_batch(model, layer, pairs, det, W, b, size=size, steps=steps, lr=lr, jitter=jitter,
                                        decorrelate=decorrelate, transform=transform, gen=gen, device=device,
                                        dtype=dtype, tokens=tokens))
    imgs, starts, deltas, deltas_all, obj0, obj1 = zip(*outs)
    delta, delta_all = torch.cat(deltas), torch.cat(deltas_all)
    sel = torch.tensor(idx)
    enc, dec = pairs.encoders[sel].cpu(), pairs.decoders[sel].cpu()
    return ActMaxResult(idx, torch.cat(imgs), torch.cat(starts), delta,
                        _cos(delta, enc), _cos(delta, dec), _cos(delta, pcav.cpu()), torch.cat(obj0), torch.cat(obj1),
                        delta_all, _cos(delta_all, enc), _cos(delta_all, dec), _cos(delta_all, pcav.cpu()))
