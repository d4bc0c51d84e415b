"""Several processes on one job (``torch.distributed``, as launched by ``torchrun``).

One process per device: gloo between CPU processes, NCCL between GPUs. The library detects an
initialised process group (or the ``RANK``/``WORLD_SIZE`` variables ``torchrun`` sets, and then
initialises one itself); with one process, or none, nothing here is called on the numerical path.

Every collective unveil runs goes through this module, so a process that dies or hangs becomes one
:class:`DistributedError` on the others, within the process-group timeout (``UNVEIL_DIST_TIMEOUT``
seconds, default 300; CLI ``--dist-timeout``), instead of a hang or a backend traceback.

Conventions
-----------
* Work is split into contiguous blocks (:func:`block`): rank ``r`` of ``w`` takes items
  ``[r·n/w, (r+1)·n/w)`` (the first ``n mod w`` ranks one more), so concatenating the blocks in
  rank order gives back the original order.
* Sums are reduced in float64; the result is the same on every rank (the backend reduces each
  element once and sends the result to all), so every rank takes the same decisions afterwards.
* Python objects (shard records, errors) travel over a gloo group on the CPU, also when the tensor
  collectives run on NCCL.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import logging
import os
import re
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch

from . import _errors
from ._errors import DistributedError, UnveilError, ValidationError

__all__ = ["DistributedError", "is_distributed", "rank", "world_size", "block", "init_from_env", "rank_device"]
logger = logging.getLogger("unveil")

ENV_TIMEOUT = "UNVEIL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0

_FIX = "nothing was saved; run the same command again."
_state = {"owned": False, "cpu_group": None, "timeout_s": None, "failed": False}


# ----------------------------------------------------------------------------------- who am I
def _dist():
    import torch.distributed as dist
    return dist


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _env_int(name: str) -> Optional[int]:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValidationError(f"the environment variable {name}={text!r} is not an integer; torchrun sets it to "
                              f"one. Unset it, or launch with torchrun.") from None
    if value < 0:
        raise ValidationError(f"the environment variable {name}={value} is negative; expected a rank or a size.")
    return value


def env_world() -> Optional[tuple]:
    """``(rank, world_size, local_rank)`` from ``torchrun``'s environment, or None for one process."""
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return None
    r = _env_int("RANK")
    if r is None or r >= world:
        raise ValidationError(f"WORLD_SIZE={world} is set but RANK={os.environ.get('RANK')!r} is not a rank below "
                              f"it; launch with torchrun (which sets both), or unset WORLD_SIZE.")
    local = _env_int("LOCAL_RANK")
    return r, world, (r if local is None else local)


def timeout_s(value=None) -> float:
    """The process-group timeout in seconds: ``value``, else ``$UNVEIL_DIST_TIMEOUT``, else 300."""
    source, raw = "the timeout", value
    if value is None:
        raw = os.environ.get(ENV_TIMEOUT)
        if raw is None:
            return DEFAULT_TIMEOUT_S
        source = f"{ENV_TIMEOUT}={raw!r}"
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (0 < seconds < 1e7):
        raise ValidationError(f"{source} must be a number of seconds in (0, 1e7), got {raw!r}; e.g. 300.")
    return seconds


def backend_for(device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def rank_device(device):
    """The device of this process: ``"cuda"`` (no index) means ``cuda:LOCAL_RANK`` when several
    processes run (one per GPU); anything else is returned unchanged.

    Examples
    --------
    >>> rank_device("cpu")
    'cpu'
    """
    if device is None:
        return None
    try:
        dev = torch.device(device) if isinstance(device, str) else device
    except (RuntimeError, ValueError):
        return device  # not a device at all: left to the caller's check and its message
    if not isinstance(dev, torch.device) or dev.type != "cuda" or dev.index is not None:
        return device
    env = env_world()
    if env is None and not is_distributed():
        return device
    local = env[2] if env is not None else _env_int("LOCAL_RANK")
    return torch.device("cuda", local if local is not None else rank())


def init_from_env(device=None, timeout=None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if it asks for more
    than one process and none is initialised; returns True if this call initialised it.

    The backend is NCCL for a CUDA ``device`` (each process on ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    dist = _dist()
    env = env_world()
    if env is None or not dist.is_available() or dist.is_initialized():
        return False
    r, world, local = env
    seconds = timeout_s(timeout)
    backend = backend_for(device)
    kwargs = {}
    if backend == "nccl":
        dev = torch.device(device)
        dev = dev if dev.index is not None else torch.device("cuda", local)
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    try:
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds), rank=r, world_size=world,
                                    **kwargs)
        except TypeError:  # torch < 2.3 has no device_id
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds), rank=r, world_size=world)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"process {r} of {world}: could not join the other processes within {seconds:g} s "
                               f"({_reason(exc)}); check MASTER_ADDR/MASTER_PORT (or the torchrun rendezvous) and "
                               f"that every process was started.") from None
    _state.update(owned=True, timeout_s=seconds, failed=False)
    atexit.register(_shutdown_at_exit)
    logger.info("process %d of %d joined the process group (%s, timeout %g s)", r, world, backend, seconds)
    return True


