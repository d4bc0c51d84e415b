"""A procedural, Broden-like concept world with exact per-pixel multi-label masks.

No concept-annotated image set (Broden, ADE20K) is available offline, so this module draws one:
small scenes (default 64 x 64 px) made of backgrounds, objects and composite objects with parts,
every surface painted with a colour, a texture or a material. Each pixel carries the labels of the
surface that is visible there (a later-drawn object removes the labels of what it covers), so the
masks are exact, also under occlusion.

Concept categories (as in Broden)
---------------------------------
``color``    the 11 Broden colour names (per pixel: every pixel has exactly one colour)
``texture``  striped, dotted, chequered, zigzagged, wavy (two-colour procedural patterns)
``material`` wood, metal, fabric (one-colour shaded procedural patterns)
``object``   sky, wall, grass, road, floor, tree, flower, house, car, ball, box, triangle, star,
             cross, ring (at most one object per pixel)
``part``     crown, trunk (tree); roof, facade, door, window (house); body, window, wheel (car)
``shortcut`` watermark (only when a :class:`WatermarkSpec` is given; always the last channel)

Scene classes are rules over concepts (see :data:`CLASS_RULES`): a class needs its ground and two
key objects; every ground and every key object occurs in at least two classes, key objects of
other classes are added as distractors whenever they do not complete another class's rule, and
neutral shapes (triangle, star, cross, ring) are added to every image. No single concept decides
the class.

Dataset protocol (consumed by the dissection code; :class:`unveil.data.broden.BrodenDataset`
implements the same)::

    ds = ConceptWorld(n_images=..., split="train"|"val"|"test"|"poisoned_test", seed=0,
                      image_size=64, watermark=None|WatermarkSpec(...))
    len(ds); ds[i] -> WorldSample(image uint8 (H,W,3), masks bool (C,H,W), label int)
    ds.concepts -> list of Concept(name, category)      # index = mask channel
    ds.categories -> list of str; ds.class_names -> list of str
    ds.images_tensor(indices=None) -> float32 (N,3,H,W) in [0,1]; ds.labels -> int64 (N,)

Everything is generated on the fly from ``(seed, split, index)``; nothing is cached on disk.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .._errors import ValidationError
from .._validation import check_in_range, check_index, check_positive_int

__all__ = ["Concept", "WorldSample", "WatermarkSpec", "ConceptWorld", "COLOR_NAMES", "TEXTURE_NAMES",
           "MATERIAL_NAMES", "OBJECT_NAMES", "PART_NAMES", "CLASS_RULES", "CATEGORIES", "SPLITS",
           "concept_statistics", "rule_satisfied", "plot_sample", "plot_samples"]

logger = logging.getLogger("unveil")

# --------------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------------
COLOR_NAMES = ("black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow")
_COLOR_RGB = np.array([
    (22, 22, 22),     # black
    (40, 80, 215),    # blue
    (125, 75, 35),    # brown
    (45, 165, 55),    # green
    (128, 128, 128),  # grey
    (245, 140, 20),   # orange
    (245, 150, 195),  # pink
    (125, 40, 165),   # purple
    (215, 30, 35),    # red
    (240, 240, 240),  # white
    (240, 220, 40),   # yellow
], dtype=np.float32)
TEXTURE_NAMES = ("striped", "dotted", "chequered", "zigzagged", "wavy")
MATERIAL_NAMES = ("wood", "metal", "fabric")
OBJECT_NAMES = ("sky", "wall", "grass", "road", "floor", "tree", "flower", "house", "car", "ball", "box",
                "triangle", "star", "cross", "ring")
PART_NAMES = ("crown", "trunk", "roof", "facade", "door", "window", "body", "wheel")
CATEGORIES = ("color", "texture", "material", "object", "part")
SPLITS = {"train": 0, "val": 1, "test": 2, "poisoned_test": 2}

#: class name -> (ground, key object, key object). An image of the class shows its ground and both
#: key objects, and no other class's rule holds on it.
CLASS_RULES: Tuple[Tuple[str, str, Tuple[str, str]], ...] = (
    ("garden", "grass", ("tree", "flower")),
    ("park", "grass", ("tree", "ball")),
    ("village", "grass", ("house", "flower")),
    ("street", "road", ("house", "car")),
    ("parking", "road", ("car", "box")),
    ("playroom", "floor", ("ball", "box")),
    ("living_room", "floor", ("flower", "box")),
)
_KEY_OBJECTS = ("tree", "flower", "house", "car", "ball", "box")
_NEUTRAL_SHAPES = ("triangle", "star", "cross", "ring")


class Concept(NamedTuple):
    """One mask channel: a concept ``name`` in a ``category`` (``color``, ``texture``, ...)."""

    name: str
    category: str


class WorldSample(NamedTuple):
    """One image of a concept data set.

    Attributes
    ----------
    image : uint8 array (H, W, 3).
    masks : bool array (C, H, W); channel c is ``ds.concepts[c]``.
    label : int class index into ``ds.class_names`` (-1 when the image has no class).
    """

    image: np.ndarray
    masks: np.ndarray
    label: int


_BASE_CONCEPTS: Tuple[Concept, ...] = tuple(
    [Concept(n, "color") for n in COLOR_NAMES] + [Concept(n, "texture") for n in TEXTURE_NAMES]
    + [Concept(n, "material") for n in MATERIAL_NAMES] + [Concept(n, "object") for n in OBJECT_NAMES]
    + [Concept(n, "part") for n in PART_NAMES])
_CH: Dict[Tuple[str, str], int] = {(c.category, c.name): i for i, c in enumerate(_BASE_CONCEPTS)}
_COL = {n: _CH[("color", n)] for n in COLOR_NAMES}
_FINISH_CH = {**{n: _CH[("texture", n)] for n in TEXTURE_NAMES}, **{n: _CH[("material", n)] for n in MATERIAL_NAMES}}
_OBJ = {n: _CH[("object", n)] for n in OBJECT_NAMES}
_PART = {n: _CH[("part", n)] for n in PART_NAMES}
_WATERMARK_CH = len(_BASE_CONCEPTS)

# colour draw weights for freely coloured surfaces: the backgrounds already bring much green,
# grey, blue and brown, so those are drawn less often for objects (balances pixel areas).
_FREE_COLOUR_W = np.array([1.0, 0.6, 0.5, 0.35, 0.5, 1.3, 1.3, 1.3, 1.3, 1.0, 1.3])
_FREE_COLOUR_W = _FREE_COLOUR_W / _FREE_COLOUR_W.sum()

# 3 x 5 pixel glyphs for the watermark text
_GLYPHS = {
    "a": ("010", "101", "111", "101", "101"), "c": ("011", "100", "100", "100", "011"),
    "e": ("111", "100", "110", "100", "111"), "k": ("101", "101", "110", "101", "101"),
    "n": ("110", "101", "101", "101", "101"), "o": ("010", "101", "101", "101", "010"),
    "r": ("110", "101", "110", "101", "101"), "s": ("011", "100", "010", "001", "110"),
    "t": ("111", "010", "010", "010", "010"), "x": ("101", "101", "010", "101", "101"),
}
_CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


@dataclass(frozen=True)
class WatermarkSpec:
    """A shortcut watermark: a small black box with white text stamped in a corner.

    Parameters
    ----------
    target_class : int
        The class whose images carry the watermark in the train/val/test splits.
    fraction : float
        Share of ``target_class`` images that are stamped (train/val/test).
    text : str
        Letters from ``a c e k n o r s t x`` (3 x 5 px glyphs, scaled with the image size).
    corner : str
        ``bottom-right`` (default), ``bottom-left``, ``top-right`` or ``top-left``.
    poison_fraction : float
        In the ``poisoned_test`` split, share of images of the *other* classes that are stamped
        (target-class images are left clean there).

    Examples
    --------
    >>> spec = WatermarkSpec(target_class=1, fraction=0.5)
    >>> ConceptWorld(8, split="train", watermark=spec).concepts[-1]
    Concept(name='watermark', category='shortcut')
    """

    target_class: int = 0
    fraction: float = 0.5
    text: str = "rook"
    corner: str = "bottom-right"
    poison_fraction: float = 1.0

    def __post_init__(self):
        check_positive_int(self.target_class, "WatermarkSpec.target_class", minimum=0)
        if self.target_class >= len(CLASS_RULES):
            raise ValidationError(f"WatermarkSpec.target_class must be < {len(CLASS_RULES)} (the number of "
                                  f"classes), got {self.target_class}.")
        check_in_range(self.fraction, "WatermarkSpec.fraction", 0.0, 1.0)
        check_in_range(self.poison_fraction, "WatermarkSpec.poison_fraction", 0.0, 1.0)
        if not isinstance(self.text, str) or not self.text or any(ch not in _GLYPHS for ch in self.text):
            raise ValidationError(f"WatermarkSpec.text must be a non-empty string of the letters "
                                  f"{''.join(sorted(_GLYPHS))!r}, got {self.text!r}.")
        if self.corner not in _CORNERS:
            raise ValidationError(f"WatermarkSpec.corner must be one of {_CORNERS}, got {self.corner!r}.")

    def to_dict(self) -> dict:
        return {"target_class": self.target_class, "fraction": self.fraction, "text": self.text,
                "corner": self.corner, "poison_fraction": self.poison_fraction}


# --------------------------------------------------------------------------------------------
# drawing primitives
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _disc(size, cx, cy, r):
    yy, xx = _grid(size)
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _rect(size, x0, y0, x1, y1):
    m = np.zeros((size, size), dtype=bool)
    x0, y0 = max(int(round(x0)), 0), max(int(round(y0)), 0)
    x1, y1 = min(int(round(x1)), size), min(int(round(y1)), size)
    if x1 > x0 and y1 > y0:
        m[y0:y1, x0:x1] = True
    return m


def _polygon(size, pts):
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in pts], fill=1)
    return np.asarray(im).astype(bool)


def _rotated(pts, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in pts]


class _Canvas:
    """An RGB image and its label masks; painting a region replaces every label there."""

    def __init__(self, size: int, n_channels: int):
        self.size = size
        self.image = np.zeros((size, size, 3), dtype=np.float32)
        self.masks = np.zeros((n_channels, size, size), dtype=bool)

    def paint(self, region: np.ndarray, rgb: np.ndarray, cmap: np.ndarray, labels: Sequence[int]) -> None:
        """Paint ``region`` with colours ``rgb`` (H,W,3); ``cmap`` (H,W) holds each pixel's colour channel."""
        if not region.any():
            return
        self.masks[:, region] = False
        self.image[region] = rgb[region]
        for lab in labels:
            if lab is not None:
                self.masks[lab][region] = True
        cols = cmap[region]
        for c in np.unique(cols):
            self.masks[c] |= region & (cmap == c)

    def paint_plain(self, region, rgb, colour: int, labels=()) -> None:
        rgb = np.broadcast_to(np.asarray(rgb, np.float32), (self.size, self.size, 3))
        self.paint(region, rgb, np.full((self.size, self.size), colour, np.int64), labels)


