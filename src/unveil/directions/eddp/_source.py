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

