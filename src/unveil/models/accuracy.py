"""Top-1 accuracy of a model (or of a head on feature maps) over inputs in batches: the one place it is counted."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
import torch

from .._errors import ValidationError

__all__ = ["top1_accuracy"]


@torch.no_grad()
def top1_accuracy(forward: Callable[..., torch.Tensor], inputs: Union[torch.Tensor, Sequence[torch.Tensor]], labels,
                  batch_size: int = 256) -> float:
    """Share of the inputs whose logits ``forward(batch)`` have their largest entry at the label.

    Parameters
    ----------
    forward : callable
        A batch of inputs -> logits (B, K): a model, a head, or a function that edits maps before a head.
        It is used as given (the caller sets the model's mode and device).
    inputs : tensor (N, ...) or sequence of tensors (N, ...)
        Sliced into batches along the first dimension; a sequence is sliced together and passed to
        ``forward`` as separate arguments (e.g. maps and a per-image region mask).
    labels : (N,) ints (tensor, array or list)
    batch_size : int

    Returns
    -------
    float in [0, 1] (0 for no inputs).

    Examples
    --------
    >>> import torch
    >>> top1_accuracy(lambda x: x, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), [1, 1, 0])
    0.6666666666666666
    """
    parts = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    y = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.array(labels, dtype=np.int64))
    y = y.to(device="cpu", dtype=torch.long).reshape(-1)
    n = int(parts[0].shape[0])
    if any(int(p.shape[0]) != n for p in parts):
        raise ValidationError(f"inputs must all have the same length, got {[int(p.shape[0]) for p in parts]}.")
    if y.shape[0] != n:
        raise ValidationError(f"labels must have one entry per input ({n}), got {y.shape[0]}; pass the labels of "
                              f"exactly these inputs.")
    correct = 0
    for s in range(0, n, batch_size):
        logits = forward(*(p[s:s + batch_size] for p in parts))
        correct += int((logits.argmax(1).cpu() == y[s:s + batch_size]).sum())
    return correct / max(n, 1)
