"""Grounding markup: the boxes and quads Qwen2-VL writes in its answers, found, checked and
converted between its coordinate grid and pixels of the image as the user gave it.

Asked where something is, the model answers with special tokens around a label and its boxes:

    <|object_ref_start|>the red car<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>

One label may be followed by several boxes; `<|quad_start|>(x1,y1),...,(x4,y4)<|quad_end|>`
gives a four-cornered polygon instead. Qwen2-VL's coordinates are integers on a [0, 1000) grid
over the whole image whatever its size (Qwen2.5-VL later switched to pixels of the resized
image; this module is for Qwen2-VL's convention), so pixel = value * size / 1000.

Parsing never raises for what the model wrote: a box cut off by max_tokens, numbers out of the
grid or corners out of order become `Problem`s beside the regions that did parse. Host side,
no numpy or jax.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
QUAD_START, QUAD_END = "<|quad_start|>", "<|quad_end|>"
MARKERS = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
GRID = 1000  # coordinates are integers in [0, GRID]; the model writes GRID - 1 at most

_MARKER = re.compile("|".join(re.escape(m) for m in MARKERS))
_POINT = re.compile(r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")
_BETWEEN = re.compile(r"[\s,;]*")  # what may separate a label from its boxes, or two boxes
_PROBLEM_QUOTE = 40  # characters of the model's text quoted in a problem


@dataclasses.dataclass(frozen=True)
class Region:
    """One box (2 corners: top-left, bottom-right) or quad (4 points), on the model's grid."""

    label: str | None  # the object_ref text before it; None when the box stands alone
    kind: str  # "box" or "quad"
    points: tuple[tuple[float, float], ...]
    span: tuple[int, int]  # where its markup is in the text (start, end)

    def to_pixels(self, width: int, height: int) -> tuple[tuple[float, float], ...]:
        return tuple(grid_to_pixels(x, y, width, height) for x, y in self.points)

    def box_pixels(self, width: int, height: int) -> list[float]:
        """[x1, y1, x2, y2] in pixels of a width x height image (a quad's bounding box)."""
        pts = self.to_pixels(width, height)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return [min(xs), min(ys), max(xs), max(ys)]


@dataclasses.dataclass(frozen=True)
class Problem:
    """Markup that could not be read as a region: where it starts and what is wrong."""

    message: str
    at: int  # character offset in the text


@dataclasses.dataclass(frozen=True)
class Grounding:
    regions: tuple[Region, ...]
    problems: tuple[Problem, ...]


