"""The built-in offline dataset (docs/design.md#datasets): coloured shapes drawn on the fly, captions that say
exactly what is drawn, and the ground truth kept per sample so that features can be explained."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data.base import DatasetInfo, PairedDataset
from errors import UserError

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {  # shape colours
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "white": (255, 255, 255), "black": (0, 0, 0),
}
BACKGROUNDS = {  # same RGB as the shape colour of the same name; never the colour of a shape drawn on it
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
    "blue": COLOURS["blue"], "green": COLOURS["green"], "yellow": COLOURS["yellow"],
}
SIZES = {"small": 0.07, "large": 0.14}
"""Half extent of a shape, as a fraction of the image side."""
POSITIONS = {
    "top left": (0.18, 0.18), "top right": (0.82, 0.18), "bottom left": (0.18, 0.82),
    "bottom right": (0.82, 0.82), "center": (0.5, 0.5),
}
"""Shape centres (x, y) as fractions of the side: two large shapes never overlap and the corner
pixels are always background."""
POSITION_PHRASES = {
    "top left": ("at the top left", "in the top left corner"),
    "top right": ("at the top right", "in the top right corner"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
    "center": ("at the center", "in the middle"),
}
TEMPLATES = ("{shapes} on a {bg} background", "a {bg} background with {shapes}",
             "a picture of {shapes} on a {bg} background")
SUPERSAMPLE = 4
"""Shapes are drawn at 4x and box-filtered down: smooth edges, exact colours inside."""
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 128
    """Side of the square RGB images in pixels."""
    seed: int = 0
    """Sample i is drawn from its own RNG seeded with (seed, i), so it does not depend on N."""
    n_samples: int = 2000
    """Number of samples (--max_samples)."""
    offset: int = 0
    """First sample index: disjoint ranges are disjoint sets of samples (held-out data)."""
    where: tuple[str, ...] = ()
    """Attribute filters KEY=VALUE a sample must all have (shape=star: one of its shapes is a star)."""
    exclude: tuple[str, ...] = ()
    """Attribute filters a sample must have none of."""


FILTER_KEYS = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
               "background": tuple(BACKGROUNDS), "n_shapes": ("1", "2")}
"""--where / --exclude KEY=VALUE: what each key can be."""
SCAN_FACTOR = 200
"""A filtered shapes dataset scans at most this many candidates per sample asked for."""


def filter_attribute(spec: str) -> str:
    """KEY=VALUE -> the binary attribute it means (sample_attribute_names' spelling)."""
    key, _, value = spec.partition("=")
    if key not in FILTER_KEYS or value not in FILTER_KEYS[key]:
        raise UserError(f"unknown shapes attribute {spec!r}: use KEY=VALUE with "
                        + "; ".join(f"{k} in {', '.join(v)}" for k, v in FILTER_KEYS.items()))
    return {"background": f"bg:{value}", "n_shapes": "one shape" if value == "1" else "two shapes"}.get(key, value)


def draw_sample(seed: int, i: int) -> tuple[dict, str]:
    """Ground truth and caption of sample i, without rendering; stable across Python versions."""
    rng = random.Random(f"saeshare-shapes/{seed}/{i}")  # str seeds hash with sha512: version-stable

    def pick(seq):
        seq = list(seq)
        return seq[int(rng.random() * len(seq))]

    n_shapes = 1 if rng.random() < 0.5 else 2
    background = pick(BACKGROUNDS)
    free = list(POSITIONS)
    shapes = []
    for _ in range(n_shapes):
        position = pick(free)
        free.remove(position)
        shapes.append({"shape": pick(SHAPES), "colour": pick(c for c in COLOURS if c != background),
                       "size": pick(SIZES), "position": position})
    phrases = [f"a {s['size']} {s['colour']} {s['shape']} {pick(POSITION_PHRASES[s['position']])}"
               for s in shapes]
    caption = pick(TEMPLATES).format(shapes=" and ".join(phrases), bg=background)
    return {"n_shapes": n_shapes, "background": background, "shapes": shapes}, caption


def render(attrs: dict, image_size: int) -> Image.Image:
    """Draw the shapes of one sample's ground truth."""
    side = image_size * SUPERSAMPLE
    im = Image.new("RGB", (side, side), BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(im)
    for s in attrs["shapes"]:
        cx, cy = (f * side for f in POSITIONS[s["position"]])
        h = SIZES[s["size"]] * side
        fill = COLOURS[s["colour"]]
        kind = s["shape"]
        if kind == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif kind == "square":
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif kind == "triangle":
            draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
        elif kind == "diamond":
            draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
        elif kind == "star":
            angles = np.deg2rad(-90 + 36 * np.arange(10))
            radii = np.where(np.arange(10) % 2 == 0, h, 0.45 * h)
            draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=fill)
        elif kind == "cross":
            w = h / 3
            draw.rectangle((cx - h, cy - w, cx + h, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=fill)
        else:
            raise ValueError(f"unknown shape {kind!r}")
    return im.resize((image_size, image_size), Image.Resampling.BOX)


MAX_SAMPLES = 1_000_000
"""Beyond this, the in-memory ids, captions and attributes would cost gigabytes."""


class ShapesDataset(PairedDataset):
    """One or two coloured shapes per image; captions and attributes computed eagerly (cheap),
    images rendered on demand."""

    def __init__(self, config: ShapesConfig = ShapesConfig()):
        if config.image_size < MIN_IMAGE_SIZE:
            raise UserError(f"shapes: image_size must be at least {MIN_IMAGE_SIZE}, got {config.image_size}")
        if config.n_samples > MAX_SAMPLES:  # ids, captions and attributes are held in memory (~1 KB a sample)
            raise UserError(f"shapes makes at most {MAX_SAMPLES:,} samples, not {config.n_samples:,}")
        self.config = config
        self.name = "shapes"
        self.split = "default"
        index, drawn = self._select(config)
        # the seed is part of the ids: two seeds are two different sets of samples
        self.sample_ids = [f"seed{config.seed}/{i}" for i in index]
        self._attrs = [a for a, _ in drawn]
        self._captions = [c for _, c in drawn]

    @staticmethod
    def _select(config: ShapesConfig) -> tuple[list[int], list[tuple[dict, str]]]:
        """The first n_samples sample indices from `offset` on that pass the filters, with their draws."""
        want = {filter_attribute(w) for w in config.where}
        drop = {filter_attribute(w) for w in config.exclude}
        if not (want or drop):
            index = list(range(config.offset, config.offset + config.n_samples))
            return index, [draw_sample(config.seed, i) for i in index]
        index, drawn = [], []
        stop = config.offset + SCAN_FACTOR * config.n_samples
        for i in range(config.offset, stop):
            attrs, caption = draw_sample(config.seed, i)
            names = sample_attribute_names(attrs)
            if want <= names and not drop & names:
                index.append(i)
                drawn.append((attrs, caption))
                if len(index) == config.n_samples:
                    return index, drawn
        filters = " ".join([*(f"--where {w}" for w in config.where), *(f"--exclude {w}" for w in config.exclude)])
        raise UserError(f"shapes {filters}: {len(index)} of the {stop - config.offset:,} samples scanned match, "
                        f"fewer than the {config.n_samples:,} asked for" + (" (an empty set)" if not index else ""))

    def image(self, i: int) -> Image.Image:
        return render(self._attrs[self._check(i)], self.config.image_size)

    def caption(self, i: int) -> str:
        return self._captions[self._check(i)]

    def attributes(self, i: int) -> dict:
        a = self._attrs[self._check(i)]
        return {**a, "shapes": [dict(s) for s in a["shapes"]]}  # a copy: callers may mutate it

    def describe(self) -> DatasetInfo:
        c = self.config
        return dataclasses.replace(super().describe(), image_size=c.image_size, seed=c.seed, offset=c.offset or None,
                                   where=list(c.where) or None, exclude=list(c.exclude) or None)


def attribute_names() -> list[str]:
    """Binary attributes of a shapes sample, in matrix column order."""
    return [*COLOURS, *SHAPES, *SIZES, *POSITIONS, *(f"bg:{b}" for b in BACKGROUNDS),
            "one shape", "two shapes", *(f"{c} {s}" for c in COLOURS for s in SHAPES)]


def sample_attribute_names(attrs: dict) -> set[str]:
    """The binary attributes one sample has: "red" if any of its shapes is red, and so on."""
    names = {f"bg:{attrs['background']}", "one shape" if attrs["n_shapes"] == 1 else "two shapes"}
    for s in attrs["shapes"]:
        names |= {s["colour"], s["shape"], s["size"], s["position"], f"{s['colour']} {s['shape']}"}
    return names


def attribute_matrix(ds: PairedDataset) -> tuple[list[str], np.ndarray]:
    """(names, attrs_NA): attrs_NA[n, a] is True when sample n has attribute names[a]."""
    if not isinstance(ds, ShapesDataset):
        raise UserError(f"dataset {ds.name!r} has no ground-truth attributes (only --dataset shapes has)")
    names = attribute_names()
    col = {a: k for k, a in enumerate(names)}
    attrs_NA = np.zeros((len(ds), len(names)), dtype=bool)
    for n in range(len(ds)):
        attrs_NA[n, [col[a] for a in sample_attribute_names(ds.attributes(n))]] = True
    return names, attrs_NA
