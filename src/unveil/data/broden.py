"""Read and write the Broden data set layout (Bau et al., NetDissect).

Layout of a Broden folder::

    index.csv       image,split,ih,iw,sh,sw,<one column per category>
                    each category cell: ';'-separated entries, either a label PNG path (relative to
                    images/) or a label number that applies to the whole image (Broden's scene and
                    texture columns); an empty cell means "nothing of this category"
    label.csv       number,name,category,frequency,coverage,syns
                    number: global label number (>= 1; 0 means "no label");
                    category: "color(123);object(4)" = the categories the label occurs in (image counts)
    category.csv    name,first,last,count,frequency
    c_<cat>.csv     code,number,name,frequency,coverage  (category-local code -> global number)
    images/         the images and the label PNGs; a PNG pixel holds label number R + 256 * G

:func:`export_broden` writes a data set that follows the unveil data protocol (for example
:class:`~unveil.data.world.ConceptWorld`) in this layout; the class label becomes the whole-image
``scene`` label; the folder is built beside its destination and renamed into place, and it carries a
marker file (``.unveil-broden.json``) so a later export knows it may replace it. :class:`BrodenDataset`
reads any Broden-format folder and offers the same protocol
as ``ConceptWorld`` (``ds[i] -> WorldSample(image, masks (C,H,W) bool, label)``), so the same
dissection code runs on both.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .._errors import CorruptFileError, OutputExistsError, ValidationError
from .._io import atomic_write_bytes, versions
from .._validation import check_index, check_positive_int
from .world import Concept, WorldSample

__all__ = ["export_broden", "BrodenDataset", "SkippedFile", "encode_label_png", "decode_label_png"]

logger = logging.getLogger("unveil")

_META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
_MAX_WARNINGS = 10
MARKER = ".unveil-broden.json"  # written by export_broden: "this folder is ours to replace"
_MARKER_FORMAT = "unveil.broden-export"
_TOP_LEVEL = {"index.csv", "label.csv", "category.csv", "images", MARKER}


class SkippedFile(NamedTuple):
    """A label file that could not be used: its category's masks are empty for that image."""

    index: int
    category: str
    path: str
    reason: str


