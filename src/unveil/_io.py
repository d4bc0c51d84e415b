"""Atomic file writing and checksummed json + safetensors bundles (no pickle anywhere)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch

from ._errors import CorruptFileError

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_writer(path):
    """Open a temporary file beside ``path`` for binary writing; on success it is flushed, synced and
    renamed onto ``path`` (``os.replace``), on error removed. Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def sha256_file(path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def versions() -> Dict[str, str]:
    import platform

    import numpy
    from . import __version__
    return {"unveil": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def write_checked(tensors_path, json_path, tensors: Dict[str, torch.Tensor], doc: dict, fmt: str) -> dict:
    """Write ``tensors`` (safetensors) then ``doc`` (json) holding the tensors' sha256, both atomically.

    The json is written last, so a pair whose json exists is complete. Returns the written document.
    """
    from safetensors.torch import save as st_save

    blob = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    atomic_write_bytes(tensors_path, blob)
    full = {"format": f"unveil.{fmt}", "format_version": FORMAT_VERSION,
            "tensors_sha256": hashlib.sha256(blob).hexdigest(), "versions": versions(), **doc}
    atomic_write_json(json_path, full)
    return full


def read_checked(tensors_path, json_path, fmt: str, fix: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a pair written by :func:`write_checked`, verifying format and checksum.

    ``fix`` ends every error message (how to repair, e.g. "Save it again.").
    """
    from safetensors.torch import load as st_load

    tpath, jpath = Path(tensors_path), Path(json_path)
    for p in (jpath, tpath):
        if not p.is_file():
            raise CorruptFileError(f"{str(p)!r} is missing: an unveil {fmt} is a .safetensors file plus a .json "
                                   f"file (an interrupted save?). {fix}")
    try:
        doc = json.loads(jpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{str(jpath)!r} is not valid JSON ({exc}); the file is corrupt. {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != f"unveil.{fmt}":
        raise CorruptFileError(f"{str(jpath)!r} is not an unveil {fmt} file (format field "
                               f"{doc.get('format') if isinstance(doc, dict) else None!r}).")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptFileError(f"{str(jpath)!r} has format version {doc.get('format_version')}, newer than "
                               f"this unveil reads ({FORMAT_VERSION}); upgrade unveil.")
    blob = tpath.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
        raise CorruptFileError(f"{str(tpath)!r} does not match the sha256 recorded in {jpath.name} "
                               f"(truncated or modified, {len(blob)} bytes). {fix}")
    try:
        tensors = st_load(blob)
    except Exception as exc:  # noqa: BLE001
        raise CorruptFileError(f"{str(tpath)!r} is not a readable safetensors file ({exc}).") from None
    return tensors, doc


def save_bundle(directory, kind: str, tensors: Dict[str, torch.Tensor], meta: dict) -> Path:
    """Save ``tensors`` (safetensors) and ``meta`` (json) into ``directory`` as ``<kind>.*``
    (see :func:`write_checked`)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CorruptFileError(f"cannot save to {str(directory)!r}: it exists and is not a folder; "
                               f"pass a folder path (it is created if missing).")
    directory.mkdir(parents=True, exist_ok=True)
    write_checked(directory / f"{kind}.safetensors", directory / f"{kind}.json", tensors, meta, kind)
    return directory


def load_bundle(directory, kind: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Load and verify a bundle written by :func:`save_bundle`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CorruptFileError(f"no saved {kind} at {str(directory)!r}: expected a folder holding "
                               f"{kind}.json and {kind}.safetensors (written by .save()).")
    return read_checked(directory / f"{kind}.safetensors", directory / f"{kind}.json", kind, "Save it again.")
