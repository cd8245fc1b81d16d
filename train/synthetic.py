"""A synthetic multimodal dataset: shapes, colours, counts, printed words, moving shapes.

Everything is drawn with PIL from a seed, so a dataset is reproducible and a held-out split is
just another seed. `write_dataset` writes the images (PNG), videos (MP4 when PyAV is installed,
otherwise a list of PNG frames) and three JSONL files in the chat-message format:

    stage1.jsonl  image/video-text pairs: one user turn [image, caption]       (stage 1)
    stage2.jsonl  captions + conversations asking all of an image's questions + videos (stage 2)
    stage3.jsonl  question/answer conversations (single and two-question)     (stage 3)
    eval.jsonl    held-out single questions with one-word answers, plus `task`/`answer`

Paths in the JSONL are relative to the file, as the training loader expects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
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
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
DIRECTIONS = ("left", "right", "up", "down")
SIZE = 112  # image side: 8x8 patches of 14 px, 16 visual tokens

SHAPE_QUESTIONS = ("What shape is this?", "What shape is in the image?", "Which shape do you see?")
COLOUR_QUESTIONS = ("What colour is the shape?", "What color is the shape?", "What colour is it?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes?", "Count the shapes.")
WORD_QUESTIONS = ("What word is written?", "What does the text say?")
MOTION_QUESTIONS = ("Which way is the shape moving?", "In which direction does the shape move?")

# Tasks with one-word answers the eval script scores.
EVAL_TASKS = ("shape", "colour", "count")


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
    return img, {"kind": "single", "shape": shape, "colour": colour, "count": 1}


def many_shapes(rng: random.Random, count: int | None = None) -> tuple[Image.Image, dict]:
    """1-4 small shapes (random kinds and colours) on a 3x3 grid of cells, so none overlap."""
    count = count or rng.randint(1, 4)
    img = _background(rng, (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    cell = SIZE / 3
    items = []
    for c in sorted(rng.sample(range(9), count)):  # reading order, so captions list them predictably
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        r = rng.uniform(9, 13)
        cx = (c % 3 + 0.5) * cell + rng.uniform(-4, 4)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-4, 4)
        draw_shape(draw, shape, colour, cx, cy, r)
        items.append((shape, colour))
    return img, {"kind": "many", "count": count, "items": items}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def printed_word(rng: random.Random) -> tuple[Image.Image, dict]:
    word = rng.choice(WORDS)
    img = _background(rng, (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    font = _font(rng.randint(26, 34))
    box = draw.textbbox((0, 0), word, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    x = rng.uniform(2, max(3, SIZE - w - 2)) - box[0]
    y = rng.uniform(2, max(3, SIZE - h - 2)) - box[1]
    draw.text((x, y), word, fill=(20, 20, 20), font=font)
    return img, {"kind": "word", "word": word}


def moving_shape(rng: random.Random, frames: int = 8) -> tuple[list[Image.Image], dict]:
    """A shape sliding across the frame (8 frames; at 4 fps that is 2 s, sampled to 4)."""
    shape, colour, direction = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(DIRECTIONS)
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
def caption(info: dict) -> str:
    kind = info["kind"]
    if kind == "single":
        return f"a {info['colour']} {info['shape']}"
    if kind == "many":
        n = info["count"]
        parts = [f"a {c} {s}" for s, c in info["items"]]
        listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {listed}"
    if kind == "word":
        return f"the word {info['word']}"
    if kind == "video":
        return f"a {info['colour']} {info['shape']} moving {info['direction']}"
    raise ValueError(kind)


def questions(info: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """(task, question, one-word answer) pairs the image answers."""
    kind = info["kind"]
    if kind == "single":
        return [("shape", rng.choice(SHAPE_QUESTIONS), info["shape"]),
                ("colour", rng.choice(COLOUR_QUESTIONS), info["colour"]),
                ("count", rng.choice(COUNT_QUESTIONS), "1")]
    if kind == "many":
        return [("count", rng.choice(COUNT_QUESTIONS), str(info["count"]))]
    if kind == "word":
        return [("word", rng.choice(WORD_QUESTIONS), info["word"])]
    if kind == "video":
        return [("motion", rng.choice(MOTION_QUESTIONS), info["direction"]),
                ("shape", rng.choice(SHAPE_QUESTIONS), info["shape"]),
                ("colour", rng.choice(COLOUR_QUESTIONS), info["colour"])]
    raise ValueError(kind)


# ----------------------------------------------------------------------------- files
def _write_video(frames: list[Image.Image], path: Path, fps: int = 4) -> str:
    """MP4 through PyAV when it is installed; otherwise a folder of PNG frames. Returns the
    JSONL `video` value (a path, or a list of frame paths) relative to path's parent."""
    try:
        import av  # noqa: PLC0415 - optional dependency
    except ImportError:
        av = None
    if av is not None:
        target = path.with_suffix(".mp4")
        with av.open(str(target), mode="w") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height = frames[0].size
            stream.pix_fmt = "yuv420p"
            stream.options = {"qscale": "2"}
            for im in frames:
                for packet in stream.encode(av.VideoFrame.from_image(im)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return target.name
    folder = path.with_suffix("")
    folder.mkdir(exist_ok=True)
    names = []
    for i, im in enumerate(frames):
        im.save(folder / f"{i}.png")
        names.append(f"{folder.name}/{i}.png")
    return names  # type: ignore[return-value]


def _user(items: list[dict]) -> dict:
    return {"role": "user", "content": items}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# Videos must keep their size: qwen-vl-utils' default video pixel budget would upscale them.
VIDEO_PIXELS = {"min_pixels": 56 * 56, "max_pixels": SIZE * SIZE}


@dataclasses.dataclass
class Counts:
    images: int = 6000
    videos: int = 60
    eval_per_task: int = 100


def _images(rng: random.Random, n: int) -> Iterator[tuple[Image.Image, dict]]:
    for i in range(n):
        u = rng.random()
        if u < 0.55:
            yield single_shape(rng)
        elif u < 0.88:
            yield many_shapes(rng)
        else:
            yield printed_word(rng)


def write_dataset(out: str | Path, seed: int = 0, counts: Counts | None = None) -> dict[str, Path]:
    """Writes images, videos and the stage/eval JSONL files under `out`; returns their paths."""
    counts = counts or Counts()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stage1, stage2, stage3 = [], [], []

    for i, (img, info) in enumerate(_images(rng, counts.images)):
        rel = f"images/{i:05d}.png"
        img.save(out / rel)
        image = {"type": "image", "image": rel}
        stage1.append([_user([image, {"type": "text", "text": caption(info)}])])
        qa = questions(info, rng)
        convs = [[_user([image, {"type": "text", "text": q}]), _assistant(a)] for _, q, a in qa]
        if len(qa) > 1:  # a two-question conversation: the second question has no image
            (_, q1, a1), (_, q2, a2) = rng.sample(qa, 2)
            convs.append([_user([image, {"type": "text", "text": q1}]), _assistant(a1),
                          _user([{"type": "text", "text": q2}]), _assistant(a2)])
        stage3.extend(convs)
        # Stage 2 asks everything an image answers in one conversation, so each image's
        # forward pass carries every label it has (or it is a caption pair).
        if rng.random() < 0.3:
            stage2.append(stage1[-1])
        else:
            qs = rng.sample(qa, len(qa))
            conv = [_user([image, {"type": "text", "text": qs[0][1]}]), _assistant(qs[0][2])]
            for _, q, a in qs[1:]:
                conv += [_user([{"type": "text", "text": q}]), _assistant(a)]
            stage2.append(conv)

    for i in range(counts.videos):
        frames, info = moving_shape(rng)
        src = _write_video(frames, out / "videos" / f"{i:04d}")
        src = f"videos/{src}" if isinstance(src, str) else [f"videos/{s}" for s in src]
        video = {"type": "video", "video": src, **VIDEO_PIXELS}
        stage1.append([_user([video, {"type": "text", "text": caption(info)}])])
        for _, q, a in questions(info, rng):
            conv = [_user([video, {"type": "text", "text": q}]), _assistant(a)]
            stage3.append(conv)
            stage2.append(conv)
        stage2.append(stage1[-1])

    eval_rows = []
    erng = random.Random(seed + 7919)  # held out: images never seen in training
    (out / "eval").mkdir(exist_ok=True)
    makers = {"shape": single_shape, "colour": single_shape, "count": many_shapes}
    for task in EVAL_TASKS:
        for i in range(counts.eval_per_task):
            img, info = makers[task](erng)
            rel = f"eval/{task}_{i:04d}.png"
            img.save(out / rel)
            (_, q, a), = [x for x in questions(info, erng) if x[0] == task]
            eval_rows.append({"task": task, "answer": a,
                              "messages": [_user([{"type": "image", "image": rel}, {"type": "text", "text": q}])]})

    paths = {}
    for name, rows in (("stage1", stage1), ("stage2", stage2), ("stage3", stage3)):
        random.Random(seed + len(name)).shuffle(rows)
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    paths["eval"] = out / "eval.jsonl"
    paths["eval"].write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return paths


def corpus(seed: int = 0, n: int = 2000) -> Iterator[str]:
    """Text in the dataset's distribution, to train a tokenizer on."""
    rng = random.Random(seed)
    for _ in range(n):
        u = rng.random()
        info = (single_shape if u < 0.4 else many_shapes if u < 0.8 else printed_word)(rng)[1]
        yield caption(info)
        for _, q, a in questions(info, rng):
            yield f"{q} {a}"
    for d in DIRECTIONS:
        for s in SHAPES:
            yield f"a {s} moving {d}"
    yield from MOTION_QUESTIONS
    yield "You are a helpful assistant."


def make_example_image(path: str | Path, seed: int = 3) -> dict:
    """The README's example: one shape on a plain background."""
    img, info = single_shape(random.Random(seed))
    img.save(path)
    return info


def image_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))
