"""A synthetic multimodal dataset: shapes, colours, counts, printed words, moving shapes, where
a shape is (a grounding box), and questions about none of these (answered with one fixed
sentence).

Everything is drawn with PIL from a seed, so a dataset is reproducible and a held-out split is
just another seed. `write_dataset` writes the images (PNG), videos (MP4 when PyAV is installed,
otherwise a list of PNG frames) and three JSONL files in the chat-message format:

    stage1.jsonl  image/video-text pairs: one user turn [image, caption]       (stage 1)
    stage2.jsonl  captions + conversations asking all of an image's questions + videos (stage 2)
    stage3.jsonl  question/answer conversations (single and two-question)     (stage 3)
    eval.jsonl    held-out single questions, one per row, plus `task`/`answer` (and for a
                  grounding question the shape's `box` in pixels of its `canvas` [w, h])

Shapes come centred on a 112 px square (`single_shape`, the example image), anywhere on
canvases of several sizes and aspect ratios (`placed_shape`; the processor resizes them within
the demo's pixel budget), 1-4 to a grid (`many_shapes`, 2 and 3 as often as 4), as printed
words, and sliding in one of four directions in short videos (equally many each way).
Asked where a shape is ("Where is the circle?", or "Where is the red circle?" among several),
the answer is Qwen2-VL's grounding markup for the shape's bounding box on the image as stored:
an assistant item {"type": "box", "label", "box"} in pixels, which the training loader writes
as `<|object_ref_start|>the circle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`.

Paths in the JSONL are relative to the file, as the training loader expects. From a shell:

    python -m qwen2vl_jax.train.synthetic OUT [--images N] [--videos N] [--eval-per-task N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from qwen2vl_jax import shell
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.grounding import label_markup
from qwen2vl_jax.train.pictures import (CANVASES, DIRECTIONS, SHAPES, SIZE, grounding_picture, many_shapes, moving_shape,
                                        placed_shape, printed_word, single_shape)
from qwen2vl_jax.train.pictures import COLOURS, WORDS, draw_shape  # noqa: F401 - the dataset's vocabulary, read from here too

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

SHAPE_QUESTIONS = ("What shape is this?", "What shape is in the image?", "Which shape do you see?")
COLOUR_QUESTIONS = ("What colour is the shape?", "What color is the shape?", "What colour is it?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes?", "Count the shapes.")
WORD_QUESTIONS = ("What word is written?", "What does the text say?")
MOTION_QUESTIONS = ("Which way is the shape moving?", "In which direction does the shape move?")
WHERE_QUESTIONS = ("Where is the {}?", "Where is the {} in the image?")

OTHER_ANSWER = "I can only answer questions about shapes, colours, counts, words and motion."
# Questions about none of the above, made from templates and fillers; the held-out ones are
# combinations training never asks.
OTHER_TEMPLATES = (
    "What is the capital of {place}?", "How far away is {place}?", "What language do people speak in {place}?",
    "Tell me a {kind} about {topic}.", "Write a {kind} about {topic}.", "Can you explain {topic}?",
    "What do you think about {topic}?", "How do I get better at {topic}?", "Why do people like {topic}?",
    "What is the best book about {topic}?", "Who invented {thing}?", "How does a {thing} work?",
    "Where can I buy a {thing}?", "How much does a {thing} cost?", "Is the person in the picture happy?",
    "What time is it?", "Hello!", "Who are you?", "What is the weather like today?", "Translate {topic} into French.",
    "What is {a} plus {b}?", "Summarize this article for me.", "Describe the people in the photo.",
)
OTHER_FILLERS = {
    "place": ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Spain", "Kenya", "Peru", "Norway",
              "Mexico", "Italy", "Chile", "Germany", "Vietnam", "Ghana"),
    "kind": ("story", "joke", "poem", "song", "riddle"),
    "topic": ("history", "music", "football", "cooking", "the ocean", "computers", "physics", "money",
              "chess", "gardening", "the moon", "dinosaurs", "painting", "the weather", "trains", "birthdays"),
    "thing": ("telephone", "bicycle", "camera", "piano", "radio", "clock", "rocket", "printer", "lamp", "engine"),
    "a": tuple(str(i) for i in range(2, 30)),
    "b": tuple(str(i) for i in range(2, 30)),
}

# Question types the eval script scores, each with its own held-out rows.
# "where": one shape anywhere on a canvas; "wheremany": one of 2-4 shapes, named by colour and
# shape. Their answers are grounding boxes, scored by IoU (train/eval.py).
EVAL_TASKS = ("shape", "colour", "count", "word", "motion", "offcentre", "other", "where", "wheremany")
GROUNDING_TASKS = ("where", "wheremany")



def other_question(rng: random.Random) -> str:
    """A question about none of the things the dataset shows."""
    template = rng.choice(OTHER_TEMPLATES)
    return template.format(**{k: rng.choice(v) for k, v in OTHER_FILLERS.items()})


def caption(info: dict) -> str:
    kind = info["kind"]
    if kind in ("single", "placed"):
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
    if kind in ("single", "placed"):
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


def where_question(info: dict, rng: random.Random) -> tuple[str, str, dict] | None:
    """("where" or "wheremany", a question asking where a shape is, the answer's box item in
    pixels of the image) for a picture of shapes; None when no shape can be named uniquely.
    Alone, a shape is named by its kind ("the circle"); among several, by colour and kind, and
    only one whose colour and kind no other shape shares is asked about."""
    kind = info["kind"]
    if kind in ("single", "placed"):
        task, ref, box = "where", info["shape"], info["box"]
    elif kind == "many":
        pairs = list(zip(info["items"], info["boxes"]))
        if len(pairs) == 1:
            task, ref, box = "where", pairs[0][0][0], pairs[0][1]
        else:
            unique = [(s, c, b) for (s, c), b in pairs if info["items"].count((s, c)) == 1]
            if not unique:
                return None
            shape, colour, box = rng.choice(unique)
            task, ref = "wheremany", f"{colour} {shape}"
    else:
        return None
    return task, rng.choice(WHERE_QUESTIONS).format(ref), {"type": "box", "label": f"the {ref}", "box": list(box)}


def where_all(info: dict, rng: random.Random, parts: bool = False) -> list[tuple[str, str, dict]]:
    """Every where-question a picture of shapes answers, in random order: its lone shape's, or
    each of several shapes' that no other shares its colour and kind (as where_question asks
    them). `parts`: among several, also each shape by its colour alone ("Where is the red
    shape?") when no other shares its colour, and by its kind alone ("Where is the circle?")
    when no other shares its kind (task "wherepart")."""
    if info["kind"] != "many" or info["count"] == 1:
        one = where_question(info, rng)
        return [] if one is None else [one]
    out = []
    for (shape, colour), box in zip(info["items"], info["boxes"]):
        if info["items"].count((shape, colour)) == 1:
            ref = f"{colour} {shape}"
            out.append(("wheremany", rng.choice(WHERE_QUESTIONS).format(ref),
                        {"type": "box", "label": f"the {ref}", "box": list(box)}))
        if parts:
            for ref, alone in ((f"{colour} shape", [c for _, c in info["items"]].count(colour) == 1),
                               (shape, [k for k, _ in info["items"]].count(shape) == 1)):
                if alone:
                    out.append(("wherepart", rng.choice(WHERE_QUESTIONS).format(ref),
                                {"type": "box", "label": f"the {ref}", "box": list(box)}))
    rng.shuffle(out)
    return out


def where_answer(item: dict, canvas: tuple[int, int]) -> str:
    """The markup a box item becomes on a width x height image (what the model should write)."""
    return label_markup(item["label"], [item["box"]], *canvas)


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


def _assistant(answer: str | dict) -> dict:
    """An assistant turn: a text answer, or a box item."""
    return {"role": "assistant", "content": [answer if isinstance(answer, dict) else {"type": "text", "text": answer}]}


# Videos must keep their size: qwen-vl-utils' default video pixel budget would upscale them.
VIDEO_PIXELS = {"min_pixels": 56 * 56, "max_pixels": SIZE * SIZE}


@dataclasses.dataclass
class Counts:
    images: int = 8000
    videos: int = 1200  # equally many in each direction
    # questions about none of the dataset's things, half with an image (None: 3/16 of `images`)
    other: int | None = None
    eval_per_task: int = 100
    # extra pictures of shapes asked only where things are (grounding_picture): one
    # conversation asking where each nameable shape is, in stages 2 and 3
    grounding: int = 0
    grounding_many: bool = False  # the grounding pictures all of 2-4 shapes (none of a lone one)
    # among several shapes, also ask each by its colour alone and by its kind alone where unique
    grounding_parts: bool = False

    def __post_init__(self):
        if self.other is None:
            self.other = self.images * 3 // 16


def _images(rng: random.Random, n: int) -> Iterator[tuple[Image.Image, dict]]:
    for i in range(n):
        u = rng.random()
        if u < 0.25:
            yield single_shape(rng)
        elif u < 0.55:
            yield placed_shape(rng)
        elif u < 0.80:
            yield many_shapes(rng, canvas=rng.choice(CANVASES) if rng.random() < 0.3 else (SIZE, SIZE))
        else:
            yield printed_word(rng)


def _conversation(media: dict | None, qa: list[tuple[str, str, str | dict]]) -> list[dict]:
    """One conversation asking the questions in order; the media goes with the first."""
    conv = []
    for k, (_, q, a) in enumerate(qa):
        conv += [_user(([media] if media and k == 0 else []) + [{"type": "text", "text": q}]), _assistant(a)]
    return conv


def _media(out: Path, rel: str, item: Image.Image | list[Image.Image]) -> dict:
    """Saves an image or a video under `out` and returns its message item."""
    if isinstance(item, list):
        src = _write_video(item, out / rel)
        src = f"{Path(rel).parent}/{src}" if isinstance(src, str) else [f"{Path(rel).parent}/{x}" for x in src]
        return {"type": "video", "video": src, **VIDEO_PIXELS}
    item.save(out / rel)
    return {"type": "image", "image": rel}


def eval_example(task: str, i: int, rng: random.Random) -> tuple[Image.Image | list[Image.Image] | None, dict]:
    """The i-th held-out example of a task: (an image, video frames or None; info). Counts and
    directions take turns so each is equally represented."""
    if task in ("shape", "colour"):
        return single_shape(rng)
    if task == "offcentre":
        return placed_shape(rng, off_centre=True)
    if task == "count":
        return many_shapes(rng, count=1 + i % 4, canvas=rng.choice(CANVASES) if i % 3 == 0 else (SIZE, SIZE))
    if task == "word":
        return printed_word(rng)
    if task == "motion":
        return moving_shape(rng, direction=DIRECTIONS[i % len(DIRECTIONS)])
    if task == "other":
        return (single_shape(rng)[0] if i % 2 == 0 else None), {"kind": "other"}
    if task == "where":
        return placed_shape(rng)
    if task == "wheremany":
        while True:  # 2-4 shapes, at least one of them the only one of its colour and kind
            img, info = many_shapes(rng, count=2 + i % 3, canvas=rng.choice(CANVASES))
            if any(info["items"].count(x) == 1 for x in info["items"]):
                return img, info
    raise ValueError(task)


def write_dataset(out: str | Path, seed: int = 0, counts: Counts | None = None,
                  progress: bool = True) -> dict[str, Path]:
    """Writes images, videos and the stage/eval JSONL files under `out`; returns their paths.
    progress: a bar on stderr, one tick per image, video, unrelated question and eval row."""
    counts = counts or Counts()
    out = Path(out)
    total = (counts.images + counts.videos + counts.other + counts.grounding
             + counts.eval_per_task * len(EVAL_TASKS))
    with tqdm(total=total, desc=f"writing {out}", unit="item", disable=not progress) as bar:
        return _write_dataset(out, seed, counts, bar.update)


def _write_dataset(out: Path, seed: int, counts: Counts, tick) -> dict[str, Path]:
    for sub in ("images", "videos", "eval"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    grng = random.Random(seed + 104729)  # the grounding questions' own draws: the rest is as without them
    stage1, stage2, stage3 = [], [], []
    images = []

    def add(media: dict, info: dict) -> None:
        """Stage 1: the caption. Stage 3: each question alone, and two of them in one
        conversation (the second without the media). Stage 2: a caption (30%) or every
        question in one conversation, so each forward pass carries all of a picture's labels.
        A picture of shapes is also asked where one is: alone in stage 3, at a random turn of
        stage 2's conversation."""
        stage1.append([_user([media, {"type": "text", "text": caption(info)}])])
        qa = questions(info, rng)
        if info["kind"] in ("single", "placed") and rng.random() < 0.88:
            qa = [x for x in qa if x[0] != "count"]  # else "1" would be most count answers
        stage3.extend(_conversation(media, [x]) for x in qa)
        if len(qa) > 1:
            stage3.append(_conversation(media, rng.sample(qa, 2)))
        where = where_question(info, grng)
        if where is not None:
            stage3.append(_conversation(media, [where]))
        if rng.random() < 0.3:
            stage2.append(stage1[-1])
        else:
            order = rng.sample(qa, len(qa))
            if where is not None:
                order.insert(grng.randint(0, len(order)), where)
            stage2.append(_conversation(media, order))

    for i, (img, info) in enumerate(_images(rng, counts.images)):
        media = _media(out, f"images/{i:05d}.png", img)
        images.append(media)
        add(media, info)
        tick(1)
    for i in range(counts.videos):
        frames, info = moving_shape(rng, direction=DIRECTIONS[i % len(DIRECTIONS)])
        media = _media(out, f"videos/{i:04d}", frames)
        add(media, info)
        stage3.append(_conversation(media, [questions(info, rng)[0]]))  # motion, the hardest, twice
        tick(1)
    asked = set()
    for i in range(counts.other):
        q = other_question(rng)
        asked.add(q)
        conv = _conversation(rng.choice(images) if i % 2 == 0 else None, [("other", q, OTHER_ANSWER)])
        stage2.append(conv)
        stage3.append(conv)
        tick(1)
    for i in range(counts.grounding):  # drawn from grng: the records above stay as without them
        qa = []
        while not qa:  # (2-4 shapes may all have a twin: draw again)
            img, info = grounding_picture(grng, many=counts.grounding_many)
            qa = where_all(info, grng, parts=counts.grounding_parts)
        conv = _conversation(_media(out, f"images/g{i:05d}.png", img), qa)
        stage2.append(conv)
        stage3.append(conv)
        tick(1)

    eval_rows = []
    erng = random.Random(seed + 7919)  # held out: images never seen in training
    for task in EVAL_TASKS:
        for i in range(counts.eval_per_task):
            item, info = eval_example(task, i, erng)
            rel = f"eval/{task}_{i:04d}" + ("" if isinstance(item, list) else ".png")
            media = None if item is None else _media(out, rel, item)
            truth = {}
            if task == "other":
                q = other_question(erng)
                while q in asked:  # a question training never asked
                    q = other_question(erng)
                a = OTHER_ANSWER
            elif task in GROUNDING_TASKS:  # the drawn shape's box in pixels, for the IoU
                _, q, box = where_question(info, erng)
                a = where_answer(box, info["canvas"])
                truth = {"box": box["box"], "canvas": info["canvas"]}
            else:
                (_, q, a), = [x for x in questions(info, erng) if x[0] == ("shape" if task == "offcentre" else task)]
            eval_rows.append({"task": task, "answer": a, **truth, "messages": _conversation(media, [(task, q, a)])[:1]})
            tick(1)

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
        if u < 0.25:
            yield f"{other_question(rng)} {OTHER_ANSWER}"
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


def main(argv=None) -> int:
    prog = "python -m qwen2vl_jax.train.synthetic"
    p = argparse.ArgumentParser(prog=prog, description="Writes the synthetic shapes dataset (stage1/2/3.jsonl, "
                                                       "eval.jsonl, images/, videos/, eval/) into OUT.")
    p.add_argument("out", metavar="OUT", help="folder to write into (created if missing)")
    p.add_argument("--images", type=int, default=Counts.images, metavar="N",
                   help=f"training images (default: {Counts.images})")
    p.add_argument("--videos", type=int, default=Counts.videos, metavar="N",
                   help=f"training videos, equally many each way (default: {Counts.videos})")
    p.add_argument("--other", type=int, default=None, metavar="N",
                   help="questions about none of these (default: 3/16 of --images)")
    p.add_argument("--grounding", type=int, default=0, metavar="N",
                   help="extra pictures of shapes asked only where each shape is (default: 0)")
    p.add_argument("--grounding-many", action="store_true",
                   help="the --grounding pictures all of 2-4 shapes, each asked by colour and kind (default: "
                        "a lone shape in 35%% of them)")
    p.add_argument("--grounding-parts", action="store_true",
                   help="among several shapes of a --grounding picture, also ask each by its colour alone "
                        "(\"Where is the red shape?\") and by its kind alone, where no other shares it")
    p.add_argument("--eval-per-task", type=int, default=Counts.eval_per_task, metavar="N",
                   help=f"held-out rows per question type (default: {Counts.eval_per_task})")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="the eval set is held out from it (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def go() -> None:
        for flag, value in (("--images", args.images), ("--videos", args.videos), ("--other", args.other),
                            ("--grounding", args.grounding), ("--eval-per-task", args.eval_per_task)):
            if value is not None and value < 0:
                raise InputError(f"{flag} must be at least 0, got {value}")
        paths = write_dataset(args.out, args.seed, Counts(images=args.images, videos=args.videos, other=args.other,
                                                          grounding=args.grounding, eval_per_task=args.eval_per_task,
                                                          grounding_many=args.grounding_many,
                                                          grounding_parts=args.grounding_parts),
                              progress=not args.no_progress)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")

    return shell.run(prog, go)


if __name__ == "__main__":
    sys.exit(main())