def _jitter(rng, colour: int, amount: float = 14.0) -> np.ndarray:
    return np.clip(_COLOR_RGB[colour] + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def _free_colour(rng, exclude=()) -> int:
    w = _FREE_COLOUR_W.copy()
    for e in exclude:
        w[_COL[e] if isinstance(e, str) else e] = 0.0
    return int(rng.choice(len(COLOR_NAMES), p=w / w.sum()))


def _texture_pattern(rng, kind: str, size: int, s: float) -> np.ndarray:
    yy, xx = _grid(size)
    if kind == "striped":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(5.0, 8.0) * s
        t = xx * math.cos(a) + yy * math.sin(a)
        return ((t / period + rng.uniform()) % 1.0) < 0.5
    if kind == "dotted":
        a = rng.uniform(0, math.pi / 2)
        period = rng.uniform(5.0, 7.0) * s
        u = xx * math.cos(a) + yy * math.sin(a)
        v = -xx * math.sin(a) + yy * math.cos(a)
        u = (u / period + rng.uniform()) % 1.0 - 0.5
        v = (v / period + rng.uniform()) % 1.0 - 0.5
        return u * u + v * v < 0.31 ** 2
    if kind == "chequered":
        period = rng.uniform(3.5, 6.0) * s
        if rng.uniform() < 0.5:
            u, v = xx, yy
        else:
            u, v = (xx + yy) / math.sqrt(2), (xx - yy) / math.sqrt(2)
        return (np.floor(u / period + rng.uniform()) + np.floor(v / period + rng.uniform())) % 2 == 1
    if kind == "zigzagged":
        period = rng.uniform(5.0, 8.0) * s
        wl = period * rng.uniform(1.0, 1.6)
        u, v = (xx, yy) if rng.uniform() < 0.5 else (yy, xx)
        tri = np.abs(((u / wl + rng.uniform()) % 1.0) * 2.0 - 1.0)  # triangle wave in [0, 1]
        t = v + tri * period * 1.2
        return ((t / period + rng.uniform()) % 1.0) < 0.5
    if kind == "wavy":
        period = rng.uniform(5.0, 8.0) * s
        wl = period * rng.uniform(2.5, 3.5)
        u, v = (xx, yy) if rng.uniform() < 0.5 else (yy, xx)
        t = v + np.sin(2 * math.pi * u / wl + rng.uniform(0, 2 * math.pi)) * period * 0.6
        return ((t / period + rng.uniform()) % 1.0) < 0.5
    raise ValueError(kind)  # pragma: no cover - internal


def _render_finish(rng, size: int, s: float, kind: str, c1: int, c2: int):
    """Colours and per-pixel colour labels of a surface finish over the whole canvas."""
    yy, xx = _grid(size)
    shape = (size, size)
    if kind == "plain":
        col = _jitter(rng, c1)
        return np.broadcast_to(col, shape + (3,)), np.full(shape, c1, np.int64)
    if kind in TEXTURE_NAMES:
        p = _texture_pattern(rng, kind, size, s)
        rgb = np.where(p[..., None], _jitter(rng, c2), _jitter(rng, c1))
        return rgb, np.where(p, c2, c1).astype(np.int64)
    if kind == "wood":
        c1 = _COL["brown"]
        base = _jitter(rng, c1, 10.0)
        a = rng.uniform(0, math.pi)
        u = xx * math.cos(a) + yy * math.sin(a)
        v = -xx * math.sin(a) + yy * math.cos(a)
        period = rng.uniform(3.0, 5.0) * s
        t = u + 1.8 * s * np.sin(v / (rng.uniform(5, 9) * s) + rng.uniform(0, 6.3))
        ring = (t / period + rng.uniform()) % 1.0
        shade = 0.78 + 0.34 * ring
        return np.clip(base * shade[..., None], 0, 255), np.full(shape, c1, np.int64)
    if kind == "metal":
        c1 = _COL["grey"]
        base = _jitter(rng, c1, 8.0) + 20.0
        a = rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.2, 0.2)
        v = -xx * math.sin(a) + yy * math.cos(a)
        u = xx * math.cos(a) + yy * math.sin(a)
        streak_vals = rng.normal(0.0, 10.0, 4 * size + 4)
        idx = np.clip(np.round(v + 2 * size).astype(np.int64), 0, len(streak_vals) - 1)
        glare = 22.0 * np.cos(u / (rng.uniform(12, 20) * s) + rng.uniform(0, 6.3))
        rgb = base + (streak_vals[idx] + glare)[..., None]
        return np.clip(rgb, 0, 255), np.full(shape, c1, np.int64)
    if kind == "fabric":
        base = _jitter(rng, c1, 10.0)
        w = max(1, int(round(1.5 * s)))
        xi, yi = xx.astype(np.int64) // w, yy.astype(np.int64) // w
        weave = ((xi + yi) % 2).astype(np.float32)
        thread = np.where(weave > 0, (xi % 2) * 0.06, (yi % 2) * 0.06)
        shade = 0.8 + 0.2 * weave + thread
        return np.clip(base * shade[..., None], 0, 255), np.full(shape, c1, np.int64)
    raise ValueError(kind)  # pragma: no cover - internal


