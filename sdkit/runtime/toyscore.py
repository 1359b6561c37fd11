"""The toy world the fixture models are trained on, and a scorer for what they draw.

The toy text-to-image models under `fixtures/toy/` learn to draw one coloured shape on a
plain background from captions such as "a red circle". This module is the single source
of that world: the palette, the shapes, the caption templates, the renderer that makes
the training pictures, and `score_image`, which reads a picture back and says which
colour and shape it shows — so end-to-end tests can check that a model (or a merge, a
LoRA, a converted file) still draws what it is asked.

The scorer is plain pixel statistics, no learned parts:
- the background is the median colour of the image border;
- the foreground is every pixel far from it (threshold halfway to the far end of the
  distance distribution, so faint and strong shapes both separate);
- the colour is the palette colour nearest in hue to the median foreground pixel;
- the shape is the template (rendered by the same code as the data) with the best
  intersection-over-union against the largest foreground blob, both scaled to its box.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sdkit.errors import SdkitError

# Shape colours, chosen about 50-60 degrees apart in hue so that nearest-hue reads them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 210, 0),
    "green": (30, 170, 50),
    "cyan": (20, 190, 210),
    "blue": (30, 60, 220),
    "purple": (150, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Plain backgrounds: the base models see light ones; the "b" fine-tune sees dark ones.
LIGHT_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (215, 215, 215),
}
DARK_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark grey": (45, 45, 45),
}

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
    "{colour} {shape}",
)

IMAGE_SIZE = 32
MIN_SHAPE_SIZE = 12
MAX_SHAPE_SIZE = 22
_SUPERSAMPLE = 4
_TEMPLATE_SIZE = 24
_MIN_FOREGROUND_DISTANCE = 40.0  # below this the picture is taken as blank
_SHAPE_SOFTMAX_TEMPERATURE = 0.05


@dataclass(frozen=True)
class Scene:
    """One training picture: what is drawn, where, and the caption that says so."""

    colour: str
    shape: str
    background: tuple[int, int, int]
    size: int
    left: int
    top: int
    caption: str


@dataclass(frozen=True)
class ToyScore:
    """What `score_image` read from a picture; colour/shape are None on a blank picture."""

    colour: str | None
    shape: str | None
    colour_confidence: float
    shape_confidence: float
    foreground_fraction: float


def caption_for(colour: str, shape: str, template_index: int = 0) -> str:
    """The caption of a scene under one of CAPTION_TEMPLATES."""
    return CAPTION_TEMPLATES[template_index].format(colour=colour, shape=shape)


def random_scene(rng: random.Random,
                 backgrounds: dict[str, tuple[int, int, int]] = LIGHT_BACKGROUNDS) -> Scene:
    """Draw a random scene: colour, shape, background, size and position jitter, caption."""
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    background = backgrounds[rng.choice(sorted(backgrounds))]
    size = rng.randint(MIN_SHAPE_SIZE, MAX_SHAPE_SIZE)
    margin = 2  # keep the border clean: the scorer reads the background there
    left = rng.randint(margin, IMAGE_SIZE - margin - size)
    top = rng.randint(margin, IMAGE_SIZE - margin - size)
    caption = caption_for(colour, shape, rng.randrange(len(CAPTION_TEMPLATES)))
    return Scene(colour, shape, background, size, left, top, caption)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: Any) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif shape == "cross":
        third_w, third_h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + third_w, y0, x1 - third_w, y1), fill=fill)
        draw.rectangle((x0, y0 + third_h, x1, y1 - third_h), fill=fill)
    else:
        raise SdkitError(f"toy scene: unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def render_scene(scene: Scene) -> Image.Image:
    """Render a scene as an anti-aliased IMAGE_SIZE² RGB picture (drawn 4× larger, reduced)."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    box = (scene.left * _SUPERSAMPLE, scene.top * _SUPERSAMPLE,
           (scene.left + scene.size) * _SUPERSAMPLE - 1, (scene.top + scene.size) * _SUPERSAMPLE - 1)
    _draw_shape(ImageDraw.Draw(image), scene.shape, box, COLOURS[scene.colour])
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def write_concept_pictures(folder: Path, colour: str, shape: str, caption: str, count: int = 16,
                           seed: int = 0) -> Path:
    """A training folder for a new concept: `count` pictures of one coloured shape at
    random sizes and places on light backgrounds, each with `caption` in a `.txt` beside it."""
    if colour not in COLOURS or shape not in SHAPES:
        raise SdkitError(f"toy concept: colour one of {', '.join(COLOURS)}, shape one of {', '.join(SHAPES)}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        size = rng.randint(12, 22)
        left, top = rng.randint(2, IMAGE_SIZE - 2 - size), rng.randint(2, IMAGE_SIZE - 2 - size)
        background = LIGHT_BACKGROUNDS[rng.choice(sorted(LIGHT_BACKGROUNDS))]
        render_scene(Scene(colour, shape, background, size, left, top, caption)).save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(caption)
    return folder


def _shape_templates() -> dict[str, np.ndarray]:
    """Each shape filling a square box, as a boolean mask: what a blob is compared with."""
    big = _TEMPLATE_SIZE * _SUPERSAMPLE
    templates = {}
    for shape in SHAPES:
        mask = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, (0, 0, big - 1, big - 1), 255)
        small = mask.resize((_TEMPLATE_SIZE, _TEMPLATE_SIZE), Image.Resampling.BOX)
        templates[shape] = np.asarray(small) >= 128
    return templates