def ensure_initialised(device=None) -> bool:
    """:func:`init_from_env` unless a group exists; returns :func:`is_distributed`."""
    init_from_env(device)
    return is_distributed()


def shutdown(sync: bool = False, wait_s: Optional[float] = None) -> None:
    """Destroy the process group if :func:`init_from_env` created it.

    ``sync=True`` (a run that ended well on every rank) first waits at a barrier, so no process closes
    its connections while another is still finishing its last collective: gloo's background threads
    can abort a process whose peer vanishes mid-operation ("terminate called without an active
    exception", SIGABRT at exit; 5 of 55 two-process runs here without the barrier, 0 of 40 with it).
    ``wait_s``: a bounded barrier on a gloo group (the default group, or the CPU group NCCL runs keep
    for Python objects), skipped where there is none. gloo bounds it on rank 0 only; the other ranks
    wait while rank 0 lives, at most the group's timeout (a peer that died is noticed at once).
    """
    dist = _dist()
    if _state["owned"] and dist.is_available() and dist.is_initialized():
        if sync:
            with contextlib.suppress(Exception):
                if wait_s is None:
                    dist.barrier()
                elif dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=wait_s))
                elif _state["cpu_group"] is not None:
                    dist.monitored_barrier(group=_state["cpu_group"], timeout=datetime.timedelta(seconds=wait_s))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _state.update(owned=False, cpu_group=None, timeout_s=None, failed=False)


def _shutdown_at_exit() -> None:
    """At the interpreter's exit (a group this module created and nobody closed, e.g. a script that
    called ``EDDP.fit`` under torchrun): the ranks meet at a bounded barrier (30 s on rank 0, see
    :func:`shutdown`) before closing, unless a collective of this process failed (its peers are gone
    or out of step: it closes at once)."""
    if not _state["owned"]:
        return
    shutdown(sync=not _state["failed"], wait_s=min(30.0, _state["timeout_s"] or DEFAULT_TIMEOUT_S))


# -------------------------------------------------------------------------------------- splits
def block(n: int, r: Optional[int] = None, world: Optional[int] = None) -> range:
    """The contiguous block of ``range(n)`` that rank ``r`` of ``world`` takes (the first ``n mod world``
    ranks take one item more); the blocks in rank order cover ``range(n)`` in order.

    Examples
    --------
    >>> [list(block(5, r, 2)) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(int(n), int(world))
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def block_sizes(n: int, world: Optional[int] = None) -> List[int]:
    """``len(block(n, r, world))`` for every rank."""
    world = world_size() if world is None else world
    return [len(block(n, r, world)) for r in range(world)]


# --------------------------------------------------------------------------------- collectives
def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", text)  # the backend's source location
    return text if len(text) <= 160 else text[:157] + "..."


def _timeout_now() -> float:
    return _state["timeout_s"] or timeout_s()


def _within() -> str:
    """How long a collective waits: ours when this module initialised the group, else the caller's."""
    return f"within {_state['timeout_s']:g} s" if _state["timeout_s"] else "within the process group's timeout"