def _sample_finish(rng, p_texture=0.4, p_material=0.25, materials=MATERIAL_NAMES, colour=None, exclude=()):
    """(kind, c1, c2) for a freely painted surface."""
    u = rng.uniform()
    c1 = colour if colour is not None else _free_colour(rng, exclude)
    if u < p_texture:
        kind = TEXTURE_NAMES[rng.integers(len(TEXTURE_NAMES))]
        c2 = _free_colour(rng, exclude=(c1,))
        return kind, c1, c2
    if u < p_texture + p_material and materials:
        return materials[rng.integers(len(materials))], c1, c1
    return "plain", c1, c1


# --------------------------------------------------------------------------------------------
# scene composition
# --------------------------------------------------------------------------------------------
class _Painter:
    def __init__(self, rng, size: int, n_channels: int):
        self.rng = rng
        self.size = size
        self.s = size / 64.0
        self.canvas = _Canvas(size, n_channels)

    def surface(self, region, labels, kind, c1, c2=None):
        rgb, cmap = _render_finish(self.rng, self.size, self.s, kind, c1, c1 if c2 is None else c2)
        self.canvas.paint(region, rgb, cmap, list(labels) + [_FINISH_CH.get(kind)])

    def free_surface(self, region, labels, **kw):
        kind, c1, c2 = _sample_finish(self.rng, **kw)
        self.surface(region, labels, kind, c1, c2)

    # backgrounds --------------------------------------------------------------------------
    def background(self, ground: str, horizon: int):
        rng, n = self.rng, self.size
        top, bottom = _rect(n, 0, 0, n, horizon), _rect(n, 0, horizon, n, n)
        if ground in ("grass", "road"):
            sky_colours = ("blue", "white", "grey", "orange", "pink", "purple", "black")
            c = _COL[sky_colours[rng.choice(7, p=[0.34, 0.14, 0.1, 0.12, 0.12, 0.08, 0.1])]]
            self.surface(top, [_OBJ["sky"]], "plain", c)
        else:
            self.free_surface(top, [_OBJ["wall"]], p_texture=0.5, p_material=0.0)
        if ground == "grass":
            self.surface(bottom, [_OBJ["grass"]], "plain", _COL["green"])
        elif ground == "road":
            self.surface(bottom, [_OBJ["road"]], "plain", _COL["grey"] if rng.uniform() < 0.6 else _COL["black"])
            # lane marking: dashes across the road
            y = rng.uniform(horizon + 4 * self.s, n - 3 * self.s)
            h = max(1.0, 1.5 * self.s)
            dash, gap = rng.uniform(5, 8) * self.s, rng.uniform(3, 6) * self.s
            lane = np.zeros((n, n), bool)
            x = rng.uniform(-dash, 0)
            while x < n:
                lane |= _rect(n, x, y, x + dash, y + h)
                x += dash + gap
            self.surface(lane, [_OBJ["road"]], "plain", _COL["white"] if rng.uniform() < 0.6 else _COL["yellow"])
        else:  # floor
            u = rng.uniform()
            if u < 0.4:
                self.surface(bottom, [_OBJ["floor"]], "wood", _COL["brown"])
            elif u < 0.7:
                self.surface(bottom, [_OBJ["floor"]], "fabric", _free_colour(rng))
            else:
                c1 = _free_colour(rng)
                self.surface(bottom, [_OBJ["floor"]], "chequered", c1, _free_colour(rng, exclude=(c1,)))

    # objects --------------------------------------------------------------------------------
    def place(self, name: str, horizon: int):
        """Draw object ``name`` at a random place (standing on the ground for key objects)."""
        rng, n, s = self.rng, self.size, self.s
        ground_y = rng.uniform(horizon + 6 * s, n + 2 * s)  # where a standing object touches the ground
        cx = rng.uniform(0.12 * n, 0.88 * n)
        getattr(self, "_draw_" + name)(cx, ground_y, horizon)

    def _draw_ball(self, cx, gy, horizon):
        r = self.rng.uniform(6.0, 9.0) * self.s
        self.free_surface(_disc(self.size, cx, gy - r, r), [_OBJ["ball"]])

    def _draw_box(self, cx, gy, horizon):
        w = self.rng.uniform(12.0, 17.0) * self.s
        h = w * self.rng.uniform(0.75, 1.1)
        self.free_surface(_rect(self.size, cx - w / 2, gy - h, cx + w / 2, gy), [_OBJ["box"]], p_material=0.35)

    def _draw_tree(self, cx, gy, horizon):
        rng, s, n = self.rng, self.s, self.size
        th, tw = rng.uniform(7, 11) * s, rng.uniform(2.5, 4.0) * s
        r = rng.uniform(7.5, 10.5) * s
        trunk = _rect(n, cx - tw / 2, gy - th - r * 0.4, cx + tw / 2, gy)
        if rng.uniform() < 0.5:
            self.surface(trunk, [_OBJ["tree"], _PART["trunk"]], "wood", _COL["brown"])
        else:
            self.surface(trunk, [_OBJ["tree"], _PART["trunk"]], "plain", _COL["brown"] if rng.uniform() < 0.7 else _COL["black"])
        cy = gy - th - r
        if rng.uniform() < 0.65:
            crown = _disc(n, cx, cy, r)
        else:  # pine
            crown = _polygon(n, [(cx, cy - 1.6 * r), (cx - r, cy + r), (cx + r, cy + r)])
        c = _COL[("green", "green", "orange", "yellow", "red")[rng.integers(5)]]
        if rng.uniform() < 0.3:
            kind = ("dotted", "wavy")[rng.integers(2)]
            self.surface(crown, [_OBJ["tree"], _PART["crown"]], kind, c, _free_colour(rng, exclude=(c,)))
        else:
            self.surface(crown, [_OBJ["tree"], _PART["crown"]], "plain", c)

    def _draw_flower(self, cx, gy, horizon):
        rng, s, n = self.rng, self.s, self.size
        h = rng.uniform(12, 17) * s
        pr = rng.uniform(2.9, 3.9) * s
        stem = _rect(n, cx - 0.6 * s, gy - h, cx + 0.9 * s, gy)
        self.surface(stem, [_OBJ["flower"]], "plain", _COL["green"])
        cy = gy - h
        petals = np.zeros((n, n), bool)
        k = int(rng.integers(5, 7))
        a0 = rng.uniform(0, 2 * math.pi)
        for j in range(k):
            a = a0 + 2 * math.pi * j / k
            petals |= _disc(n, cx + 1.15 * pr * math.cos(a), cy + 1.15 * pr * math.sin(a), pr)
        pc = _COL[("red", "pink", "yellow", "white", "purple", "blue", "orange")[rng.integers(7)]]
        self.surface(petals, [_OBJ["flower"]], "plain", pc)
        centre_c = _COL["yellow"] if pc != _COL["yellow"] else _COL["brown"]
        self.surface(_disc(n, cx, cy, 0.95 * pr), [_OBJ["flower"]], "plain", centre_c)

    def _draw_house(self, cx, gy, horizon):
        rng, s, n = self.rng, self.s, self.size
        w = rng.uniform(19, 27) * s
        h = rng.uniform(12, 17) * s
        x0, x1, y0 = cx - w / 2, cx + w / 2, gy - h
        obj = _OBJ["house"]
        self.free_surface(_rect(n, x0, y0, x1, gy), [obj, _PART["facade"]], materials=("wood",), p_material=0.2)
        rh = rng.uniform(6, 10) * s
        roof = _polygon(n, [(x0 - 2 * s, y0), (cx, y0 - rh), (x1 + 2 * s, y0)])
        rc = _COL[("red", "brown", "grey", "black", "orange")[rng.integers(5)]]
        if rng.uniform() < 0.35:
            kind = ("wavy", "striped", "zigzagged")[rng.integers(3)]
            self.surface(roof, [obj, _PART["roof"]], kind, rc, _free_colour(rng, exclude=(rc,)))
        else:
            self.surface(roof, [obj, _PART["roof"]], "plain", rc)
        dw, dh = rng.uniform(3.5, 5.0) * s, h * rng.uniform(0.45, 0.6)
        dx = rng.uniform(x0 + 1.5 * s + dw / 2, x1 - 1.5 * s - dw / 2)
        door = _rect(n, dx - dw / 2, gy - dh, dx + dw / 2, gy)
        if rng.uniform() < 0.4:
            self.surface(door, [obj, _PART["door"]], "wood", _COL["brown"])
        else:
            self.surface(door, [obj, _PART["door"]], "plain", _free_colour(rng))
        ws = rng.uniform(3.5, 5.0) * s
        wc = _COL[("blue", "white", "yellow", "black")[rng.integers(4)]]
        for wx in (x0 + (dx - x0) / 2, dx + (x1 - dx) / 2):
            if abs(wx - dx) < dw / 2 + ws / 2 + 0.5 * s:
                continue
            wy = y0 + h * 0.3
            self.surface(_rect(n, wx - ws / 2, wy, wx + ws / 2, wy + ws), [obj, _PART["window"]], "plain", wc)

    def _draw_car(self, cx, gy, horizon):
        rng, s, n = self.rng, self.s, self.size
        w = rng.uniform(22, 29) * s
        wr = rng.uniform(2.8, 3.8) * s
        bh = rng.uniform(5.5, 7.5) * s
        x0, x1 = cx - w / 2, cx + w / 2
        by1 = gy - wr * 0.8
        by0 = by1 - bh
        ch = rng.uniform(4.5, 6.5) * s
        cab = _polygon(n, [(x0 + 0.2 * w, by0 + 0.5), (x0 + 0.32 * w, by0 - ch), (x1 - 0.3 * w, by0 - ch),
                           (x1 - 0.15 * w, by0 + 0.5)])
        body = _rect(n, x0, by0, x1, by1) | cab
        obj = _OBJ["car"]
        if rng.uniform() < 0.4:
            self.surface(body, [obj, _PART["body"]], "metal", _COL["grey"])
        else:
            self.free_surface(body, [obj, _PART["body"]], p_texture=0.25, p_material=0.0)
        wc = _COL[("blue", "white", "grey", "black")[rng.integers(4)]]
        win = _polygon(n, [(x0 + 0.36 * w, by0 - ch + 1.2 * s), (x1 - 0.33 * w, by0 - ch + 1.2 * s),
                           (x1 - 0.22 * w, by0), (x0 + 0.26 * w, by0)])
        self.surface(win, [obj, _PART["window"]], "plain", wc)
        for wx in (x0 + 0.22 * w, x1 - 0.22 * w):
            self.surface(_disc(n, wx, gy - wr, wr), [obj, _PART["wheel"]], "plain", _COL["black"])
            hub = _disc(n, wx, gy - wr, wr * 0.4)
            self.surface(hub, [obj, _PART["wheel"]], "plain", _COL["grey"] if rng.uniform() < 0.7 else _COL["white"])

    # neutral shapes: anywhere in the image ------------------------------------------------------
    def _shape_pose(self):
        rng, s, n = self.rng, self.s, self.size
        return rng.uniform(0.1 * n, 0.9 * n), rng.uniform(0.1 * n, 0.9 * n), rng.uniform(4.5, 7.0) * s, rng.uniform(0, 2 * math.pi)

    def _draw_triangle(self, *_):
        cx, cy, r, a = self._shape_pose()
        pts = [(r * math.cos(2 * math.pi * j / 3), r * math.sin(2 * math.pi * j / 3)) for j in range(3)]
        self.free_surface(_polygon(self.size, _rotated(pts, cx, cy, a)), [_OBJ["triangle"]])

    def _draw_star(self, *_):
        cx, cy, r, a = self._shape_pose()
        pts = [((r if j % 2 == 0 else 0.45 * r) * math.cos(math.pi * j / 5),
                (r if j % 2 == 0 else 0.45 * r) * math.sin(math.pi * j / 5)) for j in range(10)]
        self.free_surface(_polygon(self.size, _rotated(pts, cx, cy, a)), [_OBJ["star"]])

    def _draw_cross(self, *_):
        cx, cy, r, a = self._shape_pose()
        t = 0.33 * r
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        self.free_surface(_polygon(self.size, _rotated(pts, cx, cy, a)), [_OBJ["cross"]])

    def _draw_ring(self, *_):
        cx, cy, r, _a = self._shape_pose()
        m = _disc(self.size, cx, cy, r) & ~_disc(self.size, cx, cy, r * self.rng.uniform(0.45, 0.6))
        self.free_surface(m, [_OBJ["ring"]])


