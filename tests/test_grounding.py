"""Grounding markup (qwen2vl_jax.grounding): parsing, problems, pixel conversion both ways."""

from __future__ import annotations

import dataclasses
import random

import pytest

from qwen2vl_jax import grounding as g

REF = "<|object_ref_start|>{}<|object_ref_end|>"
BOX = "<|box_start|>({},{}),({},{})<|box_end|>"


def test_one_labelled_box_in_pixels():
    text = "It is here: " + REF.format("the red car") + BOX.format(100, 250, 500, 750) + "."
    found, problems = g.boxes(text, 640, 480)
    assert problems == []
    assert found == [{"label": "the red car", "box": [64.0, 120.0, 320.0, 360.0]}]


def test_several_boxes_per_label_and_unlabelled_boxes():
    text = (REF.format("cat") + BOX.format(0, 0, 10, 10) + ", " + BOX.format(20, 20, 30, 30)
            + " and then some words " + BOX.format(1, 2, 3, 4))
    regions = g.parse(text).regions
    assert [(r.label, r.points) for r in regions] == [
        ("cat", ((0, 0), (10, 10))), ("cat", ((20, 20), (30, 30))), (None, ((1, 2), (3, 4)))]


def test_quad():
    text = REF.format("sign") + "<|quad_start|>(0,0),(1000,0),(1000,500),(0,500)<|quad_end|>"
    found, problems = g.boxes(text, 200, 100)
    assert problems == []
    assert found == [{"label": "sign", "box": [0.0, 0.0, 200.0, 50.0],
                      "quad": [[0.0, 0.0], [200.0, 0.0], [200.0, 50.0], [0.0, 50.0]]}]


@pytest.mark.parametrize("text,message", [
    (REF.format("cut") + "<|box_start|>(10,20),(3", "not closed"),
    (REF.format("far") + BOX.format(10, 20, 1200, 40), "outside 0..1000"),
    (REF.format("flipped") + BOX.format(500, 20, 100, 40), "out of order"),
    ("<|box_start|>(1,2)<|box_end|>", "needs 2 points"),
    ("<|box_start|>(1,2),(3,4) extra<|box_end|>", "needs 2 points"),
    ("<|object_ref_start|>never closed", "label is not closed"),
    ("stray <|box_end|>", "without its opening marker"),
    ("<|quad_start|>(1,2),(3,4)<|quad_end|>", "needs 4 points"),
])
def test_bad_markup_is_a_problem_not_an_exception(text, message):
    good = REF.format("ok") + BOX.format(1, 1, 2, 2)
    result = g.parse(good + " " + text)
    assert [r.label for r in result.regions] == ["ok"]
    assert len(result.problems) == 1 and message in result.problems[0].message
    assert result.problems[0].at >= len(good)


def test_problem_quotes_are_short():
    text = "<|box_start|>" + "(1,2)" * 1000 + "<|box_end|>"
    (problem,) = g.parse(text).problems
    assert len(problem.message) < 120


def test_pixels_round_trip_within_the_grid_step():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(20, 4000), rng.randint(20, 4000)
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        markup = g.box_markup("thing", [x1, y1, x2, y2], w, h)
        (found,), problems = g.boxes(markup, w, h)
        assert problems == [] and found["label"] == "thing"
        # one grid step is size / 1000 pixels; rounding costs at most half of it (+ the 0.1 px display rounding)
        for got, want, size in zip(found["box"], [x1, y1, x2, y2], [w, h, w, h]):
            assert abs(got - want) <= size / g.GRID / 2 + 0.05 + (size / g.GRID if want > size * 0.999 else 0)


def test_box_markup_checks_its_box():
    assert g.box_markup(None, [0, 0, 10, 10], 10, 10) == "<|box_start|>(0,0),(999,999)<|box_end|>"
    with pytest.raises(ValueError, match="not inside"):
        g.box_markup("x", [5, 0, 4, 10], 10, 10)


def test_strip_markup():
    text = "See " + REF.format("the dog") + BOX.format(1, 2, 3, 4) + " there."
    assert g.strip_markup(text) == "See the dog there."


