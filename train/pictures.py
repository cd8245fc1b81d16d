"""The synthetic dataset's pictures, drawn with PIL from a `random.Random`: a shape centred on
a 112 px square (`single_shape`), anywhere on canvases of several sizes and aspect ratios
(`placed_shape`), 1-4 to a grid (`many_shapes`), a printed word (`printed_word`), a shape
sliding in one of four directions (`moving_shape`), and the pictures asked only where things
are (`grounding_picture`). Each comes with a dict of what is in it (kinds, colours, boxes in
pixels) from which `synthetic` writes the questions and answers."""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 200, 25),
    "purple": (140, 55, 190),
    "orange": (245, 135, 20),
}
WORDS = ("cat", "dog", "sun", "tree", "car", "book", "fish", "bird", "cup", "hat")
DIRECTIONS = ("left", "right", "up", "down")
SIZE = 112  # image side: 8x8 patches of 14 px, 16 visual tokens

# Canvases (width, height) a shape can be anywhere on; the processor resizes each within the
# demo's 112 x 112 pixel budget (640 x 480 and 320 x 240 become 112 x 84).
CANVASES = ((112, 112), (224, 224), (640, 480), (480, 640), (320, 240), (240, 320), (480, 320), (400, 300))


# ----------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4))
               for k in range(4)]
        r = r * 1.1
    elif shape == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3 - math.pi / 2), math.sin(angle + k * 2 * math.pi / 3 - math.pi / 2))
               for k in range(3)]
        r = r * 1.2
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = angle + k * math.pi / 5 - math.pi / 2
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        r = r * 1.25
    else:
        raise ValueError(shape)
    return [(cx + r * x, cy + r * y) for x, y in pts]


def shape_box(shape: str, cx: float, cy: float, r: float, angle: float, canvas: tuple[int, int]) -> list[float]:
    """The bounding box [x1, y1, x2, y2] in pixels of what draw_shape draws on a canvas of
    this (width, height), to 0.1 px: a corner past the edge is cut off there."""
    if shape == "circle":
        pts = [(cx - r, cy - r), (cx + r, cy + r)]
    else:
        pts = _polygon(shape, cx, cy, r, angle)
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    (w, h), clip = canvas, lambda v, hi: round(min(hi, max(0.0, v)), 1)  # noqa: E731
    return [clip(min(xs), w), clip(min(ys), h), clip(max(xs), w), clip(max(ys), h)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float,
               angle: float = 0.0) -> None:
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    base = [rng.randint(225, 255) for _ in range(3)]
    return Image.new("RGB", size, tuple(base))


def single_shape(rng: random.Random) -> tuple[Image.Image, dict]:
    """One shape of random kind, colour and size, near the centre. (A ViT this small learns
    shapes anywhere in the frame only slowly; near the centre it learns them in a few hundred
    steps.)"""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    img = _background(rng, (SIZE, SIZE))
    r = rng.uniform(20, 32)
    cx, cy = SIZE / 2 + rng.uniform(-8, 8), SIZE / 2 + rng.uniform(-8, 8)
    draw_shape(ImageDraw.Draw(img), shape, colour, cx, cy, r)
    return img, {"kind": "single", "shape": shape, "colour": colour, "count": 1, "canvas": [SIZE, SIZE],
                 "box": shape_box(shape, cx, cy, r, 0.0, (SIZE, SIZE))}


def placed_shape(rng: random.Random, off_centre: bool = False) -> tuple[Image.Image, dict]:
    """One shape anywhere on a canvas of random size and aspect ratio (CANVASES), its radius a
    share of the shorter side. `off_centre`: its centre at least a quarter of the shorter side
    away from the canvas centre."""
    w, h = rng.choice(CANVASES)
    side = min(w, h)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    img = _background(rng, (w, h))
    while True:  # (a large shape on a square canvas may have no off-centre place: draw again)
        r = side * rng.uniform(0.17, 0.24)  # at least 14 px in the demo's 112 x 84
        margin = r * 1.3 + 2
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        if not off_centre or math.hypot(cx - w / 2, cy - h / 2) >= side / 4:
            break
    angle = rng.uniform(-0.3, 0.3) if shape != "circle" else 0.0
    draw_shape(ImageDraw.Draw(img), shape, colour, cx, cy, r, angle)
    return img, {"kind": "placed", "shape": shape, "colour": colour, "count": 1, "canvas": [w, h], "centre": [cx, cy],
                 "box": shape_box(shape, cx, cy, r, angle, (w, h))}