_TEMPLATES = _shape_templates()
_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360
                 for name, rgb in COLOURS.items()}


def _as_rgb_array(img: Any) -> np.ndarray:
    """Any picture form a pipeline or a test hands over -> uint8 array (H, W, 3)."""
    if isinstance(img, (str, Path)):
        try:
            img = Image.open(img)
        except OSError as exc:
            raise SdkitError(f"{img}: not a readable image ({exc})") from None
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    if hasattr(img, "detach"):  # torch tensor, imported lazily by whoever made it
        img = img.detach().float().cpu().numpy()
    if not isinstance(img, np.ndarray):
        raise SdkitError(f"score_image: cannot read a picture from {type(img).__name__}")
    return _array_to_rgb(img)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    while array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise SdkitError(f"score_image: expected one RGB picture, got an array of shape {array.shape}")
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.shape[-1] != 3:
        raise SdkitError(f"score_image: expected 3 colour channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    if array.min() < -0.01:  # pipelines' [-1, 1] range
        array = (array + 1) / 2
    return (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (pictures are tiny: plain BFS)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, next_label = 0, 0, 1
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        labels[start] = next_label
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = next_label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = next_label, size
        next_label += 1
    return labels == best_label


def _read_colour(pixels: np.ndarray) -> tuple[str, float]:
    """Nearest palette hue to the median foreground pixel; confidence from the hue margin
    over the runner-up, damped when the pixel is too grey for its hue to mean much."""
    r, g, b = (np.median(pixels, axis=0) / 255).tolist()
    hue, saturation, _ = colorsys.rgb_to_hsv(r, g, b)
    distances = {name: min(abs(hue * 360 - h), 360 - abs(hue * 360 - h))
                 for name, h in _PALETTE_HUES.items()}
    first, second = sorted(distances, key=distances.get)[:2]
    margin = distances[second] / (distances[first] + distances[second] + 1e-6)
    return first, float(margin * min(1.0, saturation / 0.35))


def _read_shape(blob: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(blob)
    crop = blob[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scaled = Image.fromarray(crop.astype(np.uint8) * 255).resize(
        (_TEMPLATE_SIZE, _TEMPLATE_SIZE), Image.Resampling.BILINEAR)
    blob_mask = np.asarray(scaled) >= 128
    ious = {}
    for shape, template in _TEMPLATES.items():
        union = np.logical_or(blob_mask, template).sum()
        ious[shape] = float(np.logical_and(blob_mask, template).sum() / max(union, 1))
    weights = np.exp(np.array(list(ious.values())) / _SHAPE_SOFTMAX_TEMPERATURE)
    best = max(ious, key=ious.get)
    return best, float(weights.max() / weights.sum())


def score_image(img: Any) -> ToyScore:
    """Which palette colour and which shape a toy picture shows, with confidences in [0, 1].

    `img`: PIL image, path, uint8 array (H, W, 3), or float array/tensor in [0, 1] or
    [-1, 1], HWC or CHW, with or without a batch axis of 1.
    """
    rgb = _as_rgb_array(img).astype(np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background, axis=-1)
    far = float(np.percentile(distance, 99))
    if far < _MIN_FOREGROUND_DISTANCE:
        return ToyScore(None, None, 0.0, 0.0, 0.0)
    mask = distance > far / 2
    core = distance > far * 0.75  # away from anti-aliased edges, where colours blend
    colour, colour_confidence = _read_colour(rgb[core])
    shape, shape_confidence = _read_shape(_largest_blob(mask))
    return ToyScore(colour, shape, colour_confidence, shape_confidence, float(mask.mean()))
