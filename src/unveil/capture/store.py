"""The on-disk activation store: a layer's feature maps over an image set, as memory-mapped shards.

Layout of a store folder::

    plan.json                  what is being extracted (written first; used to resume)
    shards/maps_00000.npy      (n, D, H, W) float16/float32 maps of shard 0 (atomic write)
    shards/pos_00000.npy       (n, k) int32 flat positions kept per map (only with ``subsample``)
    shards/shard_00000.json    completion record of shard 0 (written after its .npy files)
    manifest.json              written last, by atomic rename: the store is complete iff it exists

An interrupted :func:`extract` is resumed by calling it again with the same arguments: shards whose
completion record exists are kept, the others are computed. Shard ``s`` always covers the same
candidate images (``s·shard_size`` to ``(s+1)·shard_size``), and its random patch subsample is
drawn from a generator seeded by ``(seed, s)``, so a resumed store equals an uninterrupted one.

Several processes (``torchrun ... -m unveil extract``, or an initialised ``torch.distributed``
process group) split the unfinished shards into contiguous blocks, one per rank; each rank writes its
own shards and records, and rank 0 writes the manifest once every rank is done. The store is the
same as one process's (only the manifest's ``world_size`` differs), and either kind of run resumes
the other's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import _distributed
from .._errors import CorruptFileError, HeadError, OutputExistsError, ValidationError
from .._io import (LOCK_NAME, atomic_write_json, atomic_writer, folder_lock, read_json_object, safe_relpath, sha256_file,
                   versions)
from .._progress import progress as _progress
from .._validation import check_positive_int, make_generator
from ..data.images import ImageFolder, Preprocessing, load_batch, scan_images
from ..models import available_models, load_model
from .head import make_head
from .hooks import Capturer, TokenLayout

__all__ = ["ActivationStore", "extract", "head_for_store"]
logger = logging.getLogger("unveil")

FORMAT = "unveil.activation_store"
FORMAT_VERSION = 1
_DTYPES = ("float16", "float32")
# the only file names a store's manifest or shard records may point to (relative to the store)
_MAPS_FILE = r"shards/maps_\d{5}\.npy"
_POS_FILE = r"shards/pos_\d{5}\.npy"
_OURS_IN_SHARDS = re.compile(r"(maps|pos)_\d{5}\.npy|shard_\d{5}\.json|\.(maps|pos|shard)_\d{5}\.(npy|json)\..*\.tmp")
_FIX = "Extract again."


def _is_int(v, minimum=0) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum


def _check_manifest(manifest: dict, mpath: Path) -> None:
    """Type-check every field a reader uses (a manifest may come from someone else)."""
    def bad(field, expected):
        return CorruptFileError(f"{str(mpath)!r}: field {field!r} is {_short(manifest.get(field))}, expected "
                                f"{expected}; the store is damaged or not trustworthy. {_FIX}")

    for key in ("n_maps", "n_features"):
        if not _is_int(manifest[key], 1 if key == "n_features" else 0):
            raise bad(key, "a non-negative integer" if key == "n_maps" else "a positive integer")
    shape = manifest["map_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v, 1) for v in shape)):
        raise bad("map_shape", "a list of two positive integers [H, W]")
    if manifest["dtype"] not in _DTYPES:
        raise bad("dtype", f"one of {_DTYPES}")
    ids = manifest["image_ids"]
    if not (isinstance(ids, list) and all(isinstance(v, str) for v in ids)):
        raise bad("image_ids", "a list of strings")
    labels = manifest.get("labels")
    if labels is not None and not (isinstance(labels, list) and len(labels) == len(ids)
                                   and all(_is_int(v, -1) for v in labels)):
        raise bad("labels", "null or one integer >= -1 per image id")
    names = manifest.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(v, str) for v in names)):
        raise bad("class_names", "null or a list of strings")
    for key in ("layer", "model_id"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise bad(key, "a string")
    if not isinstance(manifest.get("subsampled", False), bool):
        raise bad("subsampled", "true or false")
    if not isinstance(manifest["shards"], list):
        raise bad("shards", "a list of shard records")
    for k, rec in enumerate(manifest["shards"]):
        if not (isinstance(rec, dict) and _is_int(rec.get("n"))):
            raise CorruptFileError(f"{str(mpath)!r}: shard record {k} is {_short(rec)}, expected "
                                   f"{{'file', 'n', 'sha256', ...}} with a non-negative integer n. {_FIX}")
        if rec["n"] and not isinstance(rec.get("sha256"), str):
            raise CorruptFileError(f"{str(mpath)!r}: shard record {k} has no sha256 string. {_FIX}")


def _short(v) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:60] + '...' if len(text) > 60 else text}"


# ----------------------------------------------------------------------------------------- reading
class ActivationStore:
    """Read-only view of a complete store (open with :meth:`open`).

    Maps are memory-mapped: only the batches asked for are read, so memory does not grow with the
    number of images.

    Examples
    --------
    >>> store = ActivationStore.open("acts/")                       # doctest: +SKIP
    >>> len(store), store.n_features, store.map_shape               # doctest: +SKIP
    (200, 512, (7, 7))
    >>> for X in store.iter_maps(64):                               # doctest: +SKIP
    ...     X.shape                                                 # (B, 512, 7, 7) float32
    """

    def __init__(self, path: Path, manifest: dict, verify: str = "lazy"):
        self.path = Path(path)
        self.manifest = manifest
        self._verify = verify
        self._checked = [False] * len(manifest["shards"])
        self._shards = manifest["shards"]
        counts = [int(s["n"]) for s in self._shards]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays: List[Optional[np.ndarray]] = [None] * len(self._shards)
        self._positions: List[Optional[np.ndarray]] = [None] * len(self._shards)
        lab = manifest.get("labels")
        self.labels = None if lab is None else torch.as_tensor(lab, dtype=torch.int64)
        self.image_ids: List[str] = list(manifest["image_ids"])
        self.class_names = manifest.get("class_names")

    # ---------------------------------------------------------------- open
    @classmethod
    def open(cls, path, verify: str = "lazy") -> "ActivationStore":
        """Open the store at ``path``; :class:`CorruptFileError` if it is missing, incomplete or damaged.

        Parameters
        ----------
        path : folder written by :func:`extract`
        verify : {"lazy", "full", "none"}
            ``"lazy"`` (default) checks each shard's sha256 the first time it is read, so a shard
            modified after extraction is refused instead of used; ``"full"`` checks every shard now;
            ``"none"`` trusts the files (for very large stores you made yourself).
        """
        if verify not in ("lazy", "full", "none"):
            raise ValidationError(f"verify must be 'lazy', 'full' or 'none', got {verify!r}.")
        path = Path(path)
        if not path.is_dir():
            raise CorruptFileError(f"no activation store at {str(path)!r}: expected a folder written by "
                                   f"unveil.capture.extract (or `unveil extract`).")
        mpath = path / "manifest.json"
        if not mpath.is_file():
            if (path / "plan.json").is_file():
                done = len(list((path / "shards").glob("shard_*.json"))) if (path / "shards").is_dir() else 0
                raise CorruptFileError(f"the activation store at {str(path)!r} is incomplete (manifest.json is missing; "
                                       f"{done} shard(s) finished): the extraction was interrupted. Run the same "
                                       f"extraction again to resume it.")
            raise CorruptFileError(f"{str(mpath)!r} is missing: {str(path)!r} is not a complete activation store.")
        try:
            manifest = json.loads(mpath.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"{str(mpath)!r} is not valid JSON ({exc}); the store is damaged. Extract again.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CorruptFileError(f"{str(mpath)!r} is not an unveil activation-store manifest.")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise CorruptFileError(f"{str(mpath)!r} has format version {manifest.get('format_version')}, newer than "
                                   f"this unveil reads ({FORMAT_VERSION}); upgrade unveil.")
        required = ("shards", "n_maps", "n_features", "map_shape", "image_ids", "dtype")
        missing = [k for k in required if k not in manifest]
        if missing:
            raise CorruptFileError(f"{str(mpath)!r} lacks the fields {missing}; the store is damaged. Extract again.")
        _check_manifest(manifest, mpath)
        store = cls(path, manifest, verify=verify)
        if store._offsets[-1] != manifest["n_maps"] or len(store.image_ids) != manifest["n_maps"]:
            raise CorruptFileError(f"{str(mpath)!r} is inconsistent: the shards hold {int(store._offsets[-1])} maps, "
                                   f"the manifest says {manifest['n_maps']}. Extract again.")
        want = (manifest["n_features"], *manifest["map_shape"])
        for s, rec in enumerate(store._shards):
            if rec["n"] == 0:
                continue
            f = store._file(s, "file")
            if store.subsampled:
                store._file(s, "positions")
            if not f.is_file():
                raise CorruptFileError(f"shard file {str(f)!r} is missing; the store is damaged. Extract again.")
            arr = store._array(s)
            if arr.shape != (rec["n"], *want) or arr.dtype != np.dtype(manifest["dtype"]):
                raise CorruptFileError(f"shard file {str(f)!r} holds {arr.dtype} {arr.shape}, expected "
                                       f"{manifest['dtype']} {(rec['n'], *want)}; the store is damaged. Extract again.")
        if verify == "full":
            store.verify()
        return store

    def _file(self, s: int, key: str) -> Path:
        """The checked path of shard ``s``'s ``file`` (maps) or ``positions`` entry."""
        pattern = _MAPS_FILE if key == "file" else _POS_FILE
        return safe_relpath(self.path, self._shards[s].get(key), f"shard {s}'s {key!r} entry", pattern, _FIX)

    def _read(self, s: int) -> np.ndarray:
        """Shard ``s``'s memory map, its checksum checked on first use (``verify="lazy"``)."""
        if self._verify == "lazy" and not self._checked[s]:
            self._check_shard(s)
        return self._array(s)

    def _array(self, s: int) -> np.ndarray:
        if self._arrays[s] is None:
            f = self._file(s, "file")
            try:
                self._arrays[s] = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise CorruptFileError(f"shard file {str(f)!r} is not a readable .npy file ({exc}). Extract again.") from None
        return self._arrays[s]

    # -------------------------------------------------------------- shape
    def __len__(self) -> int:
        return int(self.manifest["n_maps"])

    @property
    def n_features(self) -> int:
        """D, the number of channels."""
        return int(self.manifest["n_features"])

    @property
    def map_shape(self):
        """(H, W) of the stored maps ((k, 1) when subsampled)."""
        return tuple(int(v) for v in self.manifest["map_shape"])

    @property
    def subsampled(self) -> bool:
        """True when only ``k`` random positions per image are stored (maps are (D, k, 1))."""
        return bool(self.manifest.get("subsampled", False))

    @property
    def layer(self) -> str:
        return self.manifest.get("layer", "?")

    @property
    def model_id(self) -> Optional[str]:
        return self.manifest.get("model_id")

    @property
    def layout(self) -> TokenLayout:
        d = self.manifest.get("tokens")
        try:
            if not (isinstance(d, dict) and d.get("kind") in ("map", "vector", "tokens")
                    and d.get("tokens", "patches") in ("patches", "all")):
                raise ValueError("unknown kind or tokens mode")
            layout = TokenLayout.from_dict(d)
            if min(layout.n_tokens, layout.n_prefix, *layout.grid) < 0 or len(layout.grid) != 2:
                raise ValueError("negative sizes")
            return layout
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{str(self.path / 'manifest.json')!r}: field 'tokens' is {_short(d)} ({exc}), "
                                   f"expected the layer's token layout; the store is damaged. {_FIX}") from None

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, n={len(self)}, D={self.n_features}, map_shape={self.map_shape}, "
                f"layer={self.layer!r}, model={self.model_id!r}{', subsampled' if self.subsampled else ''})")

    # ---------------------------------------------------------------- read
    def _index(self, indices) -> np.ndarray:
        if isinstance(indices, slice):
            idx = np.arange(len(self))[indices]
        else:
            idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
            if idx.ndim == 0:
                idx = idx[None]
            if idx.size and not np.issubdtype(idx.dtype, np.integer):
                raise ValidationError(f"indices must be integers, got dtype {idx.dtype}.")
            idx = idx.astype(np.int64).ravel()
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValidationError(f"indices must be in [0, {len(self)}) for a store of {len(self)} maps; "
                                  f"got values from {int(idx.min())} to {int(idx.max())}.")
        return np.where(idx < 0, idx + len(self), idx)

    def maps(self, indices) -> torch.Tensor:
        """Float32 maps ``(len(indices), D, H, W)`` of the given image indices, in that order."""
        idx = self._index(indices)
        out = np.empty((idx.size, self.n_features, *self.map_shape), dtype=np.float32)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = idx[where] - self._offsets[s]
            order = np.argsort(local, kind="stable")
            out[where[order]] = self._read(int(s))[local[order]]
        return torch.from_numpy(out)

    def positions(self, indices) -> torch.Tensor:
        """For a subsampled store: the flat positions ``h·W + w`` (of the full map) kept per image, (n, k)."""
        if not self.subsampled:
            raise ValidationError("this store is not subsampled; every position is stored.")
        idx = self._index(indices)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        out = np.empty((idx.size, self.map_shape[0]), dtype=np.int64)
        for s in np.unique(shard):
            if self._positions[s] is None:
                f = self._file(s, "positions")
                try:
                    pos = np.load(f, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError) as exc:
                    raise CorruptFileError(f"positions file {str(f)!r} is not a readable .npy file ({exc}). "
                                           f"{_FIX}") from None
                want = (int(self._shards[s]["n"]), self.map_shape[0])
                if tuple(pos.shape) != want or not np.issubdtype(pos.dtype, np.integer):
                    raise CorruptFileError(f"positions file {str(f)!r} holds {pos.dtype} {pos.shape}, expected "
                                           f"integers of shape {want}. {_FIX}")
                self._positions[s] = pos
            where = np.nonzero(shard == s)[0]
            out[where] = self._positions[s][idx[where] - self._offsets[s]]
        return torch.from_numpy(out)

    def iter_maps(self, batch_size: int = 256, shuffle: bool = False, generator=None) -> Iterator[torch.Tensor]:
        """Yield contiguous float32 batches ``(B, D, H, W)`` covering every map once.

        Parameters
        ----------
        batch_size : int
        shuffle : bool
            Visit the maps in a random order (drawn from ``generator``); otherwise in store order.
        generator : torch.Generator, int or None
            Source of the shuffling order.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        n = len(self)
        if shuffle:
            g = make_generator(generator)
            order = torch.randperm(n, generator=g).numpy()
            for i in range(0, n, batch_size):
                yield self.maps(order[i:i + batch_size])
            return
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            parts = []
            s = int(np.searchsorted(self._offsets, i, side="right") - 1)
            while i < j:
                stop = min(j, int(self._offsets[s + 1]))
                if stop > i:
                    # np.array copies: the batch never aliases the read-only memory map
                    parts.append(np.array(self._read(s)[i - self._offsets[s]:stop - self._offsets[s]], dtype=np.float32))
                i, s = stop, s + 1
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
            yield torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))

    def verify(self) -> None:
        """Re-read every shard and check its sha256 against the manifest (:class:`CorruptFileError` if not)."""
        for s, rec in enumerate(self._shards):
            if rec["n"]:
                self._check_shard(s)

    def _check_shard(self, s: int) -> None:
        f = self._file(s, "file")
        if sha256_file(f) != self._shards[s].get("sha256"):
            raise CorruptFileError(f"shard file {str(f)!r} does not match its recorded checksum (modified or "
                                   f"truncated since extraction). {_FIX}")
        self._checked[s] = True


# ------------------------------------------------------------------------------------- extraction
def _atomic_save_npy(path: Path, arr: np.ndarray) -> str:
    """``np.save`` via a temporary file + ``os.replace``; returns the file's sha256."""
    with atomic_writer(path) as f:
        np.save(f, arr, allow_pickle=False)
    return sha256_file(path)