def grid_to_pixels(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    return (x * width / GRID, y * height / GRID)


def pixels_to_grid(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """Pixel coordinates -> the model's integer grid, clamped to [0, GRID - 1] (what a training
    target writes)."""
    def one(v: float, size: int) -> int:
        return min(GRID - 1, max(0, int(round(v / size * GRID))))
    return (one(x, width), one(y, height))


def _quote(text: str) -> str:
    return repr(text if len(text) <= _PROBLEM_QUOTE else text[:_PROBLEM_QUOTE] + "...")


def parse(text: str) -> Grounding:
    """Every region of the markup in `text`, in order, and every problem met."""
    regions: list[Region] = []
    problems: list[Problem] = []
    label: str | None = None
    label_end = -1  # where the text after the label (or its last box) starts
    markers = list(_MARKER.finditer(text))
    i = 0
    while i < len(markers):
        m = markers[i]
        token = m.group()
        if token == REF_START:
            nxt = markers[i + 1] if i + 1 < len(markers) else None
            if nxt is None or nxt.group() != REF_END:
                problems.append(Problem("a label is not closed (<|object_ref_end|> missing)", m.start()))
                label, i = None, i + 1
                continue
            label, label_end, i = text[m.end():nxt.start()].strip(), nxt.end(), i + 2
            continue
        if token in (BOX_START, QUAD_START):
            kind, close = ("box", BOX_END) if token == BOX_START else ("quad", QUAD_END)
            nxt = markers[i + 1] if i + 1 < len(markers) else None
            if nxt is None or nxt.group() != close:
                problems.append(Problem(f"a {kind} is not closed ({close} missing: cut off?)", m.start()))
                i += 1
                continue
            body = text[m.end():nxt.start()]
            owner = label if label is not None and _BETWEEN.fullmatch(text[label_end:m.start()]) else None
            region, problem = _region(body, kind, owner, (m.start(), nxt.end()))
            if problem is not None:
                problems.append(problem)
            else:
                regions.append(region)
            if owner is not None:
                label_end = nxt.end()  # a following box keeps the label
            else:
                label = None
            i += 2
            continue
        problems.append(Problem(f"{token} without its opening marker", m.start()))
        i += 1
    return Grounding(tuple(regions), tuple(problems))


def _region(body: str, kind: str, label: str | None, span: tuple[int, int]) -> tuple[Region | None, Problem | None]:
    want = 2 if kind == "box" else 4
    points = _POINT.findall(body)
    leftover = _POINT.sub("", body).replace(",", "").strip()
    if len(points) != want or leftover:
        return None, Problem(f"a {kind} needs {want} points (x,y); got {_quote(body)}", span[0])
    pts = tuple((float(x), float(y)) for x, y in points)
    if any(not (0 <= v <= GRID) for p in pts for v in p):
        return None, Problem(f"a {kind}'s coordinates are outside 0..{GRID}: {_quote(body)}", span[0])
    if kind == "box":
        (x1, y1), (x2, y2) = pts
        if x2 < x1 or y2 < y1:
            return None, Problem(f"a box's corners are out of order: {_quote(body)}", span[0])
    return Region(label, kind, pts, span), None


def boxes(text: str, width: int, height: int) -> tuple[list[dict], list[str]]:
    """The regions of `text` as [{"label", "box": [x1, y1, x2, y2]}] in pixels of a width x
    height image (boxes rounded to a tenth of a pixel), and the problems as lines."""
    g = parse(text)
    out = []
    for r in g.regions:
        entry = {"label": r.label, "box": [round(v, 1) for v in r.box_pixels(width, height)]}
        if r.kind == "quad":
            entry["quad"] = [[round(x, 1), round(y, 1)] for x, y in r.to_pixels(width, height)]
        out.append(entry)
    return out, [f"at character {p.at}: {p.message}" for p in g.problems]


def box_markup(label: str | None, box: Sequence[float], width: int, height: int) -> str:
    """The markup for one labelled box given in pixels [x1, y1, x2, y2] of a width x height
    image (for training targets): the inverse of `boxes` up to the grid's rounding."""
    x1, y1, x2, y2 = box
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise ValueError(f"box {list(box)} is not inside a {width}x{height} image with x1 <= x2 and y1 <= y2")
    (a, b), (c, d) = pixels_to_grid(x1, y1, width, height), pixels_to_grid(x2, y2, width, height)
    ref = "" if label is None else f"{REF_START}{label}{REF_END}"
    return f"{ref}{BOX_START}({a},{b}),({c},{d}){BOX_END}"


def strip_markup(text: str) -> str:
    """The text without grounding markers (labels kept, boxes dropped): what a reader sees."""
    text = re.sub(re.escape(BOX_START) + r".*?" + re.escape(BOX_END), "", text, flags=re.S)
    text = re.sub(re.escape(QUAD_START) + r".*?" + re.escape(QUAD_END), "", text, flags=re.S)
    return text.replace(REF_START, "").replace(REF_END, "")


def boxes_for_images(text: str, sizes: Sequence[tuple[int, int]]) -> tuple[list[dict], list[str]]:
    """The regions of `text` for a conversation that showed images of these (width, height)
    sizes, in order: [{"label", "grid": [x1, y1, x2, y2] as the model wrote it, "box": the same
    in pixels, "image": index into sizes}] (and "quad" for a quad), and the problems as lines.

    Qwen2-VL's coordinates do not say which image they are on; they are read against the last
    image shown (the one a question is usually about; give the image asked about last). Without
    an image there are no pixels: entries carry the grid only."""
    g = parse(text)
    out = []
    for r in g.regions:
        xs, ys = [p[0] for p in r.points], [p[1] for p in r.points]
        entry: dict = {"label": r.label, "grid": [min(xs), min(ys), max(xs), max(ys)]}
        entry["grid"] = [int(v) if float(v).is_integer() else v for v in entry["grid"]]
        if sizes:
            index = len(sizes) - 1
            width, height = sizes[index]
            entry["box"] = [round(v, 1) for v in r.box_pixels(width, height)]
            entry["image"] = index
            if r.kind == "quad":
                entry["quad"] = [[round(x, 1), round(y, 1)] for x, y in r.to_pixels(width, height)]
        out.append(entry)
    return out, [f"at character {p.at}: {p.message}" for p in g.problems]


# Outline colours, one per label in turn (distinct on photos and on flat synthetic images).
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0))


def draw(image, found: Sequence[dict]):
    """A copy of the PIL `image` (RGB) with each entry of `found` ({"label", "box" in pixels})
    outlined and labelled; one colour per label."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB")
    pen = ImageDraw.Draw(out)
    line = max(2, round(min(out.size) / 160))
    try:
        font = ImageFont.load_default(size=max(11, round(min(out.size) / 28)))
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    colours: dict = {}
    for entry in found:
        if "box" not in entry:
            continue
        colour = colours.setdefault(entry.get("label"), PALETTE[len(colours) % len(PALETTE)])
        x1, y1, x2, y2 = entry["box"]
        if "quad" in entry:
            pen.polygon([tuple(p) for p in entry["quad"]], outline=colour, width=line)
        else:
            pen.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        if entry.get("label"):
            left, top, right, bottom = pen.textbbox((0, 0), entry["label"], font=font)
            tw, th = right - left + 2 * line, bottom - top + 2 * line
            ty = y1 - th if y1 - th >= 0 else min(y1 + line, max(0, out.height - th))
            pen.rectangle([x1, ty, x1 + tw, ty + th], fill=colour)
            pen.text((x1 + line - left, ty + line - top), entry["label"], fill=(255, 255, 255), font=font)
    return out


def label_markup(label: str | None, boxes: Sequence[Sequence[float]], width: int, height: int) -> str:
    """One label and its boxes, each [x1, y1, x2, y2] in pixels of a width x height image, as
    the model writes them (the label once, then every box): a training target."""
    if not boxes:
        raise ValueError("no box given")
    ref = "" if label is None else f"{REF_START}{label}{REF_END}"
    return ref + "".join(box_markup(None, box, width, height) for box in boxes)