def _distractor_keys(rng, cls: int) -> List[str]:
    """Key objects of other classes that can be added to class ``cls`` without completing another rule."""
    _, ground, keys = CLASS_RULES[cls]
    present = set(keys)
    extra: List[str] = []
    n_extra = int(rng.choice(3, p=[0.35, 0.45, 0.2]))
    for o in rng.permutation(_KEY_OBJECTS):
        if len(extra) >= n_extra:
            break
        o = str(o)
        if o in present:
            continue
        cand = present | {o}
        if any(j != cls and g == ground and set(k) <= cand for j, (_, g, k) in enumerate(CLASS_RULES)):
            continue
        present = cand
        extra.append(o)
    return extra


def _compose(rng, cls: int, size: int, n_channels: int, min_pixels: int) -> _Canvas:
    _, ground, keys = CLASS_RULES[cls]
    n = size
    horizon = int(round(rng.uniform(0.3, 0.45) * n))
    extras = _distractor_keys(rng, cls)
    shapes = [_NEUTRAL_SHAPES[i] for i in rng.integers(len(_NEUTRAL_SHAPES), size=int(rng.integers(1, 3)))]
    objects = list(keys) + extras + shapes
    needed = [_OBJ[ground]] + [_OBJ[k] for k in keys]
    for attempt in range(6):
        painter = _Painter(rng, size, n_channels)
        painter.background(ground, horizon)
        order = [objects[i] for i in rng.permutation(len(objects))]
        if attempt == 5:  # keep the key objects visible: draw them last
            order = extras + shapes + list(keys)
        for name in order:
            painter.place(name, horizon)
        counts = painter.canvas.masks[needed].sum(axis=(1, 2))
        if (counts >= min_pixels).all():
            break
    return painter.canvas


