"""Atomic file writing and checksummed json + safetensors bundles (no pickle anywhere)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, Optional, Tuple

import torch

from ._errors import BusyError, CorruptFileError, OutputExistsError

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
    from ._version import __version__
    return {"unveil": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def _stage_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to a synced temporary sibling of ``path``; returns its name (not yet renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_checked(tensors_path, json_path, tensors: Dict[str, torch.Tensor], doc: dict, fmt: str) -> dict:
    """Write ``tensors`` (safetensors) and ``doc`` (json holding the tensors' sha256) as one transaction.

    Both files are serialised and written to temporary siblings first; only when both are on disk
    are they renamed into place (tensors, then json). A failure before that (a non-JSON ``doc``, a
    full disk) leaves an existing pair untouched and loadable. Returns the written document.
    """
    from safetensors.torch import save as st_save

    tpath, jpath = Path(tensors_path), Path(json_path)
    blob = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    full = {"format": f"unveil.{fmt}", "format_version": FORMAT_VERSION,
            "tensors_sha256": hashlib.sha256(blob).hexdigest(), "versions": versions(), **doc}
    try:
        text = json.dumps(full, indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(f"cannot save the unveil {fmt}: its metadata is not JSON-serialisable ({exc}); "
                               f"pass plain str/int/float/bool/list/dict values. Nothing was written.") from None
    staged = []
    try:
        staged.append(_stage_bytes(tpath, blob))
        staged.append(_stage_bytes(jpath, text.encode()))
        os.replace(staged[0], tpath)
        os.replace(staged[1], jpath)
    except BaseException:
        for tmp in staged:
            _unlink_quietly(tmp)
        raise
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
    version = doc.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CorruptFileError(f"{str(jpath)!r} has a format_version of type {type(version).__name__}, expected an "
                               f"integer; the file is corrupt. {fix}")
    if not isinstance(doc.get("tensors_sha256"), str):
        raise CorruptFileError(f"{str(jpath)!r} lacks a tensors_sha256 string; the file is corrupt. {fix}")
    if version > FORMAT_VERSION:
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


def save_bundle(directory, kind: str, tensors: Dict[str, torch.Tensor], meta: dict, overwrite: bool = True) -> Path:
    """Save ``tensors`` (safetensors) and ``meta`` (json) into ``directory`` as ``<kind>.*``
    (see :func:`write_checked`).

    Files of those names that unveil did not write (a json without our ``format`` field) are never
    replaced; our own bundle is replaced only when ``overwrite``. Other files in the folder are left
    alone.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"cannot save to {str(directory)!r}: it exists and is not a folder; "
                                f"pass a folder path (it is created if missing).")
    jpath, tpath = directory / f"{kind}.json", directory / f"{kind}.safetensors"
    if jpath.exists() or jpath.is_symlink() or tpath.exists() or tpath.is_symlink():
        if not _is_ours(jpath, kind) or tpath.is_symlink() or (tpath.exists() and not tpath.is_file()):
            raise OutputExistsError(f"{str(directory)!r} already holds {jpath.name} or {tpath.name} that unveil did "
                                    f"not write; they are left alone. Choose another folder.")
        if not overwrite:
            raise OutputExistsError(f"{str(directory)!r} already holds a saved {kind}; pass overwrite=True "
                                    f"(CLI: --overwrite) to replace it, or choose another folder.")
    directory.mkdir(parents=True, exist_ok=True)
    write_checked(tpath, jpath, tensors, meta, kind)
    return directory


