"""Image folders and per-model preprocessing (PIL + torch; no torchvision).

A folder is scanned recursively for ``.jpg .jpeg .png .webp .bmp`` files. When every image lies
inside a first-level sub-folder, those sub-folders are the classes (``labels`` = index into the
sorted ``class_names``); otherwise there are no labels. Grayscale, palette, RGBA, CMYK, ... images
are converted to RGB. Files that are not images, or that cannot be decoded, are skipped and
reported (never a crash); hidden files and folders (name starting with ``.``) are ignored. So are
files whose name is not valid UTF-8 or that cannot be read, and images of more than
:data:`MAX_IMAGE_PIXELS` pixels (decompression bombs): each is skipped with its reason.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._errors import ValidationError

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "Preprocessing", "ImageFolder", "scan_images", "load_image",
           "load_batch", "open_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Largest image (width x height) unveil decodes; PIL's own default. A larger one is refused before
#: its pixels are decoded (a tiny file can claim a huge size: a "decompression bomb").
MAX_IMAGE_PIXELS = 89_478_485
logger = logging.getLogger("unveil")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize``, centre-crop ``size × size``, scale to [0, 1], normalise.

    Parameters
    ----------
    size : int
        Side of the square centre crop (the network's input size).
    resize : int
        The shorter side is resized to this before cropping (bilinear, antialiased).
    mean, std : 3-tuples
        Per-channel normalisation ``(x - mean) / std`` of the [0, 1] image.

    Examples
    --------
    >>> Preprocessing.imagenet(224).resize
    256
    """

    size: int = 224
    resize: int = 256
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        for name in ("size", "resize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValidationError(f"preprocessing {name} must be a positive integer, got {v!r}.")
        if self.resize < self.size:
            raise ValidationError(f"preprocessing resize ({self.resize}) must be >= the crop size ({self.size}).")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3:
                raise ValidationError(f"preprocessing {name} must have 3 values (R, G, B), got {v!r}.")
            object.__setattr__(self, name, v)
        if min(self.std) <= 0:
            raise ValidationError(f"preprocessing std must be > 0, got {self.std!r}.")

    @classmethod
    def imagenet(cls, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> "Preprocessing":
        """The usual ImageNet evaluation transform: resize to ``size·256/224``, crop ``size``."""
        return cls(size=int(size), resize=int(round(size * 256 / 224)), mean=tuple(mean), std=tuple(std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=int(d["size"]), resize=int(d["resize"]), mean=tuple(d["mean"]), std=tuple(d["std"]))

    def __call__(self, img) -> torch.Tensor:
        """PIL image -> normalised float32 tensor (3, size, size)."""
        from PIL import Image
        img = _to_rgb(img)
        w, h = img.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        if nw * nh > max(MAX_IMAGE_PIXELS, w * h):
            raise ValidationError(f"an image of {w} x {h} pixels would be resized to {nw} x {nh} before the "
                                  f"centre crop, more than the limit of {MAX_IMAGE_PIXELS} pixels (unveil.data."
                                  f"images.MAX_IMAGE_PIXELS); crop the image to a less extreme aspect ratio.")
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return ((t - mean) / std).contiguous()


def _to_rgb(img):
    from PIL import ImageOps
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        pass
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        from PIL import Image
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


@contextlib.contextmanager
def open_image(path):
    """``PIL.Image.open(path)`` that refuses decompression bombs before decoding any pixel.

    Raises :class:`ValidationError` for an image of more than :data:`MAX_IMAGE_PIXELS` pixels (also
    when PIL's own limit, ``PIL.Image.MAX_IMAGE_PIXELS``, is lower and fires first), ``OSError`` /
    ``ValueError`` when the file is not a readable image. PIL's global settings are not changed.
    """
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PIL's "palette images with transparency" notice
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValidationError(f"image {str(path)!r} is too large to decode ({exc}); images up to "
                                  f"{MAX_IMAGE_PIXELS} pixels are read. Resize it first.") from None
        with img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValidationError(f"image {str(path)!r} claims {w} x {h} = {w * h} pixels, more than the limit "
                                      f"of {MAX_IMAGE_PIXELS} (unveil.data.images.MAX_IMAGE_PIXELS), so it is not "
                                      f"decoded (a decompression bomb?); resize it first.")
            yield img


def load_image(path, preprocessing: Preprocessing) -> torch.Tensor:
    """Decode ``path`` and preprocess it.

    Raises ``OSError``/``ValueError`` if it is not a readable image, :class:`ValidationError` (a
    ``ValueError``) if it has more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    with open_image(path) as img:
        img.load()
        return preprocessing(img)


@dataclass
class ImageFolder:
    """The images of a folder, in a fixed (sorted) order, with optional class labels.

    Attributes
    ----------
    root : Path
    files : list of str
        Paths relative to ``root`` (POSIX separators); also the image ids.
    labels : list of int or None
        Class index of each file (first-level sub-folder), or None without class folders.
    class_names : list of str or None
    skipped : list of dict
        ``{"path", "reason"}`` for files that are not images (more are added when decoding fails).
    """

    root: Path
    files: List[str]
    labels: Optional[List[int]]
    class_names: Optional[List[str]]
    skipped: List[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, content sha256) of every candidate image, in order.

        A file that cannot be read (removed or made unreadable since the scan) enters as its path and
        the error's name, so the fingerprint still changes when it does; loading it skips it later.
        """
        h = hashlib.sha256()
        for rel in self.files:
            p = self.root / rel
            fh = hashlib.sha256()
            try:
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        fh.update(chunk)
                    size = os.fstat(f.fileno()).st_size
                entry = f"{size}\0{fh.hexdigest()}"
            except OSError as exc:
                entry = f"unreadable\0{type(exc).__name__}"
            h.update(f"{rel}\0{entry}\n".encode("utf-8", "backslashreplace"))
        return h.hexdigest()


def scan_images(root) -> ImageFolder:
    """Scan ``root`` recursively for images (see the module docstring for the rules).

    Raises
    ------
    ValidationError
        If ``root`` is not a folder or holds no file with an image extension.

    Examples
    --------
    >>> folder = scan_images("images/")            # doctest: +SKIP
    >>> folder.class_names, len(folder)            # doctest: +SKIP
    (['cat', 'dog'], 200)
    """
    root = Path(root)
    if not root.is_dir():
        raise ValidationError(f"image folder {str(root)!r} does not exist or is not a folder; "
                              f"pass a folder of .jpg/.jpeg/.png/.webp/.bmp images (class sub-folders optional).")
    files, skipped = [], []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        try:
            if not p.is_file():
                continue
        except OSError:  # e.g. a name too long for the file system, a symlink loop
            continue
        name = rel.as_posix()
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes (surrogate escapes): json and ids need real text
            skipped.append({"path": os.fsencode(name).decode("utf-8", "backslashreplace"),
                            "reason": "file name is not valid UTF-8; rename the file"})
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": name, "reason": f"not an image file (extension {p.suffix or 'none'!r})"})
        elif not os.access(p, os.R_OK):
            skipped.append({"path": name, "reason": "file cannot be read (permission denied)"})
        else:
            files.append(name)
    if not files:
        extra = f" ({len(skipped)} other files were skipped)" if skipped else ""
        raise ValidationError(f"no images found in {str(root)!r}{extra}: expected files ending in "
                              f"{', '.join(IMAGE_EXTENSIONS)} (searched recursively). Point to a folder of images.")
    labels = class_names = None
    if all("/" in f for f in files):
        class_names = sorted({f.split("/", 1)[0] for f in files})
        index = {c: i for i, c in enumerate(class_names)}
        labels = [index[f.split("/", 1)[0]] for f in files]
    elif any("/" in f for f in files):
        logger.warning("images in %s lie both at the top level and in sub-folders; ignoring the sub-folders "
                       "as classes (no labels)", root)
    return ImageFolder(root=root, files=files, labels=labels, class_names=class_names, skipped=skipped)


def load_batch(folder: ImageFolder, indices: Sequence[int], preprocessing: Preprocessing):
    """Decode the images ``indices`` of ``folder``.

    Returns ``(tensor (B, 3, S, S), kept indices, skipped [{"path", "reason"}])``; undecodable or
    unreadable files and images over :data:`MAX_IMAGE_PIXELS` are skipped, never raised.
    """
    tensors, kept, skipped = [], [], []
    for i in indices:
        rel = folder.files[i]
        try:
            tensors.append(load_image(folder.root / rel, preprocessing))
            kept.append(i)
            continue
        except ValidationError as exc:  # too large: a decompression bomb or an extreme aspect ratio
            reason = f"not decoded: {str(exc)[:300]}"
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "corrupt image"
            reason = f"cannot be decoded as an image ({type(exc).__name__}: {str(exc)[:200]})"
        logger.info("skipping %s: %s", rel, reason)
        skipped.append({"path": rel, "reason": reason})
    batch = torch.stack(tensors) if tensors else torch.empty(0, 3, preprocessing.size, preprocessing.size)
    return batch, kept, skipped