def test_boxes_for_images_reads_the_last_image():
    text = REF.format("dot") + BOX.format(100, 200, 300, 400) + " and also " + "<|quad_start|>(0,0),(10,0),(10,10),(0,10)<|quad_end|>"
    found, problems = g.boxes_for_images(text, [(50, 50), (2000, 1000)])
    assert problems == []
    assert found[0] == {"label": "dot", "grid": [100, 200, 300, 400], "box": [200.0, 200.0, 600.0, 400.0], "image": 1}
    assert found[1]["label"] is None and found[1]["quad"][2] == [20.0, 10.0] and found[1]["image"] == 1
    # no image: the model's grid only
    assert g.boxes_for_images(text, [])[0][0] == {"label": "dot", "grid": [100, 200, 300, 400]}


def test_draw_outlines_and_labels_each_box():
    from PIL import Image
    import numpy as np

    found = [{"label": "a", "box": [10, 20, 60, 70]}, {"label": "b", "box": [70, 70, 95, 95]}]
    out = np.asarray(g.draw(Image.new("RGB", (100, 100), "white"), found))
    first, second = g.PALETTE[0], g.PALETTE[1]
    assert tuple(out[45, 10]) == first and tuple(out[45, 60]) == first  # left and right edges
    assert tuple(out[45, 35]) == (255, 255, 255)  # the inside stays as it was
    assert tuple(out[85, 70]) == second  # a second label gets the next colour
    assert (out[:20, 10:40] != 255).any()  # the label's tag sits above its box
    quad = g.boxes_for_images("<|quad_start|>(500,100),(900,500),(500,900),(100,500)<|quad_end|>",
                              [(100, 100)])[0]
    drawn = np.asarray(g.draw(Image.new("RGB", (100, 100), "white"), quad))
    assert tuple(drawn[30, 30]) == first  # on the diamond's edge from (50, 10) to (10, 50)
    assert tuple(drawn[12, 12]) == (255, 255, 255)  # its bounding box's corner stays blank


# ---------------------------------------------------------------------------- qwen2vl-generate
def run_generate(argv) -> tuple[int, str, str]:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from qwen2vl_jax.cli import generate_main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = generate_main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_dir():
    from qwen2vl_jax.config import DEMO_DIR

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("the demo model is not shipped in this checkout")
    return DEMO_DIR


def test_generate_json_and_drawing_give_boxes_in_the_images_pixels(demo_dir, tmp_path, monkeypatch):
    """The demo model loads and the prompt runs as usual; the answer is replaced by one with
    grounding markup, so the boxes are known."""
    import json

    import numpy as np
    from PIL import Image

    from qwen2vl_jax import chat as chat_module

    small, wide = tmp_path / "small.png", tmp_path / "wide.png"
    Image.new("RGB", (40, 30), "white").save(small)
    Image.new("RGB", (300, 150), "white").save(wide)
    answer = "Here: " + REF.format("the circle") + BOX.format(100, 200, 500, 600) + "."
    real_chat = chat_module.chat

    replies = []

    def grounding_chat(*args, **kw):
        replies.append(real_chat(*args, **kw))
        return dataclasses.replace(replies[-1], text=answer)

    monkeypatch.setattr(chat_module, "chat", grounding_chat)
    drawn = tmp_path / "drawn.png"
    code, out, err = run_generate(["--model", demo_dir, "--image", small, "--image", wide, "--prompt",
                                   "Where is the circle?", "--max-new-tokens", 4, "--json", "--draw-boxes", drawn])
    assert code == 0, err
    result = json.loads(out)
    assert result["text"] == answer  # the markup stays in the text
    assert result["boxes"] == [{"label": "the circle", "grid": [100, 200, 500, 600],
                                "box": [30.0, 30.0, 150.0, 90.0], "image": 1}]
    assert result["box_problems"] == []
    pixels = np.asarray(Image.open(drawn))
    assert pixels.shape == (150, 300, 3)  # the last image, at its own size
    assert tuple(pixels[60, 30]) == g.PALETTE[0] and tuple(pixels[60, 90]) == (255, 255, 255)
    assert "drew 1 boxes" in err
    # the demo model's own answer in 4 tokens: at most the label, no box yet (and no problem)
    assert g.boxes_for_images(replies[0].text, [(300, 150)]) == ([], [])