class _Source:
    """The images to extract from: a folder (decoded lazily) or a tensor."""

    def __init__(self, images, preprocessing, labels):
        self.folder = None
        self.tensor = None
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[0] == 0:
                raise ValidationError(f"images must be a folder or a non-empty (N, 3, H, W) tensor, got shape "
                                      f"{tuple(images.shape)}.")
            self.tensor = images.detach().cpu()
            n = images.shape[0]
            self.ids = [str(i) for i in range(n)]
            if labels is not None:
                labels = [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
                if len(labels) != n:
                    raise ValidationError(f"labels must have one entry per image ({n}), got {len(labels)}.")
            self.labels, self.class_names, self.skipped = labels, None, []
            self.fingerprint = hashlib.sha256(np.ascontiguousarray(self.tensor.to(torch.float32).numpy()).data).hexdigest()
            self.preprocessing = None
            self.root = None
            self.input_shape = list(images.shape[1:])
        else:
            folder = images if isinstance(images, ImageFolder) else scan_images(images)
            self.folder = folder
            self.ids, self.labels, self.class_names = folder.files, folder.labels, folder.class_names
            self.skipped = list(folder.skipped)
            self.fingerprint = folder.fingerprint()
            if preprocessing is None:
                preprocessing = Preprocessing.imagenet(224)
                logger.info("no preprocessing given: using ImageNet normalisation at 224 px")
            self.preprocessing = preprocessing
            self.root = str(folder.root)
            self.input_shape = [3, preprocessing.size, preprocessing.size]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, indices: Sequence[int]):
        if self.tensor is not None:
            return self.tensor[list(indices)], list(indices), []
        return load_batch(self.folder, indices, self.preprocessing)