def _stamp_watermark(canvas: _Canvas, spec: WatermarkSpec, rng) -> None:
    n = canvas.size
    g = max(1, n // 64)
    text_w = (4 * len(spec.text) - 1) * g
    bw, bh = text_w + 2 * g, 7 * g
    jx, jy = int(rng.integers(0, 3)), int(rng.integers(0, 3))
    x0 = n - bw - 1 - jx if "right" in spec.corner else 1 + jx
    y0 = n - bh - 1 - jy if "bottom" in spec.corner else 1 + jy
    box = _rect(n, x0, y0, x0 + bw, y0 + bh)
    text = np.zeros((n, n), bool)
    for k, ch in enumerate(spec.text):
        glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[ch]], bool)
        glyph = np.kron(glyph, np.ones((g, g), bool))
        tx, ty = x0 + g + 4 * g * k, y0 + g
        text[ty:ty + 5 * g, tx:tx + 3 * g] |= glyph
    canvas.paint_plain(box, _COLOR_RGB[_COL["black"]], _COL["black"], [_WATERMARK_CH])
    canvas.paint_plain(text, _COLOR_RGB[_COL["white"]], _COL["white"], [_WATERMARK_CH])


# --------------------------------------------------------------------------------------------
# the data set
# --------------------------------------------------------------------------------------------
class ConceptWorld:
    """A procedurally drawn concept data set with exact multi-label masks.

    Parameters
    ----------
    n_images : int
        Number of images.
    split : {"train", "val", "test", "poisoned_test"}
        Independent random streams. ``poisoned_test`` holds the very same images as ``test`` but
        stamps the watermark on the images of the classes other than the watermark's target (needs
        ``watermark``).
    seed : int
        Same ``(seed, split, image_size, noise)`` -> identical images, masks and labels. Image ``i``
        does not depend on ``n_images`` (a larger set extends a smaller one).
    image_size : int
        Side of the square images in pixels (>= 32; drawing is designed for 64 and scales).
    watermark : WatermarkSpec or None
        The shortcut option: adds the last mask channel ``Concept("watermark", "shortcut")``.
    noise : float
        Standard deviation of the per-pixel Gaussian noise added to the image (0-255 scale).

    Examples
    --------
    >>> ds = ConceptWorld(n_images=16, split="train", seed=0)
    >>> s = ds[0]
    >>> s.image.shape, s.masks.shape, ds.class_names[s.label] in ds.class_names
    ((64, 64, 3), (42, 64, 64), True)
    """

    def __init__(self, n_images: int = 1000, split: str = "train", seed: int = 0, image_size: int = 64,
                 watermark: Optional[WatermarkSpec] = None, noise: float = 3.0):
        self.n_images = check_positive_int(n_images, "n_images")
        if split not in SPLITS:
            raise ValidationError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
        self.split = split
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.image_size = check_positive_int(image_size, "image_size", minimum=32)
        if watermark is not None and not isinstance(watermark, WatermarkSpec):
            raise ValidationError(f"watermark must be a WatermarkSpec or None, got {type(watermark).__name__}.")
        if split == "poisoned_test" and watermark is None:
            raise ValidationError("split 'poisoned_test' stamps the watermark on other classes' images, so it "
                                  "needs watermark=WatermarkSpec(...); pass one (or use split='test').")
        self.watermark = watermark
        self.noise = check_in_range(noise, "noise", 0.0, 50.0)
        self._split_id = SPLITS[split]
        k = len(CLASS_RULES)
        n_blocks = -(-self.n_images // k)
        perms = [np.random.default_rng([self.seed, self._split_id, b, 101]).permutation(k) for b in range(n_blocks)]
        self.labels = np.concatenate(perms)[: self.n_images].astype(np.int64)
        self.labels.setflags(write=False)
        self.watermarked = np.array([self._is_stamped(i) for i in range(self.n_images)], dtype=bool)
        self.watermarked.setflags(write=False)

    # -- protocol -----------------------------------------------------------------------------
    @property
    def concepts(self) -> List[Concept]:
        out = list(_BASE_CONCEPTS)
        if self.watermark is not None:
            out.append(Concept("watermark", "shortcut"))
        return out

    @property
    def categories(self) -> List[str]:
        return list(CATEGORIES) + (["shortcut"] if self.watermark is not None else [])

    @property
    def class_names(self) -> List[str]:
        return [name for name, _, _ in CLASS_RULES]

    @property
    def class_rules(self) -> Dict[str, Tuple[str, ...]]:
        """Class name -> the object concepts an image of that class shows (ground first)."""
        return {name: (ground,) + tuple(keys) for name, ground, keys in CLASS_RULES}

    def config(self) -> dict:
        """The arguments that reproduce this data set (json-able)."""
        return {"n_images": self.n_images, "split": self.split, "seed": self.seed, "image_size": self.image_size,
                "watermark": None if self.watermark is None else self.watermark.to_dict(), "noise": self.noise}

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return (f"ConceptWorld(n_images={self.n_images}, split={self.split!r}, seed={self.seed}, "
                f"image_size={self.image_size}, watermark={self.watermark!r})")

    def _index(self, i) -> int:
        return check_index(i, self.n_images, "ConceptWorld")

    def _is_stamped(self, i: int) -> bool:
        wm = self.watermark
        if wm is None:
            return False
        u = np.random.default_rng([self.seed, self._split_id, i, 202]).uniform()
        if self.split == "poisoned_test":
            return bool(self.labels[i] != wm.target_class and u < wm.poison_fraction)
        return bool(self.labels[i] == wm.target_class and u < wm.fraction)

    def __getitem__(self, i) -> WorldSample:
        i = self._index(i)
        rng = np.random.default_rng([self.seed, self._split_id, i])
        label = int(self.labels[i])
        n_ch = len(_BASE_CONCEPTS) + (1 if self.watermark is not None else 0)
        min_px = max(8, int(round(0.004 * self.image_size ** 2)))
        canvas = _compose(rng, label, self.image_size, n_ch, min_px)
        if self.watermarked[i]:
            _stamp_watermark(canvas, self.watermark, np.random.default_rng([self.seed, self._split_id, i, 303]))
        img = canvas.image
        if self.noise > 0:
            nrng = np.random.default_rng([self.seed, self._split_id, i, 404])
            img = img + nrng.normal(0.0, self.noise, img.shape).astype(np.float32)
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return WorldSample(image=image, masks=canvas.masks, label=label)

    def __iter__(self):
        for i in range(self.n_images):
            yield self[i]

    def _indices(self, indices) -> np.ndarray:
        if indices is None:
            return np.arange(self.n_images)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return np.array([self._index(int(i)) for i in idx.reshape(-1)], dtype=np.int64)

    def images_tensor(self, indices=None, progress: bool = False):
        """Images as a float32 torch tensor (N, 3, H, W) in [0, 1]."""
        import torch

        from .._progress import progress as _progress
        idx = self._indices(indices)
        out = np.empty((len(idx), 3, self.image_size, self.image_size), dtype=np.float32)
        for k, i in enumerate(_progress(idx, enabled=progress, desc="drawing images")):
            out[k] = self[int(i)].image.transpose(2, 0, 1)
        out *= 1.0 / 255.0
        return torch.from_numpy(out)

    def masks_array(self, indices=None, progress: bool = False) -> np.ndarray:
        """Masks as a bool array (N, C, H, W)."""
        from .._progress import progress as _progress
        idx = self._indices(indices)
        out = np.empty((len(idx), len(self.concepts), self.image_size, self.image_size), dtype=bool)
        for k, i in enumerate(_progress(idx, enabled=progress, desc="drawing masks")):
            out[k] = self[int(i)].masks
        return out

    def concept_index(self, name: str, category: Optional[str] = None) -> int:
        """Mask channel of concept ``name`` (give ``category`` when a name occurs in several)."""
        hits = [i for i, c in enumerate(self.concepts) if c.name == name and (category is None or c.category == category)]
        if len(hits) != 1:
            raise ValidationError(f"concept {name!r}{'' if category is None else f' in {category!r}'} "
                                  f"{'is ambiguous' if hits else 'does not exist'}; known concepts: "
                                  f"{[c.name for c in self.concepts]}.")
        return hits[0]


# --------------------------------------------------------------------------------------------
# helpers on masks
# --------------------------------------------------------------------------------------------
def rule_satisfied(masks: np.ndarray, concepts: Sequence[Concept], min_pixels: int = 1) -> List[str]:
    """Names of the classes of :data:`CLASS_RULES` whose rule holds on ``masks`` (C, H, W).

    A rule holds when each of its object concepts covers at least ``min_pixels`` pixels.
    """
    names = {c.name: i for i, c in enumerate(concepts) if c.category == "object"}
    counts = {name: int(masks[i].sum()) for name, i in names.items()}
    return [cname for cname, ground, keys in CLASS_RULES
            if all(counts.get(o, 0) >= min_pixels for o in (ground,) + tuple(keys))]


def concept_statistics(ds, indices=None) -> Dict[str, dict]:
    """Per concept: share of images that contain it and its pixel coverage.

    Returns ``{"<category>/<name>": {"image_frequency", "pixel_fraction", "mean_area_when_present"}}``
    where areas are fractions of the image.
    """
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices)
    concepts = ds.concepts
    present = np.zeros(len(concepts))
    pixels = np.zeros(len(concepts))
    total = 0
    for i in idx:
        m = ds[int(i)].masks
        area = m.reshape(m.shape[0], -1).mean(axis=1)
        present += area > 0
        pixels += area
        total += 1
    out = {}
    for c, p, a in zip(concepts, present, pixels):
        out[f"{c.category}/{c.name}"] = {"image_frequency": float(p / max(total, 1)),
                                        "pixel_fraction": float(a / max(total, 1)),
                                        "mean_area_when_present": float(a / p) if p else 0.0}
    return out


