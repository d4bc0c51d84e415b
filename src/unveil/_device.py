"""Device strings from users (``--device``, ``device=``), checked once with a clear error."""
from __future__ import annotations

from typing import Optional

import torch

from ._errors import ValidationError


def check_device(device, name: str = "device") -> Optional[torch.device]:
    """Return ``device`` as a :class:`torch.device` (None stays None), refusing what cannot run here.

    Examples
    --------
    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device(None) is None
    True
    """
    if device is None:
        return None
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValidationError(f"{name} {device!r} is not a torch device; expected e.g. 'cpu', 'cuda', "
                                  f"'cuda:1' or 'mps'.") from None
    else:
        raise ValidationError(f"{name} must be a string such as 'cpu' or 'cuda:0' (or a torch.device), "
                              f"got {type(device).__name__}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValidationError(f"{name} {str(dev)!r} asks for CUDA, but no CUDA GPU is available to this torch "
                                  f"({torch.__version__}); use 'cpu' or install a CUDA build of torch.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValidationError(f"{name} {str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"device(s) (0 to {torch.cuda.device_count() - 1}).")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValidationError(f"{name} {str(dev)!r} asks for Apple's MPS, which is not available here; use 'cpu'.")
    elif dev.type not in ("cpu", "meta"):
        pass  # xpu, hpu, ...: torch reports it when used
    if dev.type == "meta":
        raise ValidationError(f"{name} 'meta' holds no data; use 'cpu' or a GPU.")
    return dev
