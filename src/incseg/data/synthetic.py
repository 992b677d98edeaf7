"""Built-in synthetic segmentation benchmark: procedurally generated scenes with 20 object classes.

:class:`SyntheticScenes` is a raw source (the ``SegmentationSource`` protocol of ``incseg.data``) that needs
no download. Every image is drawn on the fly from its own random generator seeded by
``(seed, split, index)``, so any index loads identically in any worker, in any order.

A scene is a noisy, smoothly coloured background (sometimes faintly striped) with up to three *distractors*
(shapes whose shape/colour/texture combination is no class, labelled background like the clutter of real
photos) and 1 to 3 *objects* of the 20 classes, which may partially occlude each other and be cut by the
image border. Classes are told apart by combinations of shape (disc, square, triangle, ring, cross, diamond,
ellipse, star, hexagon), colour and texture (stripes, dots, checks), under colour jitter, shading, sensor
noise and random scale, position and rotation. Several classes are deliberately confusable: same colour,
different shape (blue square/diamond, yellow triangle/star, white cross/hexagon), close colours (red/orange
discs, blue/purple squares, pink/purple rings), same texture with overlapping colour sets (striped
disc/square, dotted disc/triangle). As in Pascal VOC, a one-pixel band around every object is void (255) by
default.

Class frequencies are skewed (class 15 ``dotted-disc``, like VOC's *person*, is about three times as frequent
as the rarest classes) but every class is common enough that the VOC-style tasks (15-5, 15-1, disjoint and
overlapped) select images at every step.

Difficulty (``benchmarks/calibrate_synthetic.py``): ``incseg.models.small_segmenter(21, width=32)`` trained
jointly for 30 epochs of the default 1500 training images (Adam 1e-3, poly decay, batch 16, about one to two
minutes on two CPU threads) reaches about 69% mIoU over the 21 classes on the validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from incseg.scenarios._names import SYNTHETIC_CLASS_NAMES

__all__ = ["SyntheticScenes"]

# Bump whenever the generator changes the pixels or labels it produces (part of the fingerprint).
_GENERATOR_VERSION = 1

_SPLIT_CODES = {"train": 0, "val": 1}
_DEFAULT_NUM_IMAGES = {"train": 1500, "val": 300}
_MIN_SIZE = 48
_REFERENCE_SIZE = 64.0

# Base colours (RGB, 0-255) of objects and distractors; all jittered per instance.
_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (205.0, 40.0, 40.0),
    "orange": (235.0, 125.0, 30.0),
    "yellow": (225.0, 210.0, 45.0),
    "green": (45.0, 165.0, 60.0),
    "cyan": (40.0, 190.0, 205.0),
    "blue": (40.0, 70.0, 205.0),
    "purple": (125.0, 50.0, 180.0),
    "magenta": (215.0, 55.0, 165.0),
    "white": (235.0, 235.0, 230.0),
    "pink": (245.0, 150.0, 175.0),
    "lime": (160.0, 225.0, 50.0),
}
# Colours used only by distractors (muted, like real-world clutter).
_DISTRACTOR_COLOURS: tuple[tuple[float, float, float], ...] = (
    (120.0, 80.0, 40.0),  # brown
    (128.0, 128.0, 128.0),  # grey
    (110.0, 110.0, 45.0),  # olive
    (40.0, 100.0, 100.0),  # teal
    (200.0, 180.0, 140.0),  # beige
    (60.0, 60.0, 70.0),  # charcoal
)
_TEXTURED_COLOURS = tuple(_COLOURS.values())
_COLOUR_NAMES = tuple(_COLOURS)


@dataclass(frozen=True)
class _ClassSpec:
    shape: str
    colours: tuple[str, ...]  # base colours drawn uniformly; () = any colour of the palette
    texture: str  # "plain", "stripes", "dots", "checks"
    weight: float  # relative sampling frequency


# Class ids 1..20, in the order of SYNTHETIC_CLASS_NAMES (incseg.scenarios, where the task registry reads them);
# each row is commented with its name. Weights are fixed (not seeded): the class distribution is part of the
# benchmark. Confusable pairs are spread over both sides of the 15|16 split of the VOC-style tasks.
_CLASSES: tuple[_ClassSpec, ...] = (
    _ClassSpec("disc", ("red",), "plain", 1.6),  # red-disc
    _ClassSpec("disc", ("orange",), "plain", 1.0),  # orange-disc
    _ClassSpec("square", ("blue",), "plain", 1.4),  # blue-square
    _ClassSpec("square", ("purple",), "plain", 0.9),  # purple-square
    _ClassSpec("triangle", ("green",), "plain", 1.2),  # green-triangle
    _ClassSpec("triangle", ("yellow",), "plain", 0.8),  # yellow-triangle
    _ClassSpec("ring", ("pink",), "plain", 1.0),  # pink-ring
    _ClassSpec("ring", ("cyan",), "plain", 0.7),  # cyan-ring
    _ClassSpec("cross", ("white",), "plain", 1.1),  # white-cross
    _ClassSpec("cross", ("magenta",), "plain", 0.7),  # magenta-cross
    _ClassSpec("diamond", ("blue",), "plain", 0.9),  # blue-diamond
    _ClassSpec("ellipse", ("lime",), "plain", 1.0),  # lime-ellipse
    _ClassSpec("disc", ("red", "orange", "yellow", "pink", "white"), "stripes", 1.1),  # striped-disc
    _ClassSpec("square", ("blue", "cyan", "green", "yellow", "white"), "stripes", 1.1),  # striped-square
    _ClassSpec("disc", (), "dots", 2.0),  # dotted-disc
    _ClassSpec("triangle", ("red", "blue", "green", "white", "magenta"), "dots", 0.8),  # dotted-triangle
    _ClassSpec("triangle", (), "checks", 0.8),  # checkered-triangle
    _ClassSpec("ring", ("purple",), "plain", 0.7),  # purple-ring
    _ClassSpec("star", ("yellow",), "plain", 0.9),  # yellow-star
    _ClassSpec("hexagon", ("white",), "plain", 0.8),  # white-hexagon
)
assert len(_CLASSES) == len(SYNTHETIC_CLASS_NAMES) - 1, "one row per class name"

_CLASS_NAMES: tuple[str, ...] = SYNTHETIC_CLASS_NAMES
_CLASS_PROBS = np.array([c.weight for c in _CLASSES], dtype=np.float64) / sum(c.weight for c in _CLASSES)
# Plain (shape, colour) pairs that are classes: distractors must avoid them.
_PLAIN_CLASS_PAIRS = frozenset((c.shape, c.colours[0]) for c in _CLASSES if c.texture == "plain")
# Textured (shape, texture) pairs that are classes (any colour): textured distractors avoid them.
_TEXTURED_CLASS_PAIRS = frozenset((c.shape, c.texture) for c in _CLASSES if c.texture != "plain")
_TEXTURES = ("stripes", "dots", "checks")
_DISTRACTOR_SHAPES = ("disc", "square", "triangle", "ellipse", "bar", "diamond", "ring")

_NUM_OBJECTS_PROBS = np.array([0.4, 0.4, 0.2])  # 1, 2 or 3 objects per image
_PLACEMENT_TRIES = 12
_ANCHOR_MARGIN = 1.0  # anchor pixels stay this far (in SDF units) inside their object and outside later ones
_VOID_HALF_WIDTH = 0.5  # void band: |sdf| < 0.5, i.e. about one pixel wide


@dataclass(frozen=True)
class _Shape:
    """Geometry of one painted shape (object or distractor), in pixel units."""

    kind: str
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float  # minor/major axis ratio (ellipse), half thickness ratio (bar)


@dataclass(frozen=True)
class _Object:
    label: int  # 1..20 for objects, 0 for distractors
    shape: _Shape
    colour: tuple[float, float, float]
    texture: str
    period: float
    texture_angle: float
    phase: float
    shading: float


def _sdf(shape: _Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) of ``shape`` at points ``(x, y)``."""
    dx = x - np.float32(shape.cx)
    dy = y - np.float32(shape.cy)
    c, s = np.float32(math.cos(shape.angle)), np.float32(math.sin(shape.angle))
    u = dx * c + dy * s
    v = dy * c - dx * s
    r = np.float32(shape.radius)
    kind = shape.kind
    if kind == "disc":
        return np.hypot(u, v) - r
    if kind == "ring":
        return np.abs(np.hypot(u, v) - np.float32(0.72) * r) - np.float32(0.28) * r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - np.float32(0.85) * r
    if kind == "diamond":
        return (np.abs(u) + np.abs(v) - r) * np.float32(math.sqrt(0.5))
    if kind == "triangle":  # equilateral, circumradius r, centroid at the origin
        half = np.float32(0.5) * r
        h = np.float32(math.sqrt(3.0) / 2.0)
        return np.maximum(
            np.maximum(v - half, -np.float32(0.5) * v + h * u - half), -np.float32(0.5) * v - h * u - half
        )
    if kind == "hexagon":  # circumradius r
        h = np.float32(math.sqrt(3.0) / 2.0)
        d = np.maximum(np.abs(u), np.maximum(np.abs(np.float32(0.5) * u + h * v), np.abs(np.float32(0.5) * u - h * v)))
        return d - h * r
    if kind == "cross":
        w = np.float32(0.34) * r
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - r, av - w), np.maximum(au - w, av - r))
    if kind in ("ellipse", "bar"):
        if kind == "bar":
            return np.maximum(np.abs(u) - r, np.abs(v) - np.float32(shape.aspect))
        a, b = r, r * np.float32(shape.aspect)
        k0 = np.hypot(u / a, v / b)
        k1 = np.hypot(u / (a * a), v / (b * b))
        return k0 * (k0 - np.float32(1.0)) / np.maximum(k1, np.float32(1e-6))
    if kind == "star":  # five-pointed, outer radius r
        rr = r * (np.float32(0.68) + np.float32(0.32) * np.cos(np.float32(5.0) * np.arctan2(v, u)))
        return (np.hypot(u, v) - rr) * np.float32(0.75)
    raise ValueError(f"unknown shape kind {kind!r}")  # pragma: no cover - internal