def encode_label_png(labels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) array of label numbers (R = n % 256, G = n // 256, B = 0)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) >= 65536:
        raise ValidationError(f"label map must be 2-D with numbers in [0, 65535], got shape {labels.shape}.")
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_label_png(path) -> np.ndarray:
    """Label numbers (H, W) int32 of a Broden label PNG (R + 256 * G).

    Raises ``OSError``/``ValueError`` for an unreadable file (a ``ValidationError`` for one of more than
    :data:`unveil.data.images.MAX_IMAGE_PIXELS` pixels).
    """
    from .images import open_image
    with open_image(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"), dtype=np.int32)
    return arr[..., 0] + 256 * arr[..., 1]


def _csv_bytes(header: Sequence[str], rows) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    return buf.getvalue().encode()


def export_broden(ds, out_dir, indices=None, split: Optional[str] = None, image_folder: str = "world",
                  progress: bool = False, overwrite: bool = False) -> Path:
    """Write ``ds`` (any data set following the protocol) in Broden's layout under ``out_dir``.

    Parameters
    ----------
    ds : data set with ``concepts``, ``class_names``, ``__len__`` and ``ds[i] -> (image, masks, label)``.
    out_dir : folder to create. It may exist if it is empty, or if it holds an earlier export by this
        function (and nothing else) and ``overwrite=True``; any other content is never touched
        (:class:`~unveil.OutputExistsError`).
    indices : images to export (default all).
    split : the ``split`` column (default ``ds.split`` or ``"train"``).
    image_folder : sub-folder of ``images/`` for the files.
    overwrite : replace an earlier export in ``out_dir``.

    Images are written as PNG (lossless, so an exported image reads back identical). Each mask
    category gets one label PNG per image (more when a pixel has several labels of one category);
    the class label becomes the whole-image ``scene`` label. Everything is written into a hidden
    temporary folder beside ``out_dir`` that is renamed into place only when complete (swapped with an
    earlier export in one step where the system allows it): an interrupted or failed export leaves
    the earlier export, or no folder, never a half-written one.

    Examples
    --------
    >>> from unveil.data.world import ConceptWorld
    >>> export_broden(ConceptWorld(4), "/tmp/broden_world")  # doctest: +SKIP
    """
    out = Path(os.path.abspath(out_dir))
    if out.name in ("", ".", ".."):
        raise ValidationError(f"out_dir {str(out_dir)!r} names no folder; pass a folder path such as 'broden_world'.")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", image_folder):
        raise ValidationError(f"image_folder must be a simple folder name, got {image_folder!r}.")
    _check_export_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-tmp", dir=out.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
        n_rows, n_labels, n_cats = _write_export(ds, stage, indices, split, image_folder, progress)
        atomic_write_bytes(stage / MARKER, (json.dumps(
            {"format": _MARKER_FORMAT, "format_version": 1, "image_folder": image_folder, "n_images": n_rows,
             "versions": versions()}, indent=2, sort_keys=True) + "\n").encode())
        existed = _check_export_target(out, overwrite)  # again: the folder may have changed meanwhile
        if existed and _exchange(stage, out):
            shutil.rmtree(stage, ignore_errors=True)  # now the earlier export (checked to hold only ours)
        elif existed:
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(out, old)
            try:
                os.rename(stage, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(stage, out)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise OutputExistsError(f"out_dir {str(out)!r} was created by someone else during the export; "
                                        f"it is left alone. Choose another folder.") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    logger.info("exported %d images with %d labels in %d categories to %s", n_rows, n_labels, n_cats, out)
    return Path(out_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_marker(folder: Path) -> Optional[dict]:
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == _MARKER_FORMAT else None


def _foreign_entries(folder: Path, image_folder: str) -> List[str]:
    """Entries of ``folder`` that an export with ``image_folder`` does not write (relative paths)."""
    foreign = []
    with os.scandir(folder) as it:
        top = list(it)
    for e in top:
        ok = (e.name in _TOP_LEVEL or re.fullmatch(r"c_[^/\\]+\.csv", e.name)) and not e.is_symlink()
        if ok and e.name == "images":
            ok = e.is_dir(follow_symlinks=False)
        elif ok:
            ok = e.is_file(follow_symlinks=False)
        if not ok:
            foreign.append(e.name)
    images = folder / "images"
    if images.is_dir() and not images.is_symlink():
        with os.scandir(images) as it:
            subs = list(it)
        for e in subs:
            if e.name != image_folder or not e.is_dir(follow_symlinks=False):
                foreign.append(f"images/{e.name}")
                continue
            with os.scandir(e.path) as it:
                files = list(it)
            for f in files:
                if not (f.is_file(follow_symlinks=False) and re.fullmatch(r"\d{6,}(_[^/\\]+)?\.png", f.name)):
                    foreign.append(f"images/{e.name}/{f.name}")
    return sorted(foreign)


def _check_export_target(out: Path, overwrite: bool) -> bool:
    """Refuse an ``out`` that holds anything but an earlier export (that only with ``overwrite``);
    returns whether ``out`` exists (empty, or an export to replace)."""
    if out.is_symlink():
        raise OutputExistsError(f"out_dir {str(out)!r} is a symbolic link; pass the folder it points to, or a "
                                f"new folder path.")
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputExistsError(f"out_dir {str(out)!r} exists and is not a folder; pass a folder path.")
    try:
        entries = sorted(os.listdir(out))
    except OSError as exc:
        raise OutputExistsError(f"out_dir {str(out)!r} cannot be listed ({exc.strerror}); choose another "
                                f"folder.") from None
    if not entries:
        return True
    marker = _read_marker(out)
    if marker is None:
        raise OutputExistsError(f"out_dir {str(out)!r} is not empty ({len(entries)} entries, e.g. {entries[:3]}) "
                                f"and is not a Broden export written by unveil (no valid {MARKER}); its files are "
                                f"left alone. Choose a new or empty folder.")
    if not overwrite:
        raise OutputExistsError(f"out_dir {str(out)!r} already holds a Broden export; pass overwrite=True "
                                f"(CLI: --overwrite) to replace it, or choose another folder.")
    foreign = _foreign_entries(out, str(marker.get("image_folder", "")))
    if foreign:
        raise OutputExistsError(f"out_dir {str(out)!r} holds an earlier export but also {len(foreign)} file(s) "
                                f"unveil did not write (e.g. {foreign[:3]}); nothing is replaced. Move them out, "
                                f"or choose another folder.")
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or file system cannot, so the caller falls back to two renames.
    """
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except Exception:  # noqa: BLE001 - no such call here (not Linux, old libc, no ctypes)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _label_numbers(concepts: List[Concept], class_names: List[str]):
    """Broden's global label numbers: one per distinct concept name, then the scene labels. Returns
    ``(names: name -> number, cats: category -> channels, scene_numbers)``; categories must be
    usable in file names."""
    names: "OrderedDict[str, int]" = OrderedDict()
    for c in concepts:
        names.setdefault(c.name, len(names) + 1)
    cats: "OrderedDict[str, List[int]]" = OrderedDict()
    for ch, c in enumerate(concepts):
        cats.setdefault(c.category, []).append(ch)
    for cat in cats:  # categories become file names (c_<cat>.csv, <image>_<cat>.png)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\- ]*", str(cat)):
            raise ValidationError(f"concept category {cat!r} cannot be exported: Broden uses it in file names, so "
                                  f"it must be letters, digits, '_', '-' or spaces. Rename the category.")
    if class_names and "scene" in cats:
        raise ValidationError("a concept category is named 'scene', which Broden reserves for the class labels; "
                              "rename the category.")
    scene_numbers = []
    for cname in class_names:
        nm = cname if cname not in names else f"{cname}-s"
        names[nm] = len(names) + 1
        scene_numbers.append(names[nm])
    return names, cats, scene_numbers


def _category_layers(masks: np.ndarray, chans: List[int], numbers: List[int], freq, cover) -> List[np.ndarray]:
    """One category's label layers of an image: each pixel holds the number of a concept present there;
    where concepts overlap, the later ones go to further layers. Counts each present concept into
    ``freq`` / ``cover`` (images, mean coverage)."""
    layers: List[np.ndarray] = []
    for ch, number in zip(chans, numbers):
        m = masks[ch]
        if not m.any():
            continue
        freq[number] += 1
        cover[number] += m.mean()
        for layer in layers:
            free = m & (layer == 0)
            layer[free] = number
            m = m & ~free
            if not m.any():
                break
        if m.any():
            layers.append(np.where(m, number, 0).astype(np.int32))
    return layers


def _write_export(ds, folder: Path, indices, split, image_folder: str, progress: bool) -> Tuple[int, int, int]:
    """The export itself, into the (new, empty) ``folder``; returns (images, labels, categories)."""
    from .._progress import progress as _progress

    concepts: List[Concept] = list(ds.concepts)
    class_names: List[str] = list(getattr(ds, "class_names", []) or [])
    split = split if split is not None else str(getattr(ds, "split", "train") or "train")
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
        raise ValidationError(f"indices must lie in [0, {len(ds)}) for this data set of {len(ds)} images, got "
                              f"values from {int(idx.min())} to {int(idx.max())}.")
    names, cats, scene_numbers = _label_numbers(concepts, class_names)
    n_labels = len(names)
    freq = {cat: np.zeros(n_labels + 1) for cat in list(cats) + ["scene"]}
    cover = {cat: np.zeros(n_labels + 1) for cat in list(cats) + ["scene"]}
    cat_images = {cat: 0 for cat in list(cats) + ["scene"]}
    rows = []
    for i in _progress(idx, enabled=progress, desc="exporting"):
        s = ds[int(i)]
        image, masks, label = s[0], np.asarray(s[1], dtype=bool), int(s[2])
        h, w = image.shape[:2]
        if masks.shape[1:] != (h, w):
            raise ValidationError(f"image {int(i)} has size {(h, w)} but masks {masks.shape[1:]}; "
                                  f"export needs masks at the image resolution.")
        stem = f"{image_folder}/{int(i):06d}"
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG")
        atomic_write_bytes(folder / "images" / f"{stem}.png", buf.getvalue())
        row = [f"{stem}.png", split, h, w, h, w]
        for cat, chans in cats.items():
            layers = _category_layers(masks, chans, [names[concepts[ch].name] for ch in chans], freq[cat], cover[cat])
            files = []
            for k, layer in enumerate(layers):
                fn = f"{stem}_{cat}.png" if k == 0 else f"{stem}_{cat}_{k}.png"
                atomic_write_bytes(folder / "images" / fn, encode_label_png(layer))
                files.append(fn)
            cat_images[cat] += bool(files)
            row.append(";".join(files))
        if class_names:
            if 0 <= label < len(class_names):
                number = scene_numbers[label]
                freq["scene"][number] += 1
                cover["scene"][number] += 1.0
                cat_images["scene"] += 1
                row.append(str(number))
            else:
                row.append("")
        rows.append(row)
    all_cats = list(cats) + (["scene"] if class_names else [])
    _write_tables(folder, names, {cat: [names[concepts[ch].name] for ch in chans] for cat, chans in cats.items()},
                  scene_numbers, all_cats, freq, cover, cat_images)
    atomic_write_bytes(folder / "index.csv", _csv_bytes(list(_META_COLUMNS) + all_cats, rows))
    return len(rows), n_labels, len(all_cats)


def _write_tables(folder: Path, names, cat_numbers: Dict[str, List[int]], scene_numbers: List[int],
                  all_cats: List[str], freq, cover, cat_images) -> None:
    """``label.csv``, one ``c_<category>.csv`` per category and ``category.csv``."""
    label_rows = []
    number_cats: Dict[int, List[str]] = {}  # per label: the categories it occurs in
    for cat, numbers in cat_numbers.items():
        for n in numbers:
            number_cats.setdefault(n, []).append(cat)
    for n in scene_numbers:
        number_cats.setdefault(n, []).append("scene")
    for name, number in names.items():
        cs = number_cats.get(number, [])
        label_rows.append([number, name, ";".join(f"{c}({int(freq[c][number])})" for c in cs),
                           int(sum(freq[c][number] for c in cs)),
                           f"{sum(cover[c][number] for c in cs):.6f}", ""])
    atomic_write_bytes(folder / "label.csv", _csv_bytes(["number", "name", "category", "frequency", "coverage", "syns"],
                                                     label_rows))
    cat_rows = []
    for cat in all_cats:
        numbers = list(OrderedDict.fromkeys(cat_numbers[cat] if cat != "scene" else scene_numbers))
        atomic_write_bytes(folder / f"c_{cat}.csv", _csv_bytes(
            ["code", "number", "name", "frequency", "coverage"],
            [[code, n, list(names)[n - 1], int(freq[cat][n]), f"{cover[cat][n]:.6f}"]
             for code, n in enumerate(numbers, start=1)]))
        cat_rows.append([cat, min(numbers), max(numbers), len(numbers), cat_images[cat]])
    atomic_write_bytes(folder / "category.csv", _csv_bytes(["name", "first", "last", "count", "frequency"], cat_rows))


def _unsafe_relpath(rel: str) -> Optional[str]:
    """Why ``rel`` is not a plain relative POSIX path without ``..`` (None when it is)."""
    if "\0" in rel:
        return "holds a NUL character"
    if "\\" in rel:
        return "holds a backslash (Broden paths use '/')"
    if rel.startswith("/") or re.match(r"[A-Za-z]:", rel):
        return "is absolute"
    if ".." in rel.split("/"):
        return "holds '..'"
    return None


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _read_csv(path: Path, required: Sequence[str]) -> Tuple[List[str], List[dict]]:
    if not path.is_file():
        raise CorruptFileError(f"{str(path)!r} is missing: a Broden folder needs index.csv, label.csv and "
                               f"category.csv; pass the folder that holds them.")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CorruptFileError(f"{str(path)!r} cannot be read as CSV ({exc}); the file is corrupt.") from None
    missing = [c for c in required if c not in fields]
    if missing:
        raise CorruptFileError(f"{str(path)!r} lacks the column(s) {missing}; expected a header with "
                               f"{list(required)}, got {fields}. The file is corrupt or not in Broden format.")
    return fields, rows


class BrodenDataset:
    """A Broden-format folder with the unveil data protocol.

    Parameters
    ----------
    root : folder holding ``index.csv``, ``label.csv``, ``category.csv``, ``c_<category>.csv`` and ``images/``.
    categories : mask categories to load (default: every category column of index.csv except ``scene``).
        ``scene`` gives the class labels (``label``, ``class_names``); list it to get scene masks too.
    image_size : int or None
        Resize images (bilinear) and masks (nearest) to ``image_size`` x ``image_size``. Without it,
        images keep their size and masks are brought to the image size (nearest) when Broden stores
        them at another resolution (``sh, sw`` != ``ih, iw``).
    split : keep only rows of this ``split`` (default all).

    A label PNG that is missing (found at construction) or unreadable (found when its image is
    loaded) is skipped: its category's masks are empty for that image, it is listed in
    ``ds.skipped`` (:class:`SkippedFile`) and a warning is logged. A broken ``index.csv``,
    ``label.csv`` or ``category.csv`` raises :class:`~unveil.CorruptFileError` naming the file.

    Every file path of ``index.csv`` must be relative, use ``/``, hold no ``..`` and stay inside
    ``images/`` also through symbolic links (``images`` itself may be a link to the real image
    folder); any other path raises :class:`~unveil.CorruptFileError` naming its line, and no file
    outside is opened. Images of more than :data:`unveil.data.images.MAX_IMAGE_PIXELS` pixels are
    not decoded.

    Examples
    --------
    >>> ds = BrodenDataset("/tmp/broden_world")  # doctest: +SKIP
    >>> s = ds[0]; s.masks.shape == (len(ds.concepts),) + s.image.shape[:2]  # doctest: +SKIP
    True
    """

    def __init__(self, root, categories: Optional[Sequence[str]] = None, image_size: Optional[int] = None,
                 split: Optional[str] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CorruptFileError(f"Broden folder {str(self.root)!r} does not exist; pass the folder holding "
                                   f"index.csv (for example one written by `unveil world export`).")
        self.image_size = None if image_size is None else check_positive_int(image_size, "image_size")
        index_path = self.root / "index.csv"
        fields, raw_rows = _read_csv(index_path, _META_COLUMNS)
        cat_columns = [c for c in fields if c not in _META_COLUMNS]
        for c in cat_columns:  # a category names the file c_<category>.csv
            if "/" in c or "\\" in c or "\0" in c:
                raise CorruptFileError(f"{str(index_path)!r} has a category column {c!r} that is not a plain name "
                                       f"(no '/', '\\'); the index is corrupt: export the data set again.")
        self._rows, self._lines = [], []
        for line, r in enumerate(raw_rows, start=2):
            try:
                row = {"image": r["image"], "split": r["split"]}
                if not row["image"]:
                    raise ValueError("empty image path")
                for k in ("ih", "iw", "sh", "sw"):
                    row[k] = int(r[k])
                    if row[k] <= 0:
                        raise ValueError(f"{k} = {row[k]} is not positive")
                for c in cat_columns:
                    val = r.get(c)
                    if val is None:
                        raise ValueError(f"column {c!r} is missing on this line")
                    row[c] = [int(v) if re.fullmatch(r"\d+", v) else v for v in val.split(";") if v]
            except (TypeError, ValueError, KeyError) as exc:
                raise CorruptFileError(f"{str(index_path)!r} line {line} is malformed ({exc}); expected "
                                       f"image,split,ih,iw,sh,sw and ';'-separated category cells. The "
                                       f"index is corrupt: export the data set again.") from None
            if split is None or row["split"] == split:
                self._rows.append(row)
                self._lines.append(line)
        if not self._rows:
            raise CorruptFileError(f"{str(index_path)!r} lists no images"
                                   f"{'' if split is None else f' of split {split!r}'}; expected at least one row.")
        _, label_rows = _read_csv(self.root / "label.csv", ("number", "name"))
        self._label_names: Dict[int, str] = {}
        for line, r in enumerate(label_rows, start=2):
            try:
                self._label_names[int(r["number"])] = r["name"]
            except (TypeError, ValueError):
                raise CorruptFileError(f"{str(self.root / 'label.csv')!r} line {line} has a non-integer label "
                                       f"number {r.get('number')!r}; the file is corrupt.") from None
        _, cat_rows = _read_csv(self.root / "category.csv", ("name",))
        known_cats = [r["name"] for r in cat_rows]

        if categories is None:
            categories = [c for c in cat_columns if c != "scene"]
        else:
            categories = list(categories)
            bad = [c for c in categories if c not in cat_columns]
            if bad:
                raise ValidationError(f"categories {bad} are not columns of {str(index_path)!r}; "
                                      f"available: {cat_columns}.")
        self._mask_categories = categories
        # per category: ordered label numbers (c_<cat>.csv, or label.csv's category field)
        self._cat_numbers: Dict[str, List[int]] = {}
        for cat in set(categories) | ({"scene"} if "scene" in cat_columns else set()):
            self._cat_numbers[cat] = self._category_numbers(cat, label_rows, known_cats)
        self._concepts: List[Concept] = []
        self._channel: Dict[str, Dict[int, int]] = {}
        for cat in categories:
            self._channel[cat] = {}
            for n in self._cat_numbers[cat]:
                self._channel[cat][n] = len(self._concepts)
                self._concepts.append(Concept(self._label_names.get(n, str(n)), cat))
        if "scene" in cat_columns:
            scene = self._cat_numbers["scene"]
            self._class_names = [self._label_names.get(n, str(n)) for n in scene]
            pos = {n: k for k, n in enumerate(scene)}
            self.labels = np.array([next((pos[v] for v in row["scene"] if isinstance(v, int) and v in pos), -1)
                                    for row in self._rows], dtype=np.int64)
        else:
            self._class_names = []
            self.labels = np.full(len(self._rows), -1, dtype=np.int64)
        self.labels.setflags(write=False)

        self.skipped: List[SkippedFile] = []
        self._bad_files = set()
        self._images = self.root / "images"
        self._images_real = os.path.realpath(self._images)
        self._dir_inside: Dict[str, bool] = {}
        for i, row in enumerate(self._rows):
            self._checked_path(i, row["image"], "image")
            for cat in categories:
                for v in row[cat]:
                    if isinstance(v, str) and not self._checked_path(i, v, cat).is_file():
                        self._skip(i, cat, v, "file is missing")

    # -- helpers --------------------------------------------------------------------------------
    def _checked_path(self, i: int, rel: str, column: str) -> Path:
        """``images/rel`` after checking that it stays inside ``images/`` (else CorruptFileError)."""
        why = _unsafe_relpath(rel)
        if why is None and self._leaves_images(rel):
            why = "leads outside the images folder through a symbolic link"
        if why is not None:
            raise CorruptFileError(
                f"{str(self.root / 'index.csv')!r} line {self._lines[i]}: the {column} path {rel!r} {why}; expected "
                f"a relative path inside {str(self._images)!r}. The file was not opened: the index is corrupt or "
                f"crafted, export the data set again.")
        return self._images / rel

    def _leaves_images(self, rel: str) -> bool:
        """Whether ``images/rel`` resolves outside ``images/`` (``rel`` holds no ``..``; the verdict on each
        folder is cached, the file itself is checked every time)."""
        parent = rel.rpartition("/")[0]
        inside = self._dir_inside.get(parent)
        if inside is None:
            inside = _within(os.path.realpath(self._images / parent), self._images_real)
            self._dir_inside[parent] = inside
        if not inside:
            return True
        path = self._images / rel
        return path.is_symlink() and not _within(os.path.realpath(path), self._images_real)

    def _category_numbers(self, cat, label_rows, known_cats) -> List[int]:
        cpath = self.root / f"c_{cat}.csv"
        if cpath.is_file():
            _, rows = _read_csv(cpath, ("code", "number"))
            try:
                pairs = sorted((int(r["code"]), int(r["number"])) for r in rows)
            except (TypeError, ValueError):
                raise CorruptFileError(f"{str(cpath)!r} has non-integer code/number entries; the file is corrupt.") from None
            return [n for code, n in pairs if n > 0]
        if cat not in known_cats:
            logger.warning("category %r is not listed in category.csv of %s", cat, self.root)
        out = []
        for r in label_rows:
            field = r.get("category") or ""
            if any(re.match(rf"^{re.escape(cat)}(\(|$)", f) for f in field.split(";")):
                out.append(int(r["number"]))
        return out

    def _skip(self, i: int, cat: str, path: str, reason: str) -> None:
        if (i, path) in self._bad_files:
            return
        self._bad_files.add((i, path))
        self.skipped.append(SkippedFile(i, cat, str(self.root / "images" / path), reason))
        if len(self.skipped) <= _MAX_WARNINGS:
            logger.warning("skipping label file %s (image %d, category %r): %s; its masks are left empty",
                           self.root / "images" / path, i, cat, reason)
        elif len(self.skipped) == _MAX_WARNINGS + 1:
            logger.warning("more label files skipped; see BrodenDataset.skipped for the full list")

    # -- protocol -------------------------------------------------------------------------------
    @property
    def concepts(self) -> List[Concept]:
        return list(self._concepts)

    @property
    def categories(self) -> List[str]:
        return list(self._mask_categories)

    @property
    def class_names(self) -> List[str]:
        return list(self._class_names)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"BrodenDataset({str(self.root)!r}, {len(self)} images, {len(self._concepts)} concepts, "
                f"categories={self._mask_categories})")

    def _index(self, i) -> int:
        return check_index(i, len(self), "BrodenDataset")

    def image_path(self, i) -> Path:
        return self.root / "images" / self._rows[self._index(i)]["image"]

    def __getitem__(self, i) -> WorldSample:
        i = self._index(i)
        from .images import open_image
        row = self._rows[i]
        path = self._checked_path(i, row["image"], "image")
        try:
            with open_image(path) as im:
                im.load()
                im = im.convert("RGB")
                if self.image_size is not None and im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
                image = np.asarray(im, dtype=np.uint8).copy()
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"image {str(path)!r} (row {i} of index.csv) cannot be read ({exc}); "
                                   f"restore the file or remove its row from index.csv.") from None
        h, w = image.shape[:2]
        masks = np.zeros((len(self._concepts), h, w), dtype=bool)
        for cat in self._mask_categories:
            chan = self._channel[cat]
            for v in row[cat]:
                if isinstance(v, int):
                    if v in chan:
                        masks[chan[v]] = True
                    continue
                if (i, v) in self._bad_files:
                    continue
                try:
                    lab = decode_label_png(self._checked_path(i, v, cat))
                except (OSError, ValueError, SyntaxError) as exc:
                    self._skip(i, cat, v, f"unreadable ({type(exc).__name__}: {exc})")
                    continue
                if lab.shape != (row["sh"], row["sw"]):
                    self._skip(i, cat, v, f"size {lab.shape[::-1]} differs from index.csv's {(row['sw'], row['sh'])}")
                    continue
                if lab.shape != (h, w):
                    lab = np.asarray(Image.fromarray(lab.astype(np.int32), "I").resize((w, h), Image.NEAREST))
                for n in np.unique(lab):
                    ch = chan.get(int(n))
                    if ch is not None:
                        masks[ch] |= lab == n
        return WorldSample(image=image, masks=masks, label=int(self.labels[i]))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def _indices(self, indices) -> np.ndarray:
        if indices is None:
            return np.arange(len(self))
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return np.array([self._index(int(i)) for i in idx.reshape(-1)], dtype=np.int64)

    def images_tensor(self, indices=None, progress: bool = False):
        """Images as a float32 torch tensor (N, 3, H, W) in [0, 1] (all images must share one size)."""
        import torch

        from .._progress import progress as _progress
        imgs = [self[int(i)].image for i in _progress(self._indices(indices), enabled=progress, desc="reading images")]
        sizes = {im.shape for im in imgs}
        if len(sizes) > 1:
            raise ValidationError(f"images have different sizes {sorted(sizes)[:4]}; pass image_size=... to "
                                  f"BrodenDataset to resize them to one size.")
        arr = np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return torch.from_numpy(np.ascontiguousarray(arr))

    def masks_array(self, indices=None, progress: bool = False) -> np.ndarray:
        """Masks as a bool array (N, C, H, W) (all images must share one size)."""
        from .._progress import progress as _progress
        ms = [self[int(i)].masks for i in _progress(self._indices(indices), enabled=progress, desc="reading masks")]
        if len({m.shape for m in ms}) > 1:
            raise ValidationError("masks have different sizes; pass image_size=... to BrodenDataset.")
        return np.stack(ms)