# How often each count is drawn by many_shapes: two and three as often as four (one is asked
# about every single-shape image too).
COUNT_WEIGHTS = {1: 0.3, 2: 1.2, 3: 1.2, 4: 1.0}


def many_shapes(rng: random.Random, count: int | None = None,
                canvas: tuple[int, int] = (SIZE, SIZE)) -> tuple[Image.Image, dict]:
    """1-4 small shapes (random kinds and colours) on a 3x3 grid of cells of the canvas, so
    none overlap; sizes scale with the canvas's shorter side. info: their (shape, colour)
    `items` and `boxes` in reading order."""
    count = count or rng.choices(list(COUNT_WEIGHTS), weights=list(COUNT_WEIGHTS.values()))[0]
    w, h = canvas
    scale = min(w, h) / SIZE
    img = _background(rng, (w, h))
    draw = ImageDraw.Draw(img)
    items, boxes = [], []
    for c in sorted(rng.sample(range(9), count)):  # reading order, so captions list them predictably
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        r = rng.uniform(9, 13) * scale
        cx = (c % 3 + 0.5) * w / 3 + rng.uniform(-4, 4) * scale
        cy = (c // 3 + 0.5) * h / 3 + rng.uniform(-4, 4) * scale
        draw_shape(draw, shape, colour, cx, cy, r)
        items.append((shape, colour))
        boxes.append(shape_box(shape, cx, cy, r, 0.0, canvas))
    return img, {"kind": "many", "count": count, "items": items, "canvas": [w, h], "boxes": boxes}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def printed_word(rng: random.Random) -> tuple[Image.Image, dict]:
    word = rng.choice(WORDS)
    img = _background(rng, (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    font = _font(rng.randint(30, 40))
    box = draw.textbbox((0, 0), word, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    x = rng.uniform(2, max(3, SIZE - w - 2)) - box[0]
    y = rng.uniform(2, max(3, SIZE - h - 2)) - box[1]
    draw.text((x, y), word, fill=(20, 20, 20), font=font)
    return img, {"kind": "word", "word": word}


def moving_shape(rng: random.Random, frames: int = 8, direction: str | None = None) -> tuple[list[Image.Image], dict]:
    """A shape sliding across the frame (8 frames; at 4 fps that is 2 s, sampled to 4)."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    direction = direction or rng.choice(DIRECTIONS)
    r = rng.uniform(12, 18)
    bg = _background(rng, (SIZE, SIZE))
    fixed = rng.uniform(r + 4, SIZE - r - 4)
    lo, hi = r + 4, SIZE - r - 4
    out = []
    for k in range(frames):
        s = lo + (hi - lo) * k / (frames - 1)
        cx, cy = {"right": (s, fixed), "left": (SIZE - s, fixed), "down": (fixed, s), "up": (fixed, SIZE - s)}[direction]
        img = bg.copy()
        draw_shape(ImageDraw.Draw(img), shape, colour, cx, cy, r)
        out.append(img)
    return out, {"kind": "video", "shape": shape, "colour": colour, "direction": direction}


# ----------------------------------------------------------------------------- text


def grounding_picture(rng: random.Random, many: bool = False) -> tuple[Image.Image, dict]:
    """A picture drawn for where-questions alone, as the grounding rows of the eval draw
    them: a lone shape anywhere on a canvas (35%), or 2-4 shapes on a canvas of any of the
    sizes (65%); `many`: always 2-4 shapes."""
    if rng.random() < 0.35 and not many:
        return placed_shape(rng)
    return many_shapes(rng, count=rng.choice((2, 3, 4)), canvas=rng.choice(CANVASES))