def check_outputs_replaceable(folder, ours: Dict[str, "callable"]) -> None:
    """Refuse (before any work) to write into ``folder`` where a file we are about to replace was
    not written by us. ``ours`` maps a file name to a predicate on its parsed json (or, for a
    non-json file, to None: replaceable when the json files beside it are ours)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"output {str(folder)!r} exists and is not a folder; pass a folder path.")
    foreign = []
    for name, pred in ours.items():
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        if pred is None:
            continue
        doc = None
        if path.is_file() and not path.is_symlink():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                doc = None
        if not (isinstance(doc, dict) and pred(doc)):
            foreign.append(name)
    if foreign or any((folder / n).is_symlink() for n, pred in ours.items() if pred is None):
        raise OutputExistsError(f"{str(folder)!r} already holds {', '.join(foreign) or 'a linked output file'} that "
                                f"unveil did not write; nothing was changed. Choose another --out folder.")
    if any((folder / n).exists() for n, pred in ours.items() if pred is None) and \
            not any((folder / n).exists() for n, pred in ours.items() if pred is not None):
        names = [n for n, pred in ours.items() if pred is None and (folder / n).exists()]
        raise OutputExistsError(f"{str(folder)!r} already holds {', '.join(names)} without the results file unveil "
                                f"writes beside it, so it is not ours; choose another --out folder.")


def read_json_object(json_path: Path) -> Optional[dict]:
    """The json object in ``json_path`` if it is a regular file (not a link) holding one, else None."""
    if json_path.is_symlink() or not json_path.is_file():
        return None
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_ours(json_path: Path, kind: str) -> bool:
    """True if ``json_path`` is a regular file holding an unveil ``kind`` document."""
    doc = read_json_object(json_path)
    return doc is not None and doc.get("format") == f"unveil.{kind}"


def load_bundle(directory, kind: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Load and verify a bundle written by :func:`save_bundle`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CorruptFileError(f"no saved {kind} at {str(directory)!r}: expected a folder holding "
                               f"{kind}.json and {kind}.safetensors (written by .save()).")
    return read_checked(directory / f"{kind}.safetensors", directory / f"{kind}.json", kind, "Save it again.")


# ------------------------------------------------------------------------------ untrusted paths
def safe_relpath(root, rel, what: str, pattern: Optional[str] = None, fix: str = "") -> Path:
    """Join a path read from a file onto ``root``, refusing anything that could leave it.

    ``rel`` must be a non-empty string, a relative POSIX path without ``..`` or empty parts (and,
    with ``pattern``, match that regular expression in full); the joined path, with symbolic links
    resolved, must lie inside ``root``. Returns the joined (unresolved) path. Raises
    :class:`CorruptFileError` naming ``what`` otherwise.
    """
    def bad(reason):
        return CorruptFileError(f"{what} {rel!r} {reason}; expected a relative path inside {str(root)!r}"
                                f"{f' matching {pattern!r}' if pattern else ''}. The file is corrupt or not "
                                f"trustworthy.{(' ' + fix) if fix else ''}")

    if not isinstance(rel, str) or not rel:
        raise bad("is not a non-empty string")
    if "\x00" in rel or "\\" in rel:
        raise bad("holds a NUL or backslash")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", rel):
        raise bad("is absolute")
    if any(part in ("..", "") for part in rel.split("/")) or "." in rel.split("/"):
        raise bad("has '..', '.' or empty parts")
    if pattern is not None and not re.fullmatch(pattern, rel):
        raise bad("does not have the expected form")
    root = Path(root)
    joined = root.joinpath(*pure.parts)
    try:
        real_root = root.resolve(strict=False)
        real = joined.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
        raise bad(f"cannot be resolved ({exc})") from None
    if real != real_root and real_root not in real.parents:
        raise bad(f"resolves to {str(real)!r}, outside the folder (a symbolic link?)")
    return joined


# -------------------------------------------------------------------------------------- locking
@contextlib.contextmanager
def folder_lock(folder, what: str = "folder") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``.unveil-lock`` file in it) for the block.

    A second process asking for the same lock gets :class:`BusyError` at once instead of writing
    beside the first. The lock dies with its process (``flock``), so a killed run never leaves a
    stale lock behind.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666 & ~_umask())
    except OSError as exc:
        raise BusyError(f"cannot create the lock file {str(path)!r} ({exc.strerror or exc}); check that the "
                        f"{what} is writable and {LOCK_NAME} is not a link.") from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, proceed unlocked
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise BusyError(f"another process is writing the {what} {str(folder)!r} (it holds "
                                    f"{LOCK_NAME}); wait for it to finish, or write to another folder.") from None
                raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


LOCK_NAME = ".unveil-lock"
