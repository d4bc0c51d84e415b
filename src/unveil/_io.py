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


def save_bundle(directory, kind: str, tensors: Dict[str, torch.Tensor], meta: dict) -> Path:
    """Save ``tensors`` (safetensors) and ``meta`` (json) into ``directory``.

    The safetensors file is written first; ``<kind>.json`` (with the safetensors' sha256) is
    written last, so a bundle whose json exists is complete.
    """
    from safetensors.torch import save as st_save

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CorruptFileError(f"cannot save to {str(directory)!r}: it exists and is not a folder; "
                               f"pass a folder path (it is created if missing).")
    directory.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    atomic_write_bytes(directory / f"{kind}.safetensors", blob)
    doc = {"format": f"unveil.{kind}", "format_version": FORMAT_VERSION,
           "tensors_sha256": hashlib.sha256(blob).hexdigest(), "versions": versions(), **meta}
    atomic_write_json(directory / f"{kind}.json", doc)
    return directory


def load_bundle(directory, kind: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Load and verify a bundle written by :func:`save_bundle`."""
    from safetensors.torch import load as st_load

    directory = Path(directory)
    jpath, tpath = directory / f"{kind}.json", directory / f"{kind}.safetensors"
    if not directory.is_dir():
        raise CorruptFileError(f"no saved {kind} at {str(directory)!r}: expected a folder holding "
                               f"{kind}.json and {kind}.safetensors (written by .save()).")
    for p in (jpath, tpath):
        if not p.is_file():
            raise CorruptFileError(f"{str(p)!r} is missing: the folder is not a complete saved {kind} "
                                   f"(an interrupted save?). Save it again.")
    try:
        doc = json.loads(jpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{str(jpath)!r} is not valid JSON ({exc}); the file is corrupt. Save it again.") from None
    if not isinstance(doc, dict) or doc.get("format") != f"unveil.{kind}":
        raise CorruptFileError(f"{str(jpath)!r} is not an unveil {kind} file (format field "
                               f"{doc.get('format') if isinstance(doc, dict) else None!r}).")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptFileError(f"{str(jpath)!r} has format version {doc.get('format_version')}, newer than "
                               f"this unveil reads ({FORMAT_VERSION}); upgrade unveil.")
    blob = tpath.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
        raise CorruptFileError(f"{str(tpath)!r} does not match the checksum recorded in {jpath.name} "
                               f"(truncated or modified, {len(blob)} bytes). Save it again.")
    try:
        tensors = st_load(blob)
    except Exception as exc:  # noqa: BLE001
        raise CorruptFileError(f"{str(tpath)!r} is not a readable safetensors file ({exc}).") from None
    return tensors, doc
