"""The streamed statistics of a fit: mean, covariance, a uniform patch sample; the soft standardisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._errors import ValidationError
from ._source import _patches, _RankSource



@dataclass
class _Stats:
    mean: torch.Tensor  # (D,) float64
    cov: torch.Tensor  # (D, D) float64
    sample: torch.Tensor  # (n, D) float64, a uniform random sample of patches
    n_patches: int



def _bottom_k(keys: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` smallest ``(key, id)`` pairs, in that order (ties of the float32 keys are
    broken by the patch index, so every implementation of the reservoir keeps the same patches)."""
    by_id = torch.argsort(ids, stable=True)
    order = by_id[torch.argsort(keys[by_id], stable=True)]
    return order[:k]


class _Reservoir:
    """A uniform sample of at most ``size`` rows from a stream: the rows of the ``size`` smallest i.i.d.
    uniform keys (bottom-k sampling). Rows are replaced in place, so a batch costs a sort of the kept
    keys and the copy of the rows that enter, not a copy of the whole sample (which made the statistics
    pass 12 times slower with 64 000 sampled patches of width 512). :meth:`result` orders the sample by
    ``(key, patch index)`` once more than ``size`` rows have been seen, by stream order before.
    """

    def __init__(self, size: int):
        self.size = size
        self.chunks = []  # while at most ``size`` rows have been seen: the batches as they came
        self.rows = self.keys = self.ids = None
        self.seen = 0

    def add(self, x: torch.Tensor, k: torch.Tensor) -> None:
        ids = torch.arange(self.seen, self.seen + x.shape[0], device=k.device)
        self.seen += x.shape[0]
        if self.rows is None:
            self.chunks.append((x, k, ids))
            if self.seen <= self.size:
                return
            x, k, ids = (torch.cat(parts) for parts in zip(*self.chunks))
            self.chunks = []
            top = _bottom_k(k, ids, self.size)
            self.rows, self.keys, self.ids = x[top], k[top], ids[top]
            return
        all_keys, all_ids = torch.cat([self.keys, k]), torch.cat([self.ids, ids])
        keep = torch.zeros(all_keys.numel(), dtype=torch.bool, device=k.device)
        keep[_bottom_k(all_keys, all_ids, self.size)] = True
        out = (~keep[:self.size]).nonzero().squeeze(1)  # slots whose row leaves
        come = keep[self.size:].nonzero().squeeze(1)  # rows of the batch that enter
        self.rows[out] = x[come]
        self.keys[out] = k[come]
        self.ids[out] = ids[come]

    def result(self) -> torch.Tensor:
        if self.rows is None:
            return torch.cat([c[0] for c in self.chunks]) if self.chunks else torch.empty(0)
        return self.rows[_bottom_k(self.keys, self.ids, self.size)]


def _stream_stats(source, batch_maps: int, max_sample: int, gen: torch.Generator, device) -> _Stats:
    """One pass: mean and covariance (float64, shifted by the first batch for stability) and a
    bottom-k uniform sample of at most ``max_sample`` patches (:class:`_Reservoir`)."""
    if isinstance(source, _RankSource):
        return _stream_stats_ranks(source, batch_maps, max_sample, gen, device)
    D = source.n_features
    n, s1, s2, shift = 0, None, None, None
    reservoir = _Reservoir(max_sample)
    for maps in source.iter_maps(batch_maps, shuffle=False):
        if not torch.isfinite(maps).all():
            raise ValidationError("the activations contain NaN or infinite values; expected finite "
                                  "activations. Check the model's numerics or drop those images.")
        x = _patches(maps.to(device)).double()
        if shift is None:
            shift = x.mean(0)
            s1 = torch.zeros(D, dtype=torch.float64, device=device)
            s2 = torch.zeros(D, D, dtype=torch.float64, device=device)
        xc = x - shift
        s1 += xc.sum(0)
        s2 += xc.T @ xc
        n += x.shape[0]
        reservoir.add(x, torch.rand(x.shape[0], generator=gen).to(device))
    m = s1 / n
    cov = s2 / n - torch.outer(m, m)
    return _Stats(mean=m + shift, cov=(cov + cov.T) / 2, sample=reservoir.result(), n_patches=n)


def _stream_stats_ranks(source: _RankSource, batch_maps: int, max_sample: int, gen: torch.Generator,
                        device) -> _Stats:
    """:func:`_stream_stats` over several processes, with one process's result.

    Every rank sums its block of the batches around the same shift (the first batch's mean) and the
    float64 sums are added over the ranks (equal to one process's up to the order of the additions).
    The patch sample is exactly one process's: its keys come from ``gen`` in batch order, so every
    rank replays the reservoir on the keys alone (the generators end where one process's does) and
    the sampled patches are filled in by the rank that reads them.
    """
    from ... import _distributed as Dist
    D = source.n_features
    H, W = source.map_shape
    hw, n_maps = H * W, len(source)
    keys, ids = None, None
    for t in range(-(-n_maps // batch_maps)):
        start = t * batch_maps * hw
        count = (min(n_maps, (t + 1) * batch_maps) - t * batch_maps) * hw
        k = torch.rand(count, generator=gen).to(device)
        i = torch.arange(start, start + count, device=device)
        keys = k if keys is None else torch.cat([keys, k])
        ids = i if ids is None else torch.cat([ids, i])
        if keys.numel() > max_sample:  # the same rule and order as _Reservoir
            top = _bottom_k(keys, ids, max_sample)
            keys, ids = keys[top], ids[top]
    kw = {"dtype": torch.float64, "device": device}
    s1, s2 = torch.zeros(D, **kw), torch.zeros(D, D, **kw)
    sample, n = torch.zeros(ids.numel(), D, **kw), torch.zeros((), **kw)

    shift = _patches(source.batch(0, batch_maps).to(device)).double().mean(0)

    def local() -> None:
        for t in source.my_batches(batch_maps):
            maps = source.batch(t, batch_maps)
            if not torch.isfinite(maps).all():
                raise ValidationError("the activations contain NaN or infinite values; expected finite "
                                      "activations. Check the model's numerics or drop those images.")
            x = _patches(maps.to(device)).double()
            xc = x - shift
            s1.add_(xc.sum(0))
            s2.add_(xc.T @ xc)
            n.add_(x.shape[0])
            start = t * batch_maps * hw
            inside = (ids >= start) & (ids < start + x.shape[0])
            sample[inside] = x[ids[inside] - start]

    Dist.on_every_rank(local, "the statistics pass")
    for t in (s1, s2, sample, n):
        Dist.all_reduce_sum_(t, "adding the statistics")
    n = int(n)
    m = s1 / n
    cov = s2 / n - torch.outer(m, m)
    return _Stats(mean=m + shift, cov=(cov + cov.T) / 2, sample=sample, n_patches=n)


def _soft_standard_scale(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-component factors r (D,) that turn the isotropically scaled patches x̃ = (x−μ)/σ into
    soft-standardised ones x̃ ⊙ r = (x−μ)/sqrt(var_k + ε·mean var): each component to unit variance,
    with a floor so that (nearly) noise-free components are not blown up (method.md §6)."""
    var = torch.diagonal(cov).clamp_min(0)
    sigma = torch.sqrt(var.mean().clamp_min(1e-30))
    return sigma / torch.sqrt(var + eps * var.mean().clamp_min(1e-30))


