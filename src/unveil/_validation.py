"""Input checks shared by estimators and metrics (each raises a clear :class:`ValidationError`)."""
from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np
import torch

from ._errors import ValidationError

ArrayLike = Union[torch.Tensor, np.ndarray]


def as_tensor(X, name: str = "X", dtype=torch.float32, device=None) -> torch.Tensor:
    """Return ``X`` as a float tensor (no copy when it already is one of that dtype/device)."""
    if isinstance(X, torch.Tensor):
        t = X
    elif isinstance(X, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(X))
    else:
        try:
            t = torch.as_tensor(np.asarray(X))
        except Exception as exc:  # noqa: BLE001 - reported to the user below
            raise ValidationError(
                f"{name} must be a torch tensor or numpy array, got {type(X).__name__} "
                f"which could not be converted ({exc})."
            ) from None
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValidationError(f"{name} must hold real numbers, got dtype {t.dtype}.")
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def check_maps(X, name: str = "X", n_features: Optional[int] = None, allow_patches: bool = True,
               check_finite: bool = True, context: str = "") -> torch.Tensor:
    """Validate feature maps ``(N, D, H, W)`` (or patches ``(P, D)`` when ``allow_patches``).

    Returns a float32 tensor on the input's device.
    """
    t = as_tensor(X, name)
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
