"""Grounding markup (qwen2vl_jax.grounding): parsing, problems, pixel conversion both ways."""

from __future__ import annotations

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
