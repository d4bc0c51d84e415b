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
``scene`` label. :class:`BrodenDataset` reads any Broden-format folder and offers the same protocol
as ``ConceptWorld`` (``ds[i] -> WorldSample(image, masks (C,H,W) bool, label)``), so the same
dissection code runs on both.
"""
from __future__ import annotations

import csv
import io
import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .._errors import CorruptFileError, ValidationError
from .._io import atomic_write_bytes
from .._validation import check_positive_int
from .world import Concept, WorldSample

__all__ = ["export_broden", "BrodenDataset", "SkippedFile", "encode_label_png", "decode_label_png"]

logger = logging.getLogger("unveil")

_META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
_MAX_WARNINGS = 10


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
    """Label numbers (H, W) int32 of a Broden label PNG (R + 256 * G)."""
    with Image.open(path) as im:
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
                  progress: bool = False) -> Path:
    """Write ``ds`` (any data set following the protocol) in Broden's layout under ``out_dir``.

    Parameters
    ----------
    ds : data set with ``concepts``, ``class_names``, ``__len__`` and ``ds[i] -> (image, masks, label)``.
    out_dir : folder to create (existing files of the same names are replaced).
    indices : images to export (default all).
    split : the ``split`` column (default ``ds.split`` or ``"train"``).
    image_folder : sub-folder of ``images/`` for the files.

    Images are written as PNG (lossless, so an exported image reads back identical). Each mask
    category gets one label PNG per image (more when a pixel has several labels of one category);
    the class label becomes the whole-image ``scene`` label. ``index.csv`` is written last, so an
    interrupted export has none and is not mistaken for a complete one.

    Examples
    --------
    >>> from unveil.data.world import ConceptWorld
    >>> export_broden(ConceptWorld(4), "/tmp/broden_world")  # doctest: +SKIP
    """
    from .._progress import progress as _progress

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValidationError(f"out_dir {str(out)!r} exists and is not a folder; pass a folder path.")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", image_folder):
        raise ValidationError(f"image_folder must be a simple folder name, got {image_folder!r}.")
    (out / "images" / image_folder).mkdir(parents=True, exist_ok=True)
    stale = out / "index.csv"
    if stale.exists():
        stale.unlink()
    concepts: List[Concept] = list(ds.concepts)
    class_names: List[str] = list(getattr(ds, "class_names", []) or [])
    split = split if split is not None else str(getattr(ds, "split", "train") or "train")
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)

    # global label numbers: one per distinct concept name, then the scene labels
    names: "OrderedDict[str, int]" = OrderedDict()
    for c in concepts:
        names.setdefault(c.name, len(names) + 1)
    cats: "OrderedDict[str, List[int]]" = OrderedDict()
    for ch, c in enumerate(concepts):
        cats.setdefault(c.category, []).append(ch)
    scene_numbers = []
    for cname in class_names:
        nm = cname if cname not in names else f"{cname}-s"
        names[nm] = len(names) + 1
        scene_numbers.append(names[nm])

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
        atomic_write_bytes(out / "images" / f"{stem}.png", buf.getvalue())
        row = [f"{stem}.png", split, h, w, h, w]
        for cat, chans in cats.items():
            layers: List[np.ndarray] = []
            for ch in chans:
                m = masks[ch]
                if not m.any():
                    continue
                number = names[concepts[ch].name]
                freq[cat][number] += 1
                cover[cat][number] += m.mean()
                for layer in layers:
                    free = m & (layer == 0)
                    layer[free] = number
                    m = m & ~free
                    if not m.any():
                        break
                if m.any():
                    layers.append(np.where(m, number, 0).astype(np.int32))
            files = []
            for k, layer in enumerate(layers):
                fn = f"{stem}_{cat}.png" if k == 0 else f"{stem}_{cat}_{k}.png"
                atomic_write_bytes(out / "images" / fn, encode_label_png(layer))
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
    # per label: categories it occurs in
    label_rows = []
    number_cats: Dict[int, List[str]] = {}
    for cat, chans in cats.items():
        for ch in chans:
            number_cats.setdefault(names[concepts[ch].name], []).append(cat)
    for n in scene_numbers:
        number_cats.setdefault(n, []).append("scene")
    for name, number in names.items():
        cs = number_cats.get(number, [])
        label_rows.append([number, name, ";".join(f"{c}({int(freq[c][number])})" for c in cs),
                           int(sum(freq[c][number] for c in cs)),
                           f"{sum(cover[c][number] for c in cs):.6f}", ""])
    atomic_write_bytes(out / "label.csv", _csv_bytes(["number", "name", "category", "frequency", "coverage", "syns"],
                                                     label_rows))
    cat_rows = []
    for cat in all_cats:
        numbers = ([names[concepts[ch].name] for ch in cats[cat]] if cat != "scene" else scene_numbers)
        numbers = list(OrderedDict.fromkeys(numbers))
        atomic_write_bytes(out / f"c_{cat}.csv", _csv_bytes(
            ["code", "number", "name", "frequency", "coverage"],
            [[code, n, list(names)[n - 1], int(freq[cat][n]), f"{cover[cat][n]:.6f}"]
             for code, n in enumerate(numbers, start=1)]))
        cat_rows.append([cat, min(numbers), max(numbers), len(numbers), cat_images[cat]])
    atomic_write_bytes(out / "category.csv", _csv_bytes(["name", "first", "last", "count", "frequency"], cat_rows))
    atomic_write_bytes(out / "index.csv", _csv_bytes(list(_META_COLUMNS) + all_cats, rows))
    logger.info("exported %d images with %d labels in %d categories to %s", len(rows), n_labels, len(all_cats), out)
    return out


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
        self._rows = []
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
        for i, row in enumerate(self._rows):
            for cat in categories:
                for v in row[cat]:
                    if isinstance(v, str) and not (self.root / "images" / v).is_file():
                        self._skip(i, cat, v, "file is missing")

    # -- helpers --------------------------------------------------------------------------------
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
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"BrodenDataset indices must be integers, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range for a BrodenDataset of {len(self)} images")
        return i

    def image_path(self, i) -> Path:
        return self.root / "images" / self._rows[self._index(i)]["image"]

    def __getitem__(self, i) -> WorldSample:
        i = self._index(i)
        row = self._rows[i]
        path = self.root / "images" / row["image"]
        try:
            with Image.open(path) as im:
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
                    lab = decode_label_png(self.root / "images" / v)
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