def _anchor(shape: _Shape) -> tuple[int, int]:
    """An integer pixel well inside ``shape`` (used to guarantee the object stays visible)."""
    if shape.kind == "ring":
        rm = 0.72 * shape.radius
        return round(shape.cx + rm * math.cos(shape.angle)), round(shape.cy + rm * math.sin(shape.angle))
    return round(shape.cx), round(shape.cy)


def _sdf_at(shape: _Shape, px: int, py: int) -> float:
    return float(_sdf(shape, np.array([px], dtype=np.float32), np.array([py], dtype=np.float32))[0])


class SyntheticScenes:
    """Procedurally generated segmentation scenes with 20 object classes and a cluttered background.

    A raw source following the ``SegmentationSource`` protocol (see ``docs/architecture.md``): dataset ids
    are ``0`` background, ``1..20`` the object classes of :attr:`class_names` and ``255`` void (a one-pixel
    band around each object when ``void_border=True``). Each image holds 1 to 3 objects drawn with a skewed
    class distribution, over a noisy low-frequency background with distractor shapes that belong to no
    class. Image ``i`` of a split is a pure function of ``(seed, split, i)``; the train and val splits use
    different random streams. Generation is vectorised NumPy (about a millisecond per 64x64 image), so by
    default images are rendered on the fly and nothing is stored; ``cache=True`` keeps every rendered image
    (about 16 KB per 64x64 image), which saves the rendering of every later epoch (``incseg demo`` does).

    This is a test bed for the incremental scenarios (it plays the role of Pascal VOC in ``incseg demo``),
    not a model of any paper experiment: the CAF paper (Yang et al., TMM 2022, Sec. IV) evaluates on Pascal
    VOC 2012 and ADE20K only.

    Args:
        split: ``"train"`` or ``"val"``.
        num_images: number of images; defaults to 1500 for ``"train"`` and 300 for ``"val"``.
        size: height and width of the square images in pixels (at least 48). Object sizes scale with it.
        seed: base seed (non-negative integer) of the whole benchmark.
        void_border: mark a one-pixel band around every object as void (255), as Pascal VOC does.
        cache: keep each image once rendered (in the process that rendered it); same images either way.

    Attributes:
        class_names: the 21 class names, ``class_names[0] == "background"``.
        num_classes: ``21`` (background included, void excluded).

    Raises:
        ValueError: unknown split, non-positive ``num_images``, ``size`` below 48 or negative ``seed``.
        TypeError: arguments of the wrong type.

    Example:
        >>> src = SyntheticScenes("train", num_images=8, size=64)
        >>> image, mask = src.load(3)
        >>> image.shape, image.dtype, mask.shape, mask.dtype
        (torch.Size([3, 64, 64]), torch.uint8, torch.Size([64, 64]), torch.int64)
        >>> src.labels_present(3) == frozenset(mask.unique().tolist()) - {255}
        True
        >>> src.class_names[15]
        'dotted-disc'
    """

    num_classes: int = len(_CLASS_NAMES)
    class_names: tuple[str, ...] = _CLASS_NAMES

    def __init__(
        self,
        split: Literal["train", "val"] = "train",
        *,
        num_images: int | None = None,
        size: int = 64,
        seed: int = 0,
        void_border: bool = True,
        cache: bool = False,
    ) -> None:
        if not isinstance(split, str) or split not in _SPLIT_CODES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if num_images is None:
            num_images = _DEFAULT_NUM_IMAGES[split]
        _check_int(num_images, "num_images", minimum=1)
        _check_int(size, "size", minimum=_MIN_SIZE)
        _check_int(seed, "seed", minimum=0)
        if not isinstance(void_border, bool):
            raise TypeError(f"void_border must be a bool, got {type(void_border).__name__}")
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
        self.split: str = split
        self.num_images: int = int(num_images)
        self.size: int = int(size)
        self.seed: int = int(seed)
        self.void_border: bool = void_border
        self._cache: dict[int, tuple[Tensor, Tensor]] | None = {} if cache else None
        self._scale = self.size / _REFERENCE_SIZE
        coords = np.arange(self.size, dtype=np.float32)
        self._xs = coords[None, :]
        self._ys = coords[:, None]
        # Bilinear upsampling matrix from a 4x4 grid of background colours to the image size.
        self._upsample = _interpolation_matrix(4, self.size)

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"SyntheticScenes(split={self.split!r}, num_images={self.num_images}, size={self.size}, "
            f"seed={self.seed}, void_border={self.void_border})"
        )

    def fingerprint(self) -> str:
        """A string identifying the generated data (generator version and every parameter).

        Returns:
            The fingerprint; two sources with the same fingerprint produce identical images and masks.
        """
        return (
            f"SyntheticScenes-v{_GENERATOR_VERSION}:split={self.split}:num_images={self.num_images}"
            f":size={self.size}:seed={self.seed}:void_border={int(self.void_border)}"
        )

    def labels_present(self, index: int) -> frozenset[int]:
        """The object class ids present in image ``index`` (background 0 always, void excluded).

        Computed from the scene layout only, without rendering (tens of microseconds); equal to the set of
        non-void values of ``load(index)[1]``: the generator keeps a pixel of every object visible.

        Args:
            index: image index in ``[-len(self), len(self))``.

        Returns:
            Frozen set of dataset ids (``0`` and the ids of the 1 to 3 objects).

        Raises:
            IndexError: index out of range.
            TypeError: index is not an integer.
        """
        objects = self._layout(self._rngs(index)[0], objects_only=True)
        return frozenset({0, *(obj.label for obj in objects)})

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """Render image ``index``.

        Args:
            index: image index in ``[-len(self), len(self))``.

        Shape:
            - image: ``(3, size, size)`` uint8 RGB.
            - mask: ``(size, size)`` int64 dataset ids in ``{0..20, 255}``.

        Returns:
            ``(image, mask)``.

        Raises:
            IndexError: index out of range.
            TypeError: index is not an integer.
        """
        key = self._index(index)
        if self._cache is not None and key in self._cache:
            image_t, mask_t = self._cache[key]
            return image_t.clone(), mask_t.long()
        layout_rng, pixel_rng = self._rngs(key)
        objects = self._layout(layout_rng, objects_only=False)
        image, mask = self._render(objects, pixel_rng)
        if self._cache is not None:  # the mask's ids fit in uint8: a quarter of the memory
            self._cache[key] = (torch.from_numpy(image).clone(), torch.from_numpy(mask).to(torch.uint8))
        return torch.from_numpy(image), torch.from_numpy(mask)

    # ------------------------------------------------------------------ generation

    def _index(self, index: int) -> int:
        """``index`` checked and made non-negative."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        n = self.num_images
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for SyntheticScenes of length {n}")
        return int(index) % n

    def _rngs(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        index = self._index(index)
        seq = np.random.SeedSequence([self.seed, _SPLIT_CODES[self.split], index])
        layout_seq, pixel_seq = seq.spawn(2)
        return np.random.Generator(np.random.PCG64(layout_seq)), np.random.Generator(np.random.PCG64(pixel_seq))

    def _layout(self, rng: np.random.Generator, *, objects_only: bool) -> list[_Object]:
        """Sample the objects (1..20, painted in order) then, unless ``objects_only``, the distractors.

        Distractors are sampled after the objects from the same stream so that ``labels_present`` can stop
        early. The returned list is in painting order: distractors first, then objects.
        """
        num_objects = int(rng.choice(3, p=_NUM_OBJECTS_PROBS)) + 1
        labels = rng.choice(len(_CLASSES), size=num_objects, p=_CLASS_PROBS) + 1
        objects: list[_Object] = []
        anchors: list[tuple[int, int]] = []
        for label in labels:
            spec = _CLASSES[int(label) - 1]
            for _ in range(_PLACEMENT_TRIES):
                shape = self._sample_shape(rng, spec.shape, lo=9.0, hi=17.0)
                anchor = _anchor(shape)
                if self._visible(shape, anchor, anchors):
                    break
            else:
                continue  # no free spot: drop the object (rare)
            anchors.append(anchor)
            objects.append(self._sample_object(rng, int(label), shape))
        if objects_only:
            return objects
        distractors = [self._sample_distractor(rng) for _ in range(int(rng.integers(0, 4)))]
        return distractors + objects

    def _visible(self, shape: _Shape, anchor: tuple[int, int], anchors: list[tuple[int, int]]) -> bool:
        """Whether ``shape`` keeps its own anchor inside and leaves the anchors of earlier objects uncovered."""
        ax, ay = anchor
        if not (0 <= ax < self.size and 0 <= ay < self.size):
            return False
        if _sdf_at(shape, ax, ay) > -_ANCHOR_MARGIN - _VOID_HALF_WIDTH:
            return False
        return all(_sdf_at(shape, px, py) > _ANCHOR_MARGIN + _VOID_HALF_WIDTH for px, py in anchors)

    def _sample_shape(self, rng: np.random.Generator, kind: str, *, lo: float, hi: float) -> _Shape:
        radius = float(rng.uniform(lo, hi)) * self._scale
        margin = 0.3 * radius
        cx, cy = rng.uniform(margin, self.size - 1 - margin, size=2)
        angle = float(rng.uniform(-math.pi, math.pi))
        if kind in ("square", "diamond", "cross", "triangle", "star", "hexagon"):
            angle *= 0.08  # near-upright: a rotated square is a diamond, a rotated star still a star
        aspect = float(rng.uniform(0.45, 0.65)) if kind == "ellipse" else float(rng.uniform(0.8, 1.6)) * self._scale
        return _Shape(kind, float(cx), float(cy), radius, angle, aspect)

    def _appearance(
        self, rng: np.random.Generator, label: int, base: tuple[float, float, float], texture: str, shape: _Shape
    ) -> _Object:
        colour = np.clip(np.array(base) * rng.uniform(0.85, 1.1) + rng.normal(0.0, 10.0, size=3), 0.0, 255.0)
        return _Object(
            label=label,
            shape=shape,
            colour=(float(colour[0]), float(colour[1]), float(colour[2])),
            texture=texture,
            period=float(rng.uniform(3.6, 5.6)) * self._scale,
            texture_angle=float(rng.uniform(-math.pi, math.pi)),
            phase=float(rng.uniform(0.0, 2.0 * math.pi)),
            shading=float(rng.uniform(-0.2, 0.2)),
        )

    def _sample_object(self, rng: np.random.Generator, label: int, shape: _Shape) -> _Object:
        spec = _CLASSES[label - 1]
        names = spec.colours or _COLOUR_NAMES
        base = _COLOURS[names[int(rng.integers(len(names)))]]
        return self._appearance(rng, label, base, spec.texture, shape)

    def _sample_distractor(self, rng: np.random.Generator) -> _Object:
        """A shape labelled background whose (shape, colour, texture) combination is not a class."""
        kind = _DISTRACTOR_SHAPES[int(rng.integers(len(_DISTRACTOR_SHAPES)))]
        shape = self._sample_shape(rng, kind, lo=3.0, hi=11.0)
        u = rng.random()
        texture = "plain"
        if u < 0.15:  # a texture on a shape that is no class with that texture (e.g. a dotted triangle)
            textures = [t for t in _TEXTURES if (kind, t) not in _TEXTURED_CLASS_PAIRS]
            texture = textures[int(rng.integers(len(textures)))]
            base = _TEXTURED_COLOURS[int(rng.integers(len(_TEXTURED_COLOURS)))]
        elif u < 0.45:  # a class colour on a shape that is no class in that colour (e.g. a red square)
            names = [c for c in _COLOURS if (kind, c) not in _PLAIN_CLASS_PAIRS]
            base = _COLOURS[names[int(rng.integers(len(names)))]]
        else:  # a muted colour
            base = _DISTRACTOR_COLOURS[int(rng.integers(len(_DISTRACTOR_COLOURS)))]
        return self._appearance(rng, 0, base, texture, shape)

    def _render(self, objects: list[_Object], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = self.size
        # Background: muted base colour + smooth 4x4 colour field + optional faint stripes.
        base = (rng.uniform(60.0, 190.0) + rng.normal(0.0, 20.0, size=(3, 1, 1))).astype(np.float32)
        coarse = (rng.normal(0.0, 20.0, size=(1, 4, 4)) + rng.normal(0.0, 12.0, size=(3, 4, 4))).astype(np.float32)
        up = self._upsample
        image = base + np.einsum("hi,cij,wj->chw", up, coarse, up, optimize=False).astype(np.float32)
        if rng.random() < 0.25:
            theta = rng.uniform(-math.pi, math.pi)
            period = rng.uniform(4.0, 9.0) * self._scale
            wave = np.sin((self._xs * math.cos(theta) + self._ys * math.sin(theta)) * (2 * math.pi / period))
            image = image + np.float32(rng.uniform(5.0, 12.0)) * wave.astype(np.float32)
        mask = np.zeros((size, size), dtype=np.int64)
        for obj in objects:
            self._paint(image, mask, obj)
        # Sensor noise, global contrast/brightness.
        image = image * np.float32(rng.uniform(0.85, 1.15)) + np.float32(rng.uniform(-15.0, 15.0))
        image = image + rng.normal(0.0, rng.uniform(4.0, 12.0), size=image.shape).astype(np.float32)
        return np.clip(image + 0.5, 0.0, 255.0).astype(np.uint8), mask

    def _paint(self, image: np.ndarray, mask: np.ndarray, obj: _Object) -> None:
        shape = obj.shape
        extent = 1.25 * shape.radius + 2.0
        x0, x1 = max(int(shape.cx - extent), 0), min(int(shape.cx + extent) + 2, self.size)
        y0, y1 = max(int(shape.cy - extent), 0), min(int(shape.cy + extent) + 2, self.size)
        if x0 >= x1 or y0 >= y1:
            return
        xs, ys = self._xs[:, x0:x1], self._ys[y0:y1, :]
        sdf = _sdf(shape, xs, ys)
        alpha = np.clip(np.float32(0.5) - sdf, 0.0, 1.0)
        colour = np.array(obj.colour, dtype=np.float32)[:, None, None]
        dx, dy = xs - np.float32(shape.cx), ys - np.float32(shape.cy)
        # Linear shading across the shape, as from a light source.
        light = np.float32(1.0) + np.float32(obj.shading / max(shape.radius, 1.0)) * (dx - dy) * np.float32(0.7)
        fill = colour * light[None]
        if obj.texture != "plain":
            c, s = np.float32(math.cos(obj.texture_angle)), np.float32(math.sin(obj.texture_angle))
            u, v = dx * c + dy * s, dy * c - dx * s
            p = np.float32(obj.period)
            if obj.texture == "stripes":
                on = np.sin(u * np.float32(2 * math.pi) / p + np.float32(obj.phase)) > 0
            elif obj.texture == "dots":
                fu = np.mod(u, p) - p / 2
                fv = np.mod(v, p) - p / 2
                on = fu * fu + fv * fv < (np.float32(0.3) * p) ** 2
            else:  # checks
                on = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
            fill = np.where(on[None], fill * np.float32(0.3), fill)
        region = image[:, y0:y1, x0:x1]
        region += alpha[None] * (fill - region)
        if obj.label == 0:
            return
        patch = mask[y0:y1, x0:x1]
        if self.void_border:
            patch[sdf <= -_VOID_HALF_WIDTH] = obj.label
            patch[np.abs(sdf) < _VOID_HALF_WIDTH] = 255
        else:
            patch[sdf <= 0] = obj.label


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of linear interpolation weights (align_corners=True)."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = pos - lo
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    mat[rows, lo] = 1.0 - frac
    mat[rows, lo + 1] = frac
    return mat


def _check_int(value: object, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
