"""Where EDDP reads its data from: feature maps in memory or an activation store, served in mini-batches."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from ..._errors import ValidationError
from ..._validation import check_maps


class _TensorSource:
    """Feature maps held in memory, served in mini-batches like an ActivationStore."""

    def __init__(self, X: torch.Tensor):
        self.X = X

    def __len__(self) -> int:
        return self.X.shape[0]

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    @property
    def map_shape(self) -> Tuple[int, int]:
        return tuple(self.X.shape[2:])

    def iter_maps(self, batch_size: int, shuffle: bool = False, generator=None) -> Iterator[torch.Tensor]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            yield self.X[order[i:i + batch_size].to(self.X.device)]


def _as_source(X):
    if hasattr(X, "iter_maps") and hasattr(X, "n_features"):
        if len(X) == 0:
            raise ValidationError("the activation store is empty; extract activations from at least one image.")
        return X, None
    t = check_maps(X, "X")
    if t.dim() == 2:
        t = t[:, :, None, None]
    return _TensorSource(t), t.device



def _patches(maps: torch.Tensor) -> torch.Tensor:
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])



# ------------------------------------------------------------------------ several processes
def _take(source, idx: torch.Tensor) -> torch.Tensor:
    """The maps ``idx`` of a source, in that order (what its shuffled ``iter_maps`` yields)."""
    if isinstance(source, _TensorSource):
        return source.X[idx.to(source.X.device)]
    return source.maps(idx)


class _RankSource:
    """One process's view of a source in a distributed fit (see :mod:`unveil._distributed`).

    * ``iter_maps(B)`` (in order): this rank's contiguous block of the ``B``-map batches the whole
      source splits into, so each batch is one that a single process would read;
    * ``iter_maps(B, shuffle=True, generator=g)``: the batches a single process would draw (one
      permutation per pass, drawn from ``g`` on every rank, so the generators stay in step), of
      which this rank reads its contiguous slice; :attr:`sizes` holds every rank's slice length of
      the batch last yielded.
    """

    def __init__(self, source):
        from ... import _distributed as D
        self.source = source
        self.rank, self.world = D.rank(), D.world_size()
        self.sizes = None
        shape = (len(source), source.n_features, *source.map_shape)
        if len(set(D.all_gather_object(shape, "comparing the data of the processes"))) != 1:
            exc = ValidationError(f"the processes of this fit were given different data (this one: {shape[0]} maps of "
                                  f"shape {shape[1:]}); give every process the same store or tensor.")
            exc.mirrored = self.rank != 0
            raise exc

    def __len__(self) -> int:
        return len(self.source)

    @property
    def n_features(self) -> int:
        return self.source.n_features

    @property
    def map_shape(self) -> Tuple[int, int]:
        return self.source.map_shape

    @property
    def subsampled(self) -> bool:
        return bool(getattr(self.source, "subsampled", False))

    def batch(self, t: int, batch_size: int) -> torch.Tensor:
        """Batch ``t`` of the in-order pass (maps ``t·B`` to ``(t+1)·B``)."""
        n = len(self)
        return _take(self.source, torch.arange(t * batch_size, min(n, (t + 1) * batch_size)))

    def my_batches(self, batch_size: int) -> range:
        from ... import _distributed as D
        return D.block(-(-len(self) // batch_size), self.rank, self.world)

    def iter_maps(self, batch_size: int, shuffle: bool = False, generator=None) -> Iterator[torch.Tensor]:
        from ... import _distributed as D
        if not shuffle:
            for t in self.my_batches(batch_size):
                yield self.batch(t, batch_size)
            return
        n = len(self)
        order = torch.randperm(n, generator=generator)  # the draw a single process makes
        for i in range(0, n, batch_size):
            glob = order[i:i + batch_size]
            self.sizes = D.block_sizes(len(glob), self.world)
            mine = D.block(len(glob), self.rank, self.world)
            yield _take(self.source, glob[mine.start:mine.stop])