def extract(model: nn.Module, layer: str, images, out, batch_size: int = 64, dtype: str = "float16",
            shard_size: int = 256, subsample: Optional[int] = None, seed: int = 0, progress: bool = False,
            model_id: Optional[str] = None, model_source: Optional[dict] = None, preprocessing=None,
            tokens: str = "patches", prefix_tokens: Optional[int] = None, labels=None,
            overwrite: bool = False) -> ActivationStore:
    """Capture ``layer`` over an image set into an :class:`ActivationStore` at ``out`` (resumable).

    Parameters
    ----------
    model : nn.Module
        Used as given (put it in eval mode first); images are moved to its device.
    layer : str
        Dotted module name.
    images : folder path, :class:`~unveil.data.images.ImageFolder` or tensor (N, 3, H, W)
        A folder is scanned recursively (class sub-folders become labels); unreadable files are
        skipped and listed in the manifest. A tensor must already be preprocessed.
    out : path
        Store folder (created). Re-running the same extraction resumes it; a folder holding a
        different extraction is refused unless ``overwrite``.
    batch_size : int
    dtype : {"float16", "float32"}
        Storage dtype (maps are always read back as float32).
    shard_size : int
        Images per shard (the unit of resumption).
    subsample : int, optional
        Keep ``k`` random positions per image; maps are then stored as ``(D, k, 1)``.
    seed : int
        Seed of the subsampling (recorded).
    progress : bool
        Show a tqdm bar.
    model_id, model_source : recorded in the manifest (``model_source`` from
        :func:`unveil.models.model_source` lets :func:`head_for_store` rebuild the model).
    preprocessing : :class:`~unveil.data.images.Preprocessing`, for folder images.
    tokens, prefix_tokens : ViT token handling, as in :func:`unveil.capture.capture`.
    labels : optional labels for tensor images.
    overwrite : bool
        Delete a different extraction found at ``out``.

    Returns
    -------
    ActivationStore

    Notes
    -----
    Under ``torchrun`` (or with an initialised process group of several processes) every process
    calls ``extract`` with the same arguments; each extracts a contiguous block of the unfinished
    shards. Only rank 0 locks the folder and writes the manifest; an error on any rank (or a rank that
    dies, noticed within the process-group timeout) makes every rank raise before the manifest is
    written, so the run is resumed by calling it again (with any number of processes).

    Examples
    --------
    >>> from unveil.models import load_model
    >>> model, pre, model_id = load_model("resnet18")                         # doctest: +SKIP
    >>> store = extract(model, "layer4", "images/", "acts/", preprocessing=pre,
    ...                 model_id=model_id)                                      # doctest: +SKIP
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    shard_size = check_positive_int(shard_size, "shard_size")
    if dtype not in _DTYPES:
        raise ValidationError(f"dtype must be one of {_DTYPES}, got {dtype!r}.")
    if subsample is not None:
        subsample = check_positive_int(subsample, "subsample")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValidationError(f"seed must be an integer, got {seed!r}.")
    seed = int(seed)
    capturer = Capturer(model, layer, tokens, prefix_tokens)  # validates the layer name first
    src = _Source(images, preprocessing, labels)
    out = Path(out)

    plan = {"format": FORMAT + ".plan", "model_id": model_id, "layer": layer, "tokens": tokens,
            "prefix_tokens": prefix_tokens, "dtype": dtype, "shard_size": shard_size, "subsample": subsample,
            "seed": seed, "n_candidates": len(src), "data_fingerprint": src.fingerprint,
            "preprocessing": src.preprocessing.to_dict() if src.preprocessing is not None else None}
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    plan["plan_id"] = plan_id
    if _distributed.ensure_initialised(_model_device(model)):
        return _extract_distributed(capturer, src, out, plan, model_source, overwrite, shard_size, batch_size, dtype,
                                    subsample, seed, progress)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not a folder; pass a folder path for the store.")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "activation store"):  # two extractions into one folder: the second is refused
        _prepare_folder(out, plan_id, overwrite)
        if (out / "manifest.json").is_file():
            logger.info("%s already holds this extraction; nothing to do", out)
            return ActivationStore.open(out)
        if not (out / "plan.json").is_file():
            atomic_write_json(out / "plan.json", plan)

        n_shards = -(-len(src) // shard_size)
        records: List[Optional[dict]] = [_read_record(out, s, plan_id) for s in range(n_shards)]
        done_images = sum(min(shard_size, len(src) - s * shard_size) for s, r in enumerate(records) if r is not None)
        if done_images:
            logger.info("resuming %s: %d of %d shards already done", out, sum(r is not None for r in records), n_shards)
        bar = _progress(total=len(src), enabled=progress, desc=f"extract {layer}", unit="img", initial=done_images)
        with ThreadPoolExecutor(max_workers=1) as pool:
            try:
                for s in range(n_shards):
                    if records[s] is not None:
                        continue
                    records[s] = _extract_shard(capturer, src, s, shard_size, batch_size, dtype, subsample, seed,
                                                out, plan_id, pool, bar)
            finally:
                bar.close()
        _write_manifest(out, src, plan, model_source, records, world=1)
        return ActivationStore.open(out)


def _model_device(model: nn.Module) -> Optional[torch.device]:
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device


def _write_manifest(out: Path, src: "_Source", plan: dict, model_source: Optional[dict], records: List[dict],
                    world: int) -> None:
    """Check the finished shards agree and write ``manifest.json`` (atomically, last)."""
    layouts = {json.dumps(r["layout"], sort_keys=True) for r in records if r["n"]}
    shapes = {tuple(r["shape"]) for r in records if r["n"]}
    n_maps = sum(r["n"] for r in records)
    skipped = src.skipped + [sk for r in records for sk in r["skipped"]]
    if n_maps == 0:
        raise ValidationError(f"none of the {len(src)} image files could be decoded ({len(skipped)} skipped, e.g. "
                              f"{skipped[0]['path']!r}: {skipped[0]['reason']}); no activations were stored. "
                              f"Check the image folder.")
    if len(layouts) != 1 or len(shapes) != 1:
        raise CorruptFileError(f"the shards in {str(out)!r} disagree on the map shape/layout ({sorted(shapes)}); "
                               f"they come from different runs. Extract again with overwrite=True.")
    shape = shapes.pop()
    kept = [i for r in records for i in r["kept"]]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "plan_id": plan["plan_id"],
        "model_id": plan["model_id"], "model": model_source, "layer": plan["layer"],
        "tokens": json.loads(layouts.pop()), "preprocessing": plan["preprocessing"],
        "data": {"kind": "tensor" if src.tensor is not None else "folder", "root": src.root,
                 "fingerprint": src.fingerprint, "n_candidates": len(src), "input_shape": src.input_shape},
        "n_maps": n_maps, "n_features": shape[0], "map_shape": list(shape[1:]), "dtype": plan["dtype"],
        "subsample": plan["subsample"], "subsampled": plan["subsample"] is not None, "seed": plan["seed"],
        "shards": [{"file": r["file"], "n": r["n"], "sha256": r["sha256"], "positions": r.get("positions")}
                   for r in records],
        "image_ids": [src.ids[i] for i in kept],
        "labels": None if src.labels is None else [int(src.labels[i]) for i in kept],
        "class_names": src.class_names,
        "skipped": skipped, "n_skipped": len(skipped),
        "world_size": int(world),
        "versions": versions(),
    }
    atomic_write_json(out / "manifest.json", manifest)
    if skipped:
        logger.warning("%d file(s) skipped (not images or unreadable); they are listed in %s",
                       len(skipped), out / "manifest.json")


def _extract_distributed(capturer: Capturer, src: "_Source", out: Path, plan: dict, model_source: Optional[dict],
                         overwrite: bool, shard_size: int, batch_size: int, dtype: str, subsample: Optional[int],
                         seed: int, progress: bool) -> ActivationStore:
    """:func:`extract` with several processes (an initialised process group).

    The shards are the same as with one process (shard ``s`` always holds the same images, its
    subsample drawn from ``(seed, s)``); the unfinished ones are split into contiguous blocks, one per
    rank, and each rank writes its own shard files and records. Only rank 0 takes the folder lock,
    prepares the folder and, once every rank has finished (the records are gathered to it), writes
    the manifest; a failure on any rank makes every rank raise before a manifest is written, so an
    interrupted run is resumed like any other.
    """
    D = _distributed
    plan_id = plan["plan_id"]
    fix = ("the store stays incomplete (no manifest.json) and its finished shards are kept; run the same extraction "
           "again to resume it.")
    ids = D.all_gather_object(plan_id, "comparing what each process extracts", fix)
    if len(set(ids)) != 1:
        exc = ValidationError(f"the {len(ids)} processes of this run do not see the same extraction (image folder, "
                              f"model, layer or settings differ between them: {len(set(ids))} different plans); "
                              f"give every process the same arguments and the same image folder.")
        exc.mirrored = D.rank() != 0
        raise exc
    with contextlib.ExitStack() as stack:
        def prepare():
            if out.exists() and not out.is_dir():
                raise OutputExistsError(f"output {str(out)!r} exists and is not a folder; pass a folder path for the "
                                        f"store.")
            out.mkdir(parents=True, exist_ok=True)
            # only rank 0 holds the lock, for the whole run: the other ranks write shards under it, and a
            # second run into this folder is refused by its own rank 0 (which tells its other ranks)
            stack.enter_context(folder_lock(out, "activation store"))
            _prepare_folder(out, plan_id, overwrite)
            if (out / "manifest.json").is_file():
                logger.info("%s already holds this extraction; nothing to do", out)
                return "done"
            if not (out / "plan.json").is_file():
                atomic_write_json(out / "plan.json", plan)
            return "todo"

        if D.on_rank0(prepare, "preparing the store folder", fix) == "done":
            return ActivationStore.open(out)
        n_shards = -(-len(src) // shard_size)
        mine = D.block(n_shards)
        checked = D.on_every_rank(lambda: [(s, _read_record(out, s, plan_id)) for s in mine],
                                  "checking the finished shards", fix)
        records: List[Optional[dict]] = [rec for part in checked for _, rec in part]
        todo = [s for s in range(n_shards) if records[s] is None]
        if len(todo) < n_shards:
            logger.info("resuming %s: %d of %d shards already done", out, n_shards - len(todo), n_shards)
        my_shards = [todo[i] for i in D.block(len(todo))]
        logger.info("process %d of %d: extracting %d of the %d unfinished shard(s)", D.rank(), D.world_size(),
                    len(my_shards), len(todo))

        def work():
            total = sum(min(shard_size, len(src) - s * shard_size) for s in my_shards)
            bar = _progress(total=total, enabled=progress and D.rank() == 0,
                            desc=f"extract {capturer.layer} (rank 0 of {D.world_size()})", unit="img")
            done = []
            with ThreadPoolExecutor(max_workers=1) as pool:
                try:
                    for s in my_shards:
                        done.append((s, _extract_shard(capturer, src, s, shard_size, batch_size, dtype, subsample,
                                                       seed, out, plan_id, pool, bar)))
                finally:
                    bar.close()
            return done

        for part in D.on_every_rank(work, "waiting for the other processes' shards", fix):
            for s, rec in part:
                records[s] = rec
        D.on_rank0(lambda: _write_manifest(out, src, plan, model_source, records, world=D.world_size()),
                   "writing the manifest", fix)
    return ActivationStore.open(out)


def _read_own(path: Path) -> Optional[dict]:
    """The json document at ``path`` if it is one of ours (a store plan or manifest), else None."""
    doc = read_json_object(path)
    return doc if doc is not None and doc.get("format") in (FORMAT, FORMAT + ".plan") else None


def _prepare_folder(out: Path, plan_id: str, overwrite: bool) -> None:
    """Check that ``out`` is empty or holds a store of ours; with ``overwrite``, delete only the files
    a store of ours writes (never anything else, never through a symbolic link)."""
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if not entries:
        return
    docs = [d for d in (_read_own(out / "manifest.json"), _read_own(out / "plan.json")) if d is not None]
    if not docs:
        raise OutputExistsError(f"output folder {str(out)!r} is not empty and is not an activation store (holds "
                                f"{sorted(p.name for p in entries)[:3]}); nothing was changed. Choose a new or "
                                f"empty folder.")
    shards = out / "shards"
    if shards.is_symlink() or (shards.exists() and not shards.is_dir()):
        raise OutputExistsError(f"{str(shards)!r} is a symbolic link or not a folder; unveil writes and deletes "
                                f"shards only in a real folder inside the store. Remove it yourself or choose "
                                f"another folder.")
    if docs[0].get("plan_id") == plan_id:
        return
    if not overwrite:
        raise OutputExistsError(f"{str(out)!r} holds a different extraction (another model, layer, image set or "
                                f"setting); choose another folder, or pass overwrite=True (--overwrite) to "
                                f"replace it.")
    # delete what a store of ours writes: the manifest first (the store is then incomplete), the plan last
    (out / "manifest.json").unlink(missing_ok=True)
    if shards.is_dir():
        for f in sorted(shards.iterdir()):
            if _OURS_IN_SHARDS.fullmatch(f.name) and (f.is_file() or f.is_symlink()):
                f.unlink()
        if not any(shards.iterdir()):
            shards.rmdir()
        else:
            logger.warning("%s holds files unveil did not write; they were left in place", shards)
    (out / "plan.json").unlink(missing_ok=True)


def _read_record(out: Path, s: int, plan_id: str) -> Optional[dict]:
    rpath = out / "shards" / f"shard_{s:05d}.json"
    try:
        rec = json.loads(rpath.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("plan_id") != plan_id:
        return None
    # a record that does not check out is recomputed, never trusted
    try:
        if rec.get("index") != s or not _is_int(rec.get("n")) or not isinstance(rec.get("kept"), list) \
                or len(rec["kept"]) != rec["n"] or not all(_is_int(i) for i in rec["kept"]) \
                or not isinstance(rec.get("skipped"), list):
            return None
        if rec["n"]:
            f = safe_relpath(out, rec.get("file"), "shard file", _MAPS_FILE)
            if rec.get("positions") is not None:
                safe_relpath(out, rec["positions"], "positions file", _POS_FILE)
            shape = rec.get("shape")
            if not (isinstance(shape, list) and all(_is_int(v, 1) for v in shape)):
                return None
            if sha256_file(f) != rec.get("sha256"):
                return None
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
            if tuple(arr.shape) != (rec["n"], *shape):
                return None
    except (OSError, ValueError):  # CorruptFileError is an OSError
        return None
    return rec


def _shard_generator(seed: int, s: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, s]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _extract_shard(capturer: Capturer, src: _Source, s: int, shard_size: int, batch_size: int, dtype: str,
                   subsample: Optional[int], seed: int, out: Path, plan_id: str, pool, bar) -> dict:
    start, stop = s * shard_size, min(len(src), (s + 1) * shard_size)
    batches = [list(range(i, min(stop, i + batch_size))) for i in range(start, stop, batch_size)]
    chunks, pos_chunks, kept, skipped = [], [], [], []
    g = _shard_generator(seed, s) if subsample else None
    pending = pool.submit(src.load, batches[0])
    for b in range(len(batches)):
        x, kept_b, skipped_b = pending.result()
        if b + 1 < len(batches):
            pending = pool.submit(src.load, batches[b + 1])  # decode the next batch while this one runs
        skipped += skipped_b
        if kept_b:
            maps = capturer(x)
            if not torch.isfinite(maps).all():
                raise ValidationError(f"layer {capturer.layer!r} produced NaN/inf activations for images "
                                      f"{[src.ids[i] for i in kept_b][:3]}...; check the model and preprocessing.")
            if subsample:
                maps, pos = _subsample(maps, subsample, g, capturer.layer)
                pos_chunks.append(pos)
            arr = maps.numpy().astype(dtype, copy=False)
            if not np.isfinite(arr).all():
                raise ValidationError(f"activations of layer {capturer.layer!r} exceed the float16 range "
                                      f"(max |x| = {float(maps.abs().max()):.3g}); extract with dtype='float32'.")
            chunks.append(arr)
            kept += kept_b
        bar.update(len(batches[b]))
    rec = {"plan_id": plan_id, "index": s, "start": start, "stop": stop, "n": len(kept), "kept": kept,
           "skipped": skipped, "file": f"shards/maps_{s:05d}.npy", "sha256": None, "shape": None,
           "layout": capturer.layout.to_dict() if capturer.layout is not None else None, "positions": None}
    if kept:
        data = np.concatenate(chunks)
        rec["shape"] = list(data.shape[1:])
        if subsample:
            rec["positions"] = f"shards/pos_{s:05d}.npy"
            _atomic_save_npy(out / rec["positions"], np.concatenate(pos_chunks).astype(np.int32))
        rec["sha256"] = _atomic_save_npy(out / rec["file"], data)
    atomic_write_json(out / "shards" / f"shard_{s:05d}.json", rec)
    return rec


def _subsample(maps: torch.Tensor, k: int, g: torch.Generator, layer: str):
    n, d, h, w = maps.shape
    if k > h * w:
        raise ValidationError(f"subsample={k} is larger than the {h}×{w} = {h * w} positions of layer {layer!r}; "
                              f"pass at most {h * w} (or no subsample).")
    pos = torch.stack([torch.randperm(h * w, generator=g)[:k].sort().values for _ in range(n)])
    flat = maps.reshape(n, d, h * w)
    picked = torch.gather(flat, 2, pos[:, None, :].expand(n, d, k))
    return picked[..., None].contiguous(), pos


# ------------------------------------------------------------------------------------------- head
def head_for_store(store: Union[ActivationStore, str, os.PathLike], model: Optional[nn.Module] = None, *,
                   model_name: Optional[str] = None, weights=None):
    """The head f⁺ matching a store: its model cut at its layer with :func:`make_head`.

    The model is never taken from the store's files alone: a manifest may come from someone else,
    so it can only *name* a model that unveil registers (``resnet18``, ``worldnet``, ...; see
    :func:`unveil.models.available_models`), and a weights file is read only when the caller names
    it. A ``package.module:factory`` model must be named again by the caller (``model_name`` or
    ``model``).

    Parameters
    ----------
    store : ActivationStore or path
    model : nn.Module, optional
        The model the store was extracted from; used as given.
    model_name : str, optional
        Rebuild this model (checked against the manifest's) instead of the manifest's name; needed
        for ``package.module:factory`` models.
    weights : path, optional
        The weights file to load; it must have the sha256 the manifest records. Needed whenever the
        store was extracted with weights.

    Raises
    ------
    HeadError
        If the store is subsampled (the maps lost their spatial layout), or the model cannot be
        rebuilt or cut at the layer.
    """
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    m = store.manifest
    if store.subsampled:
        raise HeadError(f"the store at {str(store.path)!r} is subsampled ({m.get('subsample')} positions per image), so "
                        f"its maps are not the layer's (H, W) maps the head takes; fit without a head, or extract "
                        f"without subsample.")
    if model is None:
        model = _rebuild_model(store, model_name, weights)
    elif model_name is not None or weights is not None:
        raise ValidationError("pass either model= or model_name=/weights=, not both.")
    layout = store.layout
    size = ((m.get("data") or {}).get("input_shape") or [None])[-1]
    if not (size is None or _is_int(size, 1)):
        raise CorruptFileError(f"the store at {str(store.path)!r} records an input size of {_short(size)}, expected "
                               f"an integer. {_FIX}")
    if not isinstance(m.get("layer"), str):
        raise CorruptFileError(f"the store at {str(store.path)!r} records no layer name. {_FIX}")
    return make_head(model, m["layer"], tokens=layout.tokens, prefix_tokens=layout.n_prefix, input_size=size,
                     layout=layout)


_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def _rebuild_model(store: ActivationStore, model_name: Optional[str], weights) -> nn.Module:
    """Rebuild the store's model from a registered name (or the caller's), never from the file alone."""
    src = store.manifest.get("model")
    where = f"the store at {str(store.path)!r}"
    if not src:
        raise HeadError(f"{where} does not record how to rebuild its model ({store.model_id!r}); pass model= "
                        f"(CLI: --model).")
    if not isinstance(src, dict) or not isinstance(src.get("name"), str):
        raise CorruptFileError(f"{where} has a 'model' record of {_short(src)}, expected {{'name': str, "
                               f"'options': {{...}}, ...}}. {_FIX}")
    name = src["name"]
    options = src.get("options") or {}
    if not (isinstance(options, dict) and all(isinstance(k, str) and _OPTION.fullmatch(k) for k in options)
            and all(isinstance(v, (bool, int, float, str)) and (not isinstance(v, str) or len(v) <= 200)
                    for v in options.values())):
        raise CorruptFileError(f"{where} records model options {_short(options)}, expected a mapping of option "
                               f"names to plain numbers, booleans or short strings. {_FIX}")
    if model_name is not None:
        if model_name != name:
            raise HeadError(f"{where} was extracted with model {name!r}, but model_name={model_name!r} was given; "
                            f"pass the same model (CLI: --model {name}).")
    elif name not in available_models():
        raise HeadError(f"{where} names the model {name!r}, which is not one unveil registers, and unveil does not "
                        f"import code named in a file; name it yourself: model_name={name!r} or model= "
                        f"(CLI: unveil fit --model {name}).")
    want_sha = src.get("weights_sha256")
    if want_sha is not None and not isinstance(want_sha, str):
        raise CorruptFileError(f"{where} records a weights sha256 of {_short(want_sha)}, expected a string. {_FIX}")
    if want_sha and weights is None:
        recorded = src.get("weights") if isinstance(src.get("weights"), str) else "?"
        raise HeadError(f"{where} was extracted with a weights file (recorded as {recorded!r}, sha256 "
                        f"{want_sha[:12]}...); unveil reads only weights you name: pass weights= (CLI: --weights).")
    if weights is not None:
        if not Path(weights).is_file():
            raise HeadError(f"the weights file {str(weights)!r} does not exist; pass the file the store was "
                            f"extracted with.")
        if not want_sha:
            raise HeadError(f"{where} was extracted without a weights file, but weights={str(weights)!r} was given; "
                            f"drop it (or pass model=).")
        if sha256_file(weights) != want_sha:
            raise HeadError(f"the weights file {str(weights)!r} is not the one the store was extracted with (sha256 "
                            f"differs); pass that file, or extract again.")
    model, _, _ = load_model(name, weights=weights, **options)
    return model
