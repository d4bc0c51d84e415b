"""Input checks shared by estimators and metrics (each raises a clear :class:`ValidationError`)."""
from __future__ import annotations

import difflib
import numbers
from typing import Optional, Union

import numpy as np
import torch

from ._errors import ValidationError

ArrayLike = Union[torch.Tensor, np.ndarray]


def as_tensor(X, name: str = "X", dtype=torch.float32, device=None, detach: bool = True) -> torch.Tensor:
    """Return ``X`` as a float tensor (no copy when it already is one of that dtype/device).

    A tensor that requires grad is detached unless ``detach=False`` (inputs are data, not part of the
    caller's graph). Refused with :class:`ValidationError`: complex or non-numeric values, sparse
    tensors and tensors on the ``meta`` device (they hold no data).
    """
    if isinstance(X, torch.Tensor):
        t = X
    elif isinstance(X, np.ndarray):
        if X.dtype.kind not in "biuf":
            raise ValidationError(f"{name} must hold real numbers, got a numpy array of dtype {X.dtype}; "
                                  f"convert it with X.astype(np.float32).")
        if not X.dtype.isnative:
            X = X.astype(X.dtype.newbyteorder("="))
        try:
            t = torch.from_numpy(np.ascontiguousarray(X))
        except TypeError:  # a dtype torch lacks (e.g. uint32 on old torch, float128)
            t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
    else:
        try:
            t = torch.as_tensor(np.asarray(X))
        except Exception as exc:  # noqa: BLE001 - reported to the user below
            raise ValidationError(
                f"{name} must be a torch tensor or numpy array, got {type(X).__name__} "
                f"which could not be converted ({exc})."
            ) from None
    if t.device.type == "meta":
        raise ValidationError(f"{name} is a tensor on the meta device, which holds no data (shape "
                              f"{tuple(t.shape)}); pass a tensor with values (e.g. on 'cpu' or 'cuda').")
    if t.layout != torch.strided:
        raise ValidationError(f"{name} is a {t.layout} tensor; expected a dense tensor. Pass {name}.to_dense().")
    if t.is_complex() or t.dtype == torch.bool or t.is_quantized:
        raise ValidationError(f"{name} must hold real numbers, got dtype {t.dtype}; pass a float tensor.")
    if detach:
        t = t.detach()
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def check_maps(X, name: str = "X", n_features: Optional[int] = None, allow_patches: bool = True,
               check_finite: bool = True, context: str = "", detach: bool = True) -> torch.Tensor:
    """Validate feature maps ``(N, D, H, W)`` (or patches ``(P, D)`` when ``allow_patches``).

    Returns a float32 tensor on the input's device, detached from autograd unless ``detach=False``
    (pass that where the result must stay differentiable, e.g. an edit inside a model's forward).
    """
    t = as_tensor(X, name, detach=detach)
    ok_ranks = (2, 4) if allow_patches else (4,)
    if t.dim() not in ok_ranks:
        want = "(N, D, H, W) feature maps" + (" or (P, D) patch vectors" if allow_patches else "")
        hint = ""
        if t.dim() == 3:
            hint = (" For a single map add a batch axis (X[None]); for ViT tokens (N, T, D) "
                    "use X.permute(0, 2, 1)[..., None] to get (N, D, T, 1).")
        raise ValidationError(f"{name} must be {want}; got a tensor of rank {t.dim()} with shape "
                              f"{tuple(t.shape)}.{hint}")
    if t.shape[0] == 0:
        raise ValidationError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one map.")
    if 0 in t.shape[1:]:
        axes = "D" if t.dim() == 2 else "D, H, W"
        raise ValidationError(f"{name} has shape {tuple(t.shape)} with a zero-sized axis; expected at least one "
                              f"channel and one position ({axes} >= 1). Check the layer the maps come from.")
    if n_features is not None and t.shape[1] != n_features:
        raise ValidationError(
            f"{name} has {t.shape[1]} channels, but {context or 'these direction pairs'} expect "
            f"{n_features}; pass activations of the same layer the pairs were fitted on.")
    if check_finite and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValidationError(f"{name} contains {bad} NaN or infinite values; expected finite "
                              f"activations. Check the model's numerics or drop those images.")
    return t


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValidationError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


MIN_INPUT_SIZE = 8
MAX_INPUT_SIZE = 8192  # one 3 x 8192 x 8192 float32 image is 0.8 GB


def check_index(i, n: int, what: str) -> int:
    """An item index of a sequence of ``n`` images: an integer (numpy ones too, not bool), negative ones
    counted from the end. ``what`` names the sequence in the errors (TypeError, IndexError)."""
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"{what} indices must be integers, got {type(i).__name__}")
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"image index {i} out of range for a {what} of {n} images")
    return i


def check_input_size(size, name: str = "input size") -> int:
    """Validate the side of a square network input (``MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE``).

    The upper bound keeps one float32 image (``3 * size**2 * 4`` bytes) under 1 GB, so a typo such
    as ``100000`` is refused at once instead of exhausting the memory.

    Examples
    --------
    >>> check_input_size(224, "--input-size")
    224
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ValidationError(f"{name} must be an integer number of pixels, got {size!r}.")
    size = int(size)
    if size < MIN_INPUT_SIZE:
        raise ValidationError(f"{name} must be at least {MIN_INPUT_SIZE} pixels, got {size}; pass the side of "
                              f"the square input image (e.g. 224).")
    if size > MAX_INPUT_SIZE:
        gb = 3 * size * size * 4 / 1e9
        raise ValidationError(f"{name} = {size} would make one input image {gb:.3g} GB of float32 "
                              f"(3 x {size} x {size} x 4 bytes); the limit is {MAX_INPUT_SIZE} pixels. "
                              f"Pass a smaller size (e.g. 224).")
    return size


def check_in_range(value, name: str, low=None, high=None, low_inclusive=True, high_inclusive=True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValidationError(f"{name} must be a finite number, got {value!r}.")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValidationError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}.")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValidationError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value!r}.")
    return float(value)


def make_generator(random_state, device="cpu") -> torch.Generator:
    """A local ``torch.Generator`` from an int, a Generator or None (never touches global seeds)."""
    if isinstance(random_state, torch.Generator):
        return random_state
    g = torch.Generator(device=device)
    if random_state is None:
        g.seed()
    elif isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        g.manual_seed(int(random_state))
    elif isinstance(random_state, np.random.Generator):
        g.manual_seed(int(random_state.integers(0, 2**63 - 1)))
    else:
        raise ValidationError(f"random_state must be None, an int, a torch.Generator or a numpy Generator; "
                              f"got {type(random_state).__name__}.")
    return g


def suggest(name: str, candidates, n: int = 3) -> list:
    """The ``n`` candidates closest to ``name`` (difflib), best first: the "did you mean" of error messages."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.0)
    return close
