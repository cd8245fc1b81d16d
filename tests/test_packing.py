"""Sequence packing (`qwen2vl-train --pack`): rows that hold several records, attention kept
inside each record, M-RoPE positions restarting per record, images and videos with their
record; the loss and gradients of a packed step equal those of the same records unpacked."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

import hf_utils
from qwen2vl_jax.config import TINY
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.modules.qwen2vl import init_params
from qwen2vl_jax.train import data, loader as train_loader, loop, stages as st, synthetic


def mixed_examples(seed: int = 0) -> list[data.Example]:
    """The parity cases as single records: text only, images, a video, both; random labels on
    their text tokens."""
    rng = np.random.RandomState(seed)
    out = []
    for case in hf_utils.standard_cases():
        ids = case.input_ids
        labels = np.where(rng.rand(*ids.shape) < 0.6, ids, -100)
        labels[(case.attention_mask == 0) | np.isin(ids, [hf_utils.IMG, hf_utils.VID])] = -100
        out += data.split_batch(case.inputs(), TINY.image_token_id, TINY.video_token_id, labels=labels)
    for i, e in enumerate(out):
        e.labels[0] = -100  # as make_labels: nothing predicts a record's first token
        e.line = i + 1
    return out


def loader(batch_size: int, accum: int, pack: bool) -> train_loader.Loader:
    """A Loader for assembling steps only (no dataset behind it)."""
    return train_loader.Loader(types.SimpleNamespace(lengths=[1]), TINY, batch_size, accum, pack=pack)


def test_first_fit_decreasing_rows():
    lengths = [50, 20, 30, 64, 10, 14, 40, 5]
    rows = data.pack_records(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) == -(-sum(lengths) // 64) == 4  # as few as the tokens allow, here
    assert rows == data.pack_records(lengths, 64)
    with pytest.raises(ValueError, match="65 tokens"):
        data.pack_records([65], 64)


def test_packed_step_equals_unpacked():
    """7 records (text only, one and three images, a video, image + video), 2 micro-batches of
    4: packed into fewer rows, the loss and every gradient equal the unpacked step's (fp32)."""
    exs = mixed_examples()
    slots = exs + [None]  # a filler slot, as a short last step has
    plain, n_plain = loader(4, 2, pack=False).assemble(slots)
    packed, n_packed = loader(4, 2, pack=True).assemble(slots)
    assert n_plain == n_packed == sum(len(e.input_ids) for e in exs)
    length = plain["input_ids"].shape[-1]
    assert packed["input_ids"].shape[-1] == length  # the same bucket length, fewer rows
    assert packed["input_ids"].shape[:2] == (2, 1) and plain["input_ids"].shape[:2] == (2, 4)

    # Every record is whole in one row: its tokens, labels (the first one ignored), its own
    # segment id, and positions that start at 0 on all three axes, as the record alone has them.
    seg = packed["attention_mask"]
    assert seg.dtype == np.int32
    found = 0
    for a in range(2):
        for r in range(seg.shape[1]):
            for k in range(1, seg[a, r].max() + 1):
                where = np.flatnonzero(seg[a, r] == k)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))
                ids = packed["input_ids"][a, r, where]
                e = next(e for e in exs if np.array_equal(e.input_ids, ids))
                alone = data.collate([e], TINY)
                n = len(ids)
                assert np.array_equal(packed["positions"][a][:, r, where], alone["positions"][:, 0, -n:])
                assert (packed["positions"][a][:, r, where[0]] == 0).all()
                assert np.array_equal(packed["labels"][a, r, where], alone["labels"][0, -n:])
                found += 1
    assert found == len(exs)
    assert packed["vision"]["valid"].sum() == plain["vision"]["valid"].sum()  # every image and video frame

    trainer = loop.Trainer(TINY, st.get_stage(2), 10)
    params = init_params(TINY, jax.random.PRNGKey(0))
    loss_a, grads_a = jax.device_get(trainer.grads(params, plain))
    loss_b, grads_b = jax.device_get(trainer.grads(params, packed))
    assert abs(float(loss_a) - float(loss_b)) <= 1e-5 * abs(float(loss_a))
    ga, gb = (traverse_util.flatten_dict(g, sep="/") for g in (grads_a, grads_b))
    assert set(ga) == set(gb) and any(k.startswith("visual/") for k in ga)
    worst = max(float(np.abs(ga[k] - gb[k]).max() / (np.abs(ga[k]).max() + 1e-12)) for k in ga)
    assert worst < 1e-5, worst
    assert all(np.abs(ga[k]).max() > 0 for k in ga if "blocks_0" in k or "layers_0" in k)


# ----------------------------------------------------------------------------- runs
def write_mixed_data(root: Path) -> Path:
    """root/model (a tiny converted folder) and root/mixed.jsonl: image, video (frame list) and
    text-only records."""
    from qwen2vl_jax.train import demo

    demo.init_folder(root / "model", 0, vocab=320, corpus_size=200, **hf_utils.DEMO_WIDTHS["small"])
    rng = random.Random(0)
    rows = []
    for i in range(2):
        img, info = synthetic.single_shape(rng)
        img.save(root / f"{i}.png")
        rows.append([{"type": "image", "image": f"{i}.png"}, "What shape is this?", info["shape"]])
        frames, info = synthetic.moving_shape(rng, frames=4)
        names = [f"v{i}_{k}.png" for k in range(len(frames))]
        for f, name in zip(frames, names):
            f.save(root / name)
        rows.append([{"type": "video", "video": names}, "Which way does it move?", info["direction"]])
        rows.append([None, "Name a shape with three sides." if i else "What colour is the sky?",
                     "a triangle" if i else "blue"])
    lines = []
    for media, question, answer in rows:
        content = ([media] if media else []) + [{"type": "text", "text": question}]
        lines.append(json.dumps({"messages": [{"role": "user", "content": content},
                                              {"role": "assistant", "content": answer}]}))
    (root / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    return root / "mixed.jsonl"


def test_packed_run_resumes_exactly_with_workers(tmp_path):
    """Six mixed records, all in every step: a packed run stopped after step 1 and resumed, with
    2 Grain worker processes reading the data, ends with the params of the uninterrupted run
    (no workers), bit for bit; --pack is part of what a resume must keep."""
    from qwen2vl_jax import checkpoint as ck
    from qwen2vl_jax.config import Qwen2VLConfig
    from qwen2vl_jax.train.run import TrainOptions, fit

    path = write_mixed_data(tmp_path)
    common = dict(model=tmp_path / "model", data=path, stage=2, steps=2, batch_size=6, learning_rate=1e-2,
                  warmup_steps=0, log_every=1, progress=False, pack=True)
    fit(TrainOptions(out=tmp_path / "packed", **common), log=lambda s: None)
    fit(TrainOptions(out=tmp_path / "split", workers=2, stop_at=1, **common), log=lambda s: None)
    with pytest.raises(InputError, match=r"other settings: --pack \(was True, now False\)"):
        fit(TrainOptions(out=tmp_path / "split", resume=True, **{**common, "pack": False}), log=lambda s: None)
    fit(TrainOptions(out=tmp_path / "split", workers=2, resume=True, **common), log=lambda s: None)

    rows = [json.loads(r) for r in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    config = Qwen2VLConfig.from_hf(tmp_path / "model")
    a = traverse_util.flatten_dict(ck.load_params(tmp_path / "packed", config), sep="/")
    b = traverse_util.flatten_dict(ck.load_params(tmp_path / "split", config), sep="/")
    init = traverse_util.flatten_dict(ck.load_params(tmp_path / "model", config), sep="/")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], init[k]) for k in a)
