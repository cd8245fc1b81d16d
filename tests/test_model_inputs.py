"""Bad input gets one clear error; the 3D position rule where HF 5 differs from Qwen2-VL's own."""

from __future__ import annotations

import numpy as np
import pytest

import hf_utils
from hf_utils import IMG, VID, VSTART, VEND
from qwen2vl_jax.config import TINY
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.inputs import check_placeholders, pack_vision
from qwen2vl_jax.positions import get_rope_index


def _rope(ids, mask=None, ig=None, vg=None):
    return get_rope_index(np.asarray(ids), mask, ig, vg, image_token_id=IMG, video_token_id=VID)


def test_positions_by_hand():
    # text(2) | image grid (1, 4, 6) -> 1 x 2 x 3 tokens | text(2)
    ids = [[7, VSTART] + [IMG] * 6 + [VEND, 8]]
    pos, delta = _rope(ids, ig=[[1, 4, 6]])
    expect_t = [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    expect_h = [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    expect_w = [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(pos[:, 0], [expect_t, expect_h, expect_w])
    assert delta[0, 0] == 7 - 10


def test_long_video_next_text_starts_after_largest_temporal_index():
    """A video with more temporal steps than spatial rows: the text after it starts at the
    largest position + 1 (Qwen2-VL's rule). transformers 5 advances by max(h, w) only here."""
    ids = [[7, VSTART] + [VID] * 6 + [VEND, 8]]  # grid (6, 2, 2): 6 x 1 x 1 tokens
    pos, delta = _rope(ids, vg=[[6, 2, 2]])
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 2, 2, 2, 2, 2, 8, 9])
    assert delta[0, 0] == 0


def test_left_padding_is_ignored():
    ids, mask = hf_utils.left_pad([[5, 6, 7], [1, 2, 3, 4, 5]])
    pos, delta = _rope(ids, mask)
    np.testing.assert_array_equal(pos[0, 0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(delta.ravel(), [0, 0])


def test_placeholder_count_mismatch():
    ids = np.array([[5, VSTART] + [IMG] * 5 + [VEND]])
    with pytest.raises(InputError, match="5 image placeholder tokens but the image grids give 6"):
        check_placeholders(TINY, ids, np.array([[1, 4, 6]]), None)
    with pytest.raises(InputError, match="video"):
        check_placeholders(TINY, np.array([[5, VID, VID]]), None, None)


def test_more_placeholder_runs_than_grids():
    ids = [[VSTART, IMG, VEND, 5, VSTART, IMG, VEND]]
    with pytest.raises(InputError, match="more image placeholder runs than image grids"):
        _rope(ids, ig=[[1, 2, 2]])
    with pytest.raises(InputError, match="2 image grids given but the text has 1"):
        _rope([[VSTART, IMG, VEND]], ig=[[1, 2, 2], [1, 2, 2]])


def test_grid_not_divisible_by_merge_size():
    with pytest.raises(InputError, match="multiples of the merge size 2"):
        pack_vision(TINY, np.zeros((15, 1176), np.float32), np.array([[1, 3, 5]]))


def test_pixel_rows_disagree_with_grids():
    with pytest.raises(InputError, match=r"pixel_values has shape \(20, 1176\) but its grids"):
        pack_vision(TINY, np.zeros((20, 1176), np.float32), np.array([[1, 4, 6]]))
    with pytest.raises(InputError, match="must be given together"):
        pack_vision(TINY, np.zeros((24, 1176), np.float32), None)


def test_model_logits_reports_mismatch(tiny_ours):
    model = tiny_ours["untied"]
    case = hf_utils.standard_cases()[1]
    bad = dict(case.inputs())
    bad["input_ids"] = bad["input_ids"][:, :-3].copy()
    bad["attention_mask"] = bad["attention_mask"][:, :-3]
    bad["input_ids"][0, 3] = 9  # one placeholder fewer
    with pytest.raises(InputError, match="image placeholder tokens"):
        model.logits(**bad)


def test_logits_check_inputs_as_generation_does(tiny_ours):
    """One input builder: .logits refuses what .generate refuses."""
    model = tiny_ours["untied"]
    ids = np.array([[5, 6, model.config.text.vocab_size]])
    for call in (model.logits, lambda **kw: model.generate(**kw, max_new_tokens=2)):
        with pytest.raises(InputError, match="outside the vocabulary"):
            call(input_ids=ids)
        with pytest.raises(InputError, match="row 0 of the batch has no tokens"):
            call(input_ids=np.array([[5, 6]]), attention_mask=np.array([[0, 0]]))


def test_build_inputs_packs_rows_and_labels():
    from qwen2vl_jax.inputs import LABEL_PAD, build_inputs

    ids = np.array([[5, 6, 7, 0], [0, 8, 9, 0]])
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 0]])
    labels = np.array([[LABEL_PAD, 6, 7, LABEL_PAD], [LABEL_PAD, LABEL_PAD, 9, LABEL_PAD]])
    built = build_inputs(TINY, ids, mask, labels=labels, length=6)
    np.testing.assert_array_equal(built.input_ids, [[0, 0, 0, 5, 6, 7], [0, 0, 0, 0, 8, 9]])
    np.testing.assert_array_equal(built.attention_mask, built.input_ids > 0)
    np.testing.assert_array_equal(built.labels[:, -3:], [[LABEL_PAD, 6, 7], [LABEL_PAD, LABEL_PAD, 9]])
    assert (built.labels[:, :3] == LABEL_PAD).all()
    np.testing.assert_array_equal(built.positions[0, 1, -2:], [0, 1])  # positions start at the first real token
    np.testing.assert_array_equal(built.pos_offset, [-3, -4])  # slot 6 of row 0 is position 3, of row 1 position 2
    np.testing.assert_array_equal(built.unpack(built.input_ids[..., None])[..., 0], ids * mask)
    with pytest.raises(InputError, match="more than the batch length 2"):
        build_inputs(TINY, ids, mask, length=2)