@contextlib.contextmanager
def collective(what: str, fix: str = _FIX) -> Iterator[None]:
    """Turn a failing collective (a peer died, hung past the timeout, or reset the connection) into
    one :class:`DistributedError` that says what this process was doing and what to do."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:  # DistBackendError, DistStoreError, DistNetworkError, gloo/NCCL errors
        _state["failed"] = True
        raise DistributedError(f"process {rank()} of {world_size()}: {what} failed: another process of this run "
                               f"stopped, failed or did not answer {_within()} ({_reason(exc)}); "
                               f"{fix}") from None


def _cpu_group():
    """A gloo group for CPU tensors and Python objects (the default group when it is gloo)."""
    dist = _dist()
    if dist.get_backend() == "gloo":
        return None
    if _state["cpu_group"] is None:
        _state["cpu_group"] = dist.new_group(backend="gloo",
                                             timeout=datetime.timedelta(seconds=_timeout_now()))
    return _state["cpu_group"]


def _group_for(t: torch.Tensor):
    return _cpu_group() if t.device.type == "cpu" else None


def all_reduce_sum_(t: torch.Tensor, what: str = "summing the statistics") -> torch.Tensor:
    """Sum ``t`` over the processes, in place; returns ``t`` (unchanged with one process)."""
    if is_distributed():
        with collective(what):
            _dist().all_reduce(t, group=_group_for(t))
    return t


def all_gather_blocks(local: torch.Tensor, sizes: Sequence[int], what: str = "gathering a batch") -> List[torch.Tensor]:
    """Every rank's ``local`` (rank ``r`` holds ``sizes[r]`` rows, same trailing shape), on every rank,
    in rank order. Rows are padded to the largest block for the transfer."""
    if not is_distributed():
        return [local]
    top = max(sizes)
    buf = local.new_zeros((top, *local.shape[1:]))
    buf[:local.shape[0]] = local
    parts = [torch.empty_like(buf) for _ in sizes]
    with collective(what):
        _dist().all_gather(parts, buf.contiguous(), group=_group_for(buf))
    return [p[:n] for p, n in zip(parts, sizes)]


def all_gather_rows_grad(local: torch.Tensor, sizes: Sequence[int], what: str = "gathering a batch") -> torch.Tensor:
    """The rows of every rank concatenated in rank order, identical on every rank; the gradient flows
    only into this rank's own rows (``local``). Summing the gradients of a loss of the result over
    the ranks (:func:`all_reduce_grads`) gives the gradient of that loss over the whole batch."""
    parts = all_gather_blocks(local.detach(), sizes, what)
    if len(parts) == 1:
        return local
    parts[rank()] = local
    return torch.cat(parts)


def all_reduce_grads(params: Sequence[torch.Tensor], op: str = "sum", what: str = "adding the gradients") -> None:
    """DDP-style: the ``.grad`` of ``params`` summed (``op="sum"``) or averaged (``"mean"``) over the
    processes, in one flat buffer per dtype/device. A gradient missing on some ranks counts as zeros
    there; one missing on every rank stays None (as one process leaves it: the optimiser skips it)."""
    if not is_distributed():
        return
    if op not in ("sum", "mean"):
        raise ValidationError(f"op must be 'sum' or 'mean', got {op!r}.")
    groups = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for ps in groups.values():
        present = torch.tensor([float(p.grad is not None) for p in ps], dtype=ps[0].dtype, device=ps[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
                         + [present])
        with collective(what):
            _dist().all_reduce(flat, group=_group_for(flat))
        if op == "mean":
            flat /= world_size()
        i = 0
        for p, seen in zip(ps, flat[-len(ps):].tolist()):
            n = p.numel()
            p.grad = flat[i:i + n].view_as(p).clone() if seen else None
            i += n


def broadcast_object(obj: Any = None, src: int = 0, what: str = "sharing a result", fix: str = _FIX) -> Any:
    """``obj`` of rank ``src``, on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    with collective(what, fix):
        _dist().broadcast_object_list(box, src=src, group=_cpu_group())
    return box[0]


def all_gather_object(obj: Any, what: str = "sharing results", fix: str = _FIX) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    with collective(what, fix):
        _dist().all_gather_object(out, obj, group=_cpu_group())
    return out


def same_generator(gen: torch.Generator, seeded: bool) -> None:
    """Make ``gen`` the same on every rank: rank 0's state when it was seeded from fresh entropy
    (``seeded`` False); otherwise check that the ranks agree (:class:`ValidationError` if not)."""
    if not is_distributed():
        return
    if not seeded:
        gen.set_state(broadcast_object(gen.get_state(), 0, "sharing the random state"))
        return
    digest = hashlib.sha256(gen.get_state().numpy().tobytes()).hexdigest()
    if len(set(all_gather_object(digest, "comparing the random states"))) != 1:
        exc = ValidationError("the processes of this run were given different random states; pass the same "
                              "random_state (an int) to every process.")
        exc.mirrored = rank() != 0
        raise exc


# ------------------------------------------------------------------------------ shared outcomes
_ERROR_CLASSES = {name: getattr(_errors, name) for name in _errors.__all__}
_ERROR_CLASSES["DistributedError"] = DistributedError


def _describe(exc: BaseException) -> tuple:
    name = type(exc).__name__
    if isinstance(exc, UnveilError) and name in _ERROR_CLASSES:
        return name, str(exc)
    return "DistributedError", f"{type(exc).__name__}: {_reason(exc)}"


def _mirror(r: int, name: str, message: str) -> UnveilError:
    """The error rank ``r`` reported, raised here too; marked ``mirrored`` (its origin reports it)."""
    cls = _ERROR_CLASSES.get(name, DistributedError)
    if cls is DistributedError and not message.startswith("process "):
        message = f"process {r} of {world_size()} failed: {message}"
    exc = cls(message)
    exc.mirrored = True
    return exc


def on_rank0(fn: Callable[[], Any], what: str, fix: str = _FIX) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every rank; if it raises, every rank raises
    the same error (rank 0 the original)."""
    if not is_distributed():
        return fn()
    outcome, error = None, None
    if rank() == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - shared, then re-raised below
            error = exc
            outcome = ("error", _describe(exc))
    outcome = broadcast_object(outcome, 0, what, fix)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise _mirror(0, *outcome[1])
    return outcome[1]


def on_every_rank(fn: Callable[[], Any], what: str, fix: str = _FIX) -> List[Any]:
    """Run ``fn`` on every rank; return every rank's result (in rank order) on every rank. If any rank
    raises, every rank raises: that rank its own error, the others the lowest failing rank's."""
    if not is_distributed():
        return [fn()]
    error = None
    try:
        outcome = ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - shared, then re-raised below
        error = exc
        outcome = ("error", _describe(exc))
    outcomes = all_gather_object(outcome, what, fix)
    if error is not None:
        raise error
    for r, (status, value) in enumerate(outcomes):
        if status == "error":
            raise _mirror(r, *value)
    return [value for _, value in outcomes]
