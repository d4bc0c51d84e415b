"""Where computation runs: device strings from users (``--device``, ``device=``), checked once with a clear
error, and :func:`limit_threads`, the one place the CPU thread count is changed for a block of code."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

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


@contextlib.contextmanager
def limit_threads(n: int, *, blas: bool = True) -> Iterator[None]:
    """Run the block on ``n`` CPU threads; the previous counts are restored afterwards, also on errors.

    torch's intra-op threads always; with ``blas`` also the BLAS/OpenMP pools of numpy and scikit-learn
    (via threadpoolctl, when installed). ``blas=False`` suits tiny torch loops, where thread hand-offs
    cost far more than the arithmetic (worst on a shared machine).

    Examples
    --------
    >>> import torch
    >>> with limit_threads(1):
    ...     torch.get_num_threads()
    1
    """
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        with contextlib.ExitStack() as stack:
            if blas:
                try:
                    from threadpoolctl import threadpool_limits
                except ImportError:  # pragma: no cover - scikit-learn depends on threadpoolctl
                    pass
                else:
                    stack.enter_context(threadpool_limits(int(n)))
            yield
    finally:
        torch.set_num_threads(old)