@pytest.mark.parametrize("argv, message", [
    (["--draw-boxes", "{tmp}/out.png"], "--draw-boxes {tmp}/out.png: needs an --image"),
    (["--image", "{img}", "--draw-boxes", "{tmp}/no/out.png"], "no such folder"),
    (["--image", "{img}", "--draw-boxes", "{tmp}"], "is a folder"),
    (["--image", "{img}", "--draw-boxes", "{tmp}/out.boxes"], "cannot write images of type '.boxes'"),
])
def test_generate_bad_drawing_flags(demo_dir, tmp_path, argv, message):
    fill = {"tmp": tmp_path, "img": demo_dir / "example.png"}
    code, out, err = run_generate(["--model", demo_dir, "--prompt", "Hi", *[a.format(**fill) for a in argv]])
    assert code == 2 and out == ""
    assert err.startswith("qwen2vl-generate: error: ") and message.format(**fill) in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------------------- training data
def write_jsonl(tmp_path, *records):
    import json

    from PIL import Image

    Image.new("RGB", (200, 100), "white").save(tmp_path / "wide.png")
    Image.new("RGB", (50, 50), "white").save(tmp_path / "square.png")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def box_record(*parts, images=("wide.png",), role="assistant"):
    user = {"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                        {"type": "text", "text": "Where is the cat?"}]}
    return {"messages": [user, {"role": role, "content": list(parts)}]}


def test_training_boxes_in_pixels_become_grounding_tokens(tmp_path):
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.train.data import process_record, read_jsonl

    path = write_jsonl(
        tmp_path,
        box_record({"type": "text", "text": "It is "}, {"type": "box", "label": "the cat", "box": [20, 10, 100, 90]},
                   {"type": "text", "text": "."}),
        # several boxes for one label; measured on the first image (50 x 50) by index
        box_record({"type": "box", "label": "cats", "box": [[0, 0, 25, 25], [25, 25, 50, 50]], "image": 0},
                   images=("square.png", "wide.png")),
    )
    records, problems = read_jsonl(path)
    assert problems == []
    first = records[0].messages[1]["content"]
    assert "".join(p["text"] for p in first) == (
        "It is <|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,100),(500,900)<|box_end|>.")
    second = records[1].messages[1]["content"]
    assert second == [{"type": "text", "text": "<|object_ref_start|>cats<|object_ref_end|>"
                       "<|box_start|>(0,0),(500,500)<|box_end|><|box_start|>(500,500),(999,999)<|box_end|>"}]
    # and back: the markup read against the same image gives the pixels again
    assert g.boxes_for_images(first[1]["text"], [(200, 100)])[0][0]["box"] == [20.0, 10.0, 100.0, 90.0]

    processor = Processor.from_pretrained(DEMO_DIR)
    example = process_record(records[0].messages, processor)
    tokens = processor.tokenizer
    learned = example.labels[example.labels >= 0].tolist()
    markers = [tokens.token_to_id(m) for m in (g.REF_START, g.REF_END, g.BOX_START, g.BOX_END)]
    assert all(m is not None and learned.count(m) == 1 for m in markers)  # one token each, in the targets
    assert tokens.decode(learned, skip_special_tokens=False).startswith(first[0]["text"] + first[1]["text"])


@pytest.mark.parametrize("record, message", [
    (box_record({"type": "box", "label": "x", "box": [0, 0, 10, 10]}, role="user"), "belongs in an assistant turn"),
    (box_record({"type": "box", "label": "x", "box": [0, 0, 10, 10]}, images=()), "needs an image before it"),
    (box_record({"type": "box", "label": "x", "box": [0, 0, 10]}), "must be [x1, y1, x2, y2]"),
    (box_record({"type": "box", "label": "x", "box": [0, 0, 10, "9"]}), "must be [x1, y1, x2, y2]"),
    (box_record({"type": "box", "label": "x", "box": [0, 0, 300, 10]}), "not inside a 200x100 image"),
    (box_record({"type": "box", "label": "x", "box": [50, 0, 10, 10]}), "not inside a 200x100 image"),
    (box_record({"type": "box", "label": "x", "box": [0, 0, 10, 10], "image": 1}), "index of one of the 1 images"),
    (box_record({"type": "box", "label": "", "box": [0, 0, 10, 10]}), "label must be a non-empty string"),
])
def test_training_box_items_are_checked(tmp_path, record, message):
    from qwen2vl_jax.train.data import read_jsonl

    records, problems = read_jsonl(write_jsonl(tmp_path, record))
    assert records == [] and len(problems) == 1 and message in problems[0], problems
    assert "line 1" in problems[0] and "message 1 item 0" in problems[0]