_OVERLAY_RGB = np.array([255, 0, 255], np.float32)


def plot_sample(sample: WorldSample, concepts: Sequence[Concept], channel: Optional[int] = None, ax=None,
                class_names: Optional[Sequence[str]] = None):
    """Show a sample's image, with one concept mask highlighted when ``channel`` is given.

    Returns the matplotlib Axes (never calls ``show()``).
    """
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(2, 2))
    img = sample.image.astype(np.float32)
    title = class_names[sample.label] if class_names is not None and sample.label >= 0 else ""
    if channel is not None:
        m = sample.masks[channel]
        img = np.where(m[..., None], 0.45 * img + 0.55 * _OVERLAY_RGB, 0.35 * img)
        title = f"{concepts[channel].category}/{concepts[channel].name}"
    ax.imshow(img.astype(np.uint8), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def plot_samples(ds, indices: Sequence[int], channels: Sequence[str] = ("object", "part", "color", "texture"),
                 fig=None):
    """A grid: one row per image, the image then one mask panel per listed category (the category's
    largest concept in that image). Returns the Figure."""
    import matplotlib.pyplot as plt
    cats = [c for c in channels if c in ds.categories]
    ncols = 1 + len(cats)
    if fig is None:
        fig = plt.figure(figsize=(1.6 * ncols, 1.6 * len(indices)))
    axes = fig.subplots(len(indices), ncols, squeeze=False)
    concepts = ds.concepts
    for r, i in enumerate(indices):
        s = ds[int(i)]
        plot_sample(s, concepts, None, ax=axes[r, 0], class_names=ds.class_names)
        for k, cat in enumerate(cats):
            chans = [j for j, c in enumerate(concepts) if c.category == cat]
            areas = s.masks[chans].sum(axis=(1, 2))
            # skip the background-sized objects so the panel shows something interesting
            if cat == "object":
                areas = np.where([concepts[j].name in ("sky", "wall", "grass", "road", "floor") for j in chans], -1, areas)
            plot_sample(s, concepts, chans[int(np.argmax(areas))], ax=axes[r, k + 1])
    fig.tight_layout()
    return fig
