"""Training: loss and gradients against HF (torch autograd), stage freezing, accumulation,
remat/bf16 options, resume, the sharded step on 8 simulated devices, the data loader's labels
and errors, the synthetic dataset and the shipped demo model."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import hf_utils
from children import Child, Children, environ
from qwen2vl_jax import grounding
from qwen2vl_jax.config import TINY
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.modules.qwen2vl import init_params
from qwen2vl_jax.train import data, loader as loader_mod, loop, stages as st, synthetic

TESTS = Path(__file__).resolve().parent


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def case_examples(config, seed: int = 0) -> list[data.Example]:
    """The parity cases split into single rows, with random labels on text tokens."""
    rng = np.random.RandomState(seed)
    out = []
    for case in hf_utils.standard_cases():
        ids = case.input_ids
        labels = np.where(rng.rand(*ids.shape) < 0.6, ids, -100)
        labels[(case.attention_mask == 0) | np.isin(ids, [hf_utils.IMG, hf_utils.VID])] = -100
        out += data.split_batch(case.inputs(), config.image_token_id, config.video_token_id, labels=labels)
    for e in out:
        e.labels[0] = -100  # nothing predicts a row's first token (HF would from a left pad)
    return out


def random_params(config, seed: int = 0):
    return init_params(config, jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("name, piece", [("untied", None), ("tied", None), ("tied", 7)])
def test_loss_and_grads_match_hf(tiny_hf, tiny_ours, name, piece):
    """One mixed batch (text, images, video, padding): our loss and the gradient of every
    parameter equal HF's (torch autograd, labels passed to the model) in fp32, with the
    vocabulary logits made in one piece or 7 positions at a time (the last piece padded)."""
    import torch
    from qwen2vl_jax.hf_mapping import hf_to_jax_name, to_jax

    hf, _ = tiny_hf[name]
    ours = tiny_ours[name]
    cfg = ours.config
    exs = case_examples(cfg)
    batch = data.stack_micro([data.collate(exs, cfg)])
    rows, width = batch["input_ids"].shape[-2:]
    assert rows * width <= loop.LOSS_CHUNK and (piece is None or (width > 2 * piece and width % piece)), width
    chunk = loop.LOSS_CHUNK if piece is None else piece * rows  # tokens per piece
    loss, grads = loop.Trainer(cfg, st.get_stage(2), 10, loss_chunk=chunk).grads(ours.params, batch)
    count = int((batch["labels"][:, :, 1:] != -100).sum())

    # HF gets the same rows left-padded into one batch, as its processor would give them.
    width = max(len(e.input_ids) for e in exs)
    ids = np.full((len(exs), width), hf_utils.PAD, np.int64)
    mask, labels = np.zeros_like(ids), np.full_like(ids, -100)
    for i, e in enumerate(exs):
        ids[i, width - len(e.input_ids):], mask[i, width - len(e.input_ids):] = e.input_ids, 1
        labels[i, width - len(e.input_ids):] = e.labels
    cat = lambda k: torch.tensor(np.concatenate([getattr(e, k) for e in exs if getattr(e, k) is not None]))  # noqa: E731
    hf.zero_grad()
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
             pixel_values=cat("pixel_values"), image_grid_thw=cat("image_grid_thw"),
             pixel_values_videos=cat("pixel_values_videos"), video_grid_thw=cat("video_grid_thw"),
             mm_token_type_ids=torch.tensor(hf_utils.mm_token_type_ids(ids)))
    out.loss.backward()

    assert int(count) == int((labels[:, 1:] != -100).sum())
    assert abs(float(loss) - out.loss.item()) <= 1e-6 * out.loss.item()  # measured 0 and 7e-8
    ours_g = flat(grads)
    compared = set()
    for hf_name, p in hf.named_parameters():
        path, transform = hf_to_jax_name(hf_name)
        if path == "lm_head/kernel" and cfg.tie_word_embeddings:
            continue  # tied: HF's embedding grad already holds the output layer's share
        want = to_jax(p.grad.numpy(), transform, ours_g[path].shape)
        err = np.linalg.norm(ours_g[path] - want) / np.linalg.norm(want)
        assert err <= 2e-5, f"{path}: relative gradient error {err:.2e}"  # measured up to 2.9e-6
        compared.add(path)
    assert compared == set(ours_g)


# ----------------------------------------------------------------------------- the step
@pytest.fixture(scope="module")
def tiny_batch():
    exs = case_examples(TINY)
    return exs, data.stack_micro([data.collate(exs[:4], TINY)])


def one_step(stage, batch, params, **kw):
    trainer = loop.Trainer(TINY, stage, 10, **kw)
    state = trainer.init_state(params)
    new, metrics = trainer.step(state, batch)
    return trainer, state, new, jax.device_get(metrics)


def test_stages_freeze_what_they_should(tiny_batch):
    """Stage 1 leaves every LLM parameter bit-identical, stage 3 every vision parameter; stage
    2 changes both; frozen parameters have no optimizer state."""
    _, batch = tiny_batch
    params = random_params(TINY)
    before = flat(params)
    for n in (1, 2, 3):
        stage = st.get_stage(n, learning_rate=1e-3, warmup_steps=0)
        trainer, state, new, metrics = one_step(stage, batch, params)
        after = flat(new.params)
        assert np.isfinite(metrics["loss"])
        changed = {k for k in before if not np.array_equal(before[k], after[k])}
        vision = {k for k in before if k.startswith("visual/")}
        llm = set(before) - vision
        if n == 1:
            assert changed == vision
        elif n == 2:
            assert changed == set(before)
        else:
            assert changed == llm
        # Adam's moments exist for exactly the trainable parameters.
        mu = new.opt_state[1][0].mu
        assert set(flat(mu)) == (vision if n == 1 else llm if n == 3 else set(before))


def grads_of(stage, batch, params, **kw):
    loss, grads = loop.Trainer(TINY, stage, 10, **kw).grads(params, batch)
    return float(loss), flat(grads)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# For comparing updates. Adam divides by sqrt(v) + eps: with the usual eps=1e-8 a gradient
# that is zero in exact arithmetic but 1e-10 in floats (the k_proj bias: softmax ignores a
# shift shared by all keys) gets an update of +-lr from rounding alone. A larger eps keeps
# such noise out of the comparison; real gradients (>= 1e-4 here) still move their parameters.
UPDATE_STAGE = st.get_stage(2, learning_rate=1e-3, warmup_steps=0, eps=1e-4)


def test_accumulation_equals_one_big_batch(tiny_batch):
    """Two micro-batches of 2 rows give the loss and gradients (so the update) of one batch
    of 4: a token-weighted mean, not a mean of means."""
    exs, _ = tiny_batch
    rows = exs[:4]
    sizes = data.vision_bucket(rows)
    length = data.bucket(max(len(e.input_ids) for e in rows))
    big = data.stack_micro([data.collate(rows, TINY, length, sizes)])
    micro = data.stack_micro([data.collate(rows[:2], TINY, length, sizes),
                              data.collate(rows[2:], TINY, length, sizes)])
    params = random_params(TINY, 1)
    stage = st.get_stage(2)
    (la, ga), (lb, gb) = grads_of(stage, big, params), grads_of(stage, micro, params)
    assert abs(la - lb) <= 1e-6 * la
    for k in ga:
        assert rel_err(gb[k], ga[k]) <= 1e-5, k


def test_remat_and_bf16_options(tiny_batch):
    """Remat gives the same loss and gradients; bf16 compute keeps fp32 master weights,
    gradients and optimizer state, and its loss is close to fp32's."""
    _, batch = tiny_batch
    params = random_params(TINY, 2)
    stage = st.get_stage(2, learning_rate=1e-3, warmup_steps=0)
    (lr_, gr), (lm, gm) = grads_of(stage, batch, params), grads_of(stage, batch, params, remat=True)
    assert abs(lr_ - lm) <= 1e-6 * lr_
    for k in gr:
        assert rel_err(gm[k], gr[k]) <= 1e-5, k
    _, _, half, m_half = one_step(stage, batch, params, compute_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(half.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert abs(float(m_half["loss"]) - lr_) < 2e-3 * lr_  # bf16 compute: measured 3e-5 of the loss


def test_lora_holds_its_frozen_base_in_the_compute_dtype(tiny_batch):
    """A LoRA run (bf16 compute) holds its frozen float base in bfloat16, the adapters and their
    Adam state in float32 (a packed base's integers and scales as stored, the scales float32);
    the base comes out of a step unchanged and the adapters move; `abstract_state` (a resume)
    has the same dtypes. A full run keeps float32."""
    from qwen2vl_jax.lora.tree import TRAINABLE, LoraSpec, attach, init_adapter
    from qwen2vl_jax.modules.qwen2vl import init_shapes
    from qwen2vl_jax.quant.format import Scheme
    from qwen2vl_jax.quant.tree import quantize_params

    exs, _ = tiny_batch
    batch = data.stack_micro([data.collate([e for e in exs if e.pixel_values is None and e.pixel_values_videos is None],
                                           TINY)])  # text only: a quick compile
    floats = jax.tree.map(np.asarray, random_params(TINY, 2))
    adapter = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 else x, init_adapter(init_shapes(TINY), LoraSpec(rank=4), 5))
    stage = st.get_stage(3, train=(TRAINABLE,), learning_rate=1e-3, warmup_steps=0)
    params = attach(floats, adapter)
    trainer = loop.Trainer(TINY, stage, 10, compute_dtype=jnp.bfloat16)
    state = trainer.init_state(params)
    held, dtypes = flat(state.params), jax.tree.map(lambda x: x.dtype, state)
    new, metrics = trainer.step(state, batch)  # donates state
    after = flat(new.params)
    for k, x in flat(params).items():
        want = jnp.float32 if "lora_" in k else jnp.bfloat16
        assert held[k].dtype == want and after[k].dtype == want, (k, held[k].dtype)
        if "lora_" not in k:
            assert np.array_equal(after[k], np.asarray(x, jnp.bfloat16)), k
    assert {x.dtype for x in jax.tree.leaves(new.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert not np.array_equal(after["model/layers_0/mlp/up_proj/lora_b"], held["model/layers_0/mlp/up_proj/lora_b"])
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    assert jax.tree.map(lambda s: s.dtype, trainer.abstract_state(params)) == dtypes
    packed = loop.Trainer(TINY, stage, 10, compute_dtype=jnp.bfloat16).init_state(
        attach(quantize_params(floats, Scheme.of("int8")), adapter))
    dtypes = {k: x.dtype for k, x in flat(packed.params).items()}
    assert dtypes["model/layers_0/mlp/up_proj/qweight"] == jnp.int8
    assert dtypes["model/layers_0/mlp/up_proj/scales"] == jnp.float32
    assert dtypes["model/layers_0/input_layernorm/scale"] == jnp.bfloat16
    full = loop.Trainer(TINY, st.get_stage(3), 10, compute_dtype=jnp.bfloat16).abstract_state(floats)
    assert {x.dtype for x in jax.tree.leaves(full.params)} == {jnp.dtype(jnp.float32)}


SHARDED_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
import test_train as tt
from qwen2vl_jax.config import TINY
from qwen2vl_jax.sharding import make_mesh
from qwen2vl_jax.train import data, loop, stages as st

exs = tt.case_examples(TINY)
exs = (exs + exs)[:8]
sizes = data.vision_bucket(exs)
length = data.bucket(max(len(e.input_ids) for e in exs))
batch = data.stack_micro([data.collate(exs[:4], TINY, length, sizes), data.collate(exs[4:], TINY, length, sizes)])
params = tt.random_params(TINY, 3)
stage = tt.UPDATE_STAGE
ref = loop.Trainer(TINY, stage, 10)
s = ref.init_state(params)
mesh = make_mesh("data=2,fsdp=2,tensor=2")
tr = loop.Trainer(TINY, stage, 10, mesh=mesh)
t = tr.init_state(params)
out = {"loss": [], "grad_err": [], "update_err": [], "sharded": []}
for _ in range(2):
    before = tt.flat(s.params)
    ga = tt.flat(ref.grads(s.params, batch)[1])
    gb = tt.flat(tr.grads(t.params, batch)[1])
    out["grad_err"].append(max(tt.rel_err(gb[k], ga[k]) for k in ga))
    s, ms = ref.step(s, batch)
    t, mt = tr.step(t, batch)
    out["loss"].append([float(ms["loss"]), float(mt["loss"])])
    a, b = tt.flat(s.params), tt.flat(t.params)
    out["update_err"].append(max(tt.rel_err(b[k] - before[k], a[k] - before[k]) for k in a))
kernel = t.params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
mu = t.opt_state[1][0].mu["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
out["sharded"] = [str(kernel.sharding.spec), str(mu.sharding.spec), len(kernel.sharding.device_set)]

# QLoRA (int8 base, adapters with a nonzero B) on the same mesh, the vocabulary even so that the
# loss splits it: one step's loss and adapter updates are the unsharded step's; the compiled
# step gathers no floating copy of a packed weight (the head or a decoder kernel).
import dataclasses, re, tempfile
from pathlib import Path
from qwen2vl_jax.lora.peft_format import PREFIX, WEIGHTS, load_adapter, module_name
from qwen2vl_jax.lora.tree import TRAINABLE, LoraSpec, attach, detach, init_adapter
from qwen2vl_jax.params import flatten
from qwen2vl_jax.quant.format import HEAD, LINEARS, Scheme
from qwen2vl_jax.quant.tree import quantize_params
from qwen2vl_jax.modules.qwen2vl import init_shapes
from qwen2vl_jax.safetensors_io import read_header
from qwen2vl_jax.train.run import write_adapter
cfg = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, vocab_size=212))
floats = jax.tree.map(np.asarray, params)  # TINY's, the vocabulary padded by one random row
rng = np.random.default_rng(4)
floats["model"]["embed_tokens"]["embedding"] = np.concatenate(
    [floats["model"]["embed_tokens"]["embedding"], rng.normal(0, 0.02, (1, cfg.text.hidden_size)).astype(np.float32)])
floats["lm_head"]["kernel"] = np.concatenate(
    [floats["lm_head"]["kernel"], rng.normal(0, 0.02, (cfg.text.hidden_size, 1)).astype(np.float32)], axis=1)
adapter = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 else x, init_adapter(init_shapes(cfg), LoraSpec(rank=4), 5))
qparams = attach(quantize_params(floats, Scheme.of("int8")), adapter)
qstage = st.get_stage(3, train=(TRAINABLE,), learning_rate=1e-3, warmup_steps=0, eps=1e-4)
text = [e for e in exs if e.pixel_values is None and e.pixel_values_videos is None] * 2
batch = data.stack_micro([data.collate(text, TINY)])  # text only: a quicker compile
qref, qtr = loop.Trainer(cfg, qstage, 10), loop.Trainer(cfg, qstage, 10, mesh=mesh)
qs, qt = qref.init_state(qparams), qtr.init_state(qparams)
a = qt.params["model"]["layers_0"]["mlp"]["up_proj"]["lora_a"]
lora_specs = [str(a.sharding.spec), str(qt.opt_state[1][0].mu["model"]["layers_0"]["mlp"]["up_proj"]["lora_a"].sharding.spec)]
placed = qtr.place_batch(batch)
compiled = qtr.step_function(qt).lower(qt, placed).compile()
hlo = compiled.as_text()
before = tt.flat(qs.params)
(qs, ms), (qt, mt) = qref.step(qs, batch), compiled(qt, placed)
a, b = tt.flat(qs.params), tt.flat(qt.params)
packed = {tuple(x.shape) for p, x in flatten(init_shapes(cfg)).items() if LINEARS.match(p) or HEAD.match(p)}
gathered = [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
            for m in re.finditer(r"= (\w+)\[([\d,]*)\][^ ]* all-gather\(", hlo)]
out["qlora"] = {"loss": [float(ms["loss"]), float(mt["loss"])], "lora_a": lora_specs,
                "update_err": max(tt.rel_err(b[k] - before[k], a[k] - before[k]) for k in a if "lora_" in k),
                "moved": min(float(np.abs(a[k] - before[k]).max()) for k in a if k.endswith(("lora_a", "lora_b"))),
                "gathers": len(gathered),
                "float_weight_gathers": [f"{t}{list(d)}" for t, d in gathered
                                         if t in ("f32", "bf16") and (212 in d or d[-2:] in packed)]}

# The adapters of that sharded state written as the run writes them (PEFT's layout), read back:
# every tensor the whole adapter (not one chip's shard), [r, in] / [out, r] as peft has them.
folder = Path(tempfile.mkdtemp())
write_adapter(qt.params, folder, folder, LoraSpec(rank=4), init_shapes(cfg))
header, _ = read_header(folder / "adapter" / WEIGHTS)
shapes = {p: tuple(x.shape) for p, x in flatten(init_shapes(cfg)).items()}
trained = {k: np.asarray(v) for k, v in detach(jax.device_get(qt.params))[1].items()}
loaded = load_adapter(folder / "adapter", init_shapes(cfg))
name = PREFIX + module_name("model/layers_0/mlp/down_proj") + ".lora_"
out["adapter"] = {"split": str(qt.params["model"]["layers_0"]["mlp"]["down_proj"]["lora_a"].sharding.spec),
                  "keys": sorted(loaded) == sorted(trained),
                  "equal": all(np.array_equal(loaded[k], trained[k]) for k in trained),
                  "down_proj": [header[name + "A.weight"]["shape"], header[name + "B.weight"]["shape"]],
                  "want": [[4, shapes["model/layers_0/mlp/down_proj/kernel"][0]],
                           [shapes["model/layers_0/mlp/down_proj/kernel"][1], 4]]}
print("RESULT" + json.dumps(out))
"""


def _sharded_child() -> Child:
    env = environ()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    return Child([sys.executable, "-c", SHARDED_SCRIPT], env=env, timeout=600)


# The 8-device child runs in the background from the start of the session (children.py).
CHILDREN = Children(__name__)
CHILDREN.add("sharded", _sharded_child, read_by=("test_sharded_step_matches_unsharded",
                                                  "test_adapter_saved_from_a_sharded_state_loads_back"))


def test_sharded_step_matches_unsharded():
    """On 8 simulated CPU devices (data=2, fsdp=2, tensor=2) two train steps give the loss and
    the parameters of the unsharded step, with params and Adam state actually sharded."""
    proc = CHILDREN.result("sharded")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for ref, sharded in out["loss"]:
        assert abs(ref - sharded) <= 1e-5 * ref
    assert max(out["grad_err"]) <= 1e-5
    assert max(out["update_err"]) <= 1e-4  # see UPDATE_STAGE
    spec, mu_spec, ndev = out["sharded"]
    assert "fsdp" in spec and "tensor" in spec and spec == mu_spec and ndev == 8
    # QLoRA: same loss and adapter gradients; adapters and their Adam state split over fsdp; the
    # packed base crosses chips as integers and the head is split by vocabulary, never gathered
    q = out["qlora"]
    assert abs(q["loss"][0] - q["loss"][1]) <= 1e-5 * q["loss"][0]
    assert q["moved"] > 0 and q["update_err"] <= 1e-4
    assert "fsdp" in q["lora_a"][0] and q["lora_a"][0] == q["lora_a"][1]
    assert q["gathers"] > 0 and q["float_weight_gathers"] == [], q


def test_adapter_saved_from_a_sharded_state_loads_back():
    """The adapters of a sharded (fsdp-split) LoRA state, written as a run writes them, are the
    whole adapters in PEFT's shapes and load back equal (not one device's shard of each)."""
    proc = CHILDREN.result("sharded")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ad = json.loads(proc.stdout.split("RESULT", 1)[1])["adapter"]
    assert "fsdp" in ad["split"], ad  # what the check is about: the state holds them split
    assert ad["down_proj"] == ad["want"], ad
    assert ad["keys"] and ad["equal"], ad


# ----------------------------------------------------------------------------- data
TINY_WIDTHS = hf_utils.DEMO_WIDTHS["small"]


def make_tiny_folder(root: Path, images: int = 6) -> list[dict]:
    """root/model: a converted folder (own BPE tokenizer, random weights); root/img/{i}.png:
    synthetic single shapes -> their infos."""
    from qwen2vl_jax.train import demo

    demo.init_folder(root / "model", 0, vocab=320, corpus_size=200, **TINY_WIDTHS)
    rng = random.Random(0)
    (root / "img").mkdir()
    infos = []
    for i in range(images):
        img, info = synthetic.single_shape(rng)
        img.save(root / "img" / f"{i}.png")
        infos.append(info)
    return infos


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A converted folder (own BPE tokenizer, random weights) and a few synthetic images."""
    root = tmp_path_factory.mktemp("train")
    return root, make_tiny_folder(root)


def qa(image: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def supervised(ex: data.Example, tok) -> str:
    return tok.decode([int(t) for t in ex.labels if t != data.IGNORE])


def test_labels_follow_the_turns(tiny_folder):
    from qwen2vl_jax.processing import Processor

    root, _ = tiny_folder
    proc = Processor.from_pretrained(root / "model")
    img = str(root / "img" / "0.png")
    two_turns = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What shape is this?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
                 {"role": "user", "content": "What colour is it?"},
                 {"role": "assistant", "content": "red"}]
    ex = data.process_record(two_turns, proc, "assistant")
    assert supervised(ex, proc.tokenizer) == "circle<|im_end|>red<|im_end|>"
    pair = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "a red circle"}]}]
    for mode in ("caption", "assistant"):  # no assistant turn: the caption is the target
        ex = data.process_record(pair, proc, mode)
        assert supervised(ex, proc.tokenizer) == "a red circle<|im_end|>"
    ex = data.process_record(two_turns, proc, "caption")
    assert supervised(ex, proc.tokenizer) == "What shape is this?<|im_end|>circle<|im_end|>What colour is it?<|im_end|>red<|im_end|>"
    # Vision placeholders never carry a label.
    assert not np.isin(ex.labels, [proc.tokenizer.image_token_id, proc.tokenizer.vision_start_token_id]).any()


def test_bad_records_are_named_by_line(tiny_folder, capsys):
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.train.cli import main

    root, _ = tiny_folder
    proc = Processor.from_pretrained(root / "model")
    tiny = root / "tiny.png"
    from PIL import Image

    Image.new("RGB", (10, 10)).save(tiny)
    rows = [qa("img/0.png", "What shape?", "circle"),
            "{not json",
            qa("img/missing.png", "What shape?", "circle"),
            {"messages": [{"role": "robot", "content": "hi"}]},
            qa(str(tiny), "What shape?", "circle"),
            qa("img/1.png", "What shape?", "square")]
    path = write_jsonl(root / "bad.jsonl", rows)
    with pytest.raises(InputError) as e:
        data.JsonlDataset(path, proc)
    msg = str(e.value)
    assert "4 bad record(s)" in msg and "\n" not in msg
    for line, what in ((2, "not valid JSON"), (3, "missing.png not found"), (4, "robot"), (5, "too small")):
        assert f"line {line}: " in msg and what in msg
    ds = data.JsonlDataset(path, proc, skip_bad=True)
    assert [r.line for r in ds.records] == [1, 6] and len(ds.skipped) == 4
    rc = main(["--model", str(root / "model"), "--data", str(path), "--stage", "3", "--steps", "1",
               "--out", str(root / "never"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("qwen2vl-train: error: 4 bad record(s)")
    assert not (root / "never").exists()


def test_broken_jsonl_line_is_named_with_its_reason(tmp_path):
    """A line that is not JSON is named by file and line, with json's reason in words: an
    unterminated string says so (json calls its line break a control character), once."""
    text = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": text}, text,
                                                 '{"messages": [{"role": "user", "content": "What is 2 + 2?}]}',
                                                 '{"messages": []} {"messages": []}'])
    records, problems = data.read_jsonl(path)
    assert [r.line for r in records] == [1, 2]
    assert len(problems) == 2, problems
    unterminated, extra = problems
    assert unterminated.startswith("data.jsonl line 3: not valid JSON (unterminated string "), unterminated
    assert re.search(r"column \d+\)$", unterminated), unterminated
    assert extra.startswith("data.jsonl line 4: not valid JSON (extra data "), extra
    for p in problems:
        assert "\n" not in p and " at at " not in p and "control character" not in p, p


def test_malformed_tokenizer_config_is_one_line(tiny_folder, tmp_path):
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.processing.tokenizer import Qwen2Tokenizer

    root, _ = tiny_folder
    bad = Path(shutil.copytree(root / "model", tmp_path / "model", ignore=shutil.ignore_patterns("params")))
    (bad / "tokenizer_config.json").write_text('{"model_max_length": 32768,\n "pad_token": "<|endoftext|>\n}\n')
    for load in (Qwen2Tokenizer.from_pretrained, Processor.from_pretrained):
        with pytest.raises(InputError) as e:
            load(bad)
        msg = str(e.value)
        assert msg.startswith(f"{bad / 'tokenizer_config.json'}: not valid JSON (unterminated string"), msg
        assert "\n" not in msg
    (bad / "tokenizer_config.json").write_text('["not", "an", "object"]')
    with pytest.raises(InputError, match=r"tokenizer_config.json: expected a JSON object"):
        Qwen2Tokenizer.from_pretrained(bad)


def test_a_record_that_breaks_mid_run_is_skipped(tiny_folder):
    """A file that disappears after the up-front check costs its row, with a warning naming
    the line, not the run."""
    import shutil

    from qwen2vl_jax.config import Qwen2VLConfig
    from qwen2vl_jax.processing import Processor

    root, _ = tiny_folder
    shutil.copyfile(root / "img" / "1.png", root / "img" / "gone.png")
    path = write_jsonl(root / "gone.jsonl", [qa("img/0.png", "What shape?", "circle"),
                                             qa("img/gone.png", "What shape?", "square")])
    ds = data.JsonlDataset(path, Processor.from_pretrained(root / "model"))
    (root / "img" / "gone.png").unlink()
    loader = loader_mod.Loader(ds, Qwen2VLConfig.from_hf(root / "model"), batch_size=2)
    with pytest.warns(UserWarning, match="gone.jsonl line 2"):
        arrays, tokens = loader.step_batch([0, 1])
    assert arrays["attention_mask"][0, 0].any() and not arrays["attention_mask"][0, 1].any()


def test_batches_are_bucketed_and_deterministic():
    assert [data.bucket(n) for n in (1, 64, 65, 81, 97, 113, 129, 161)] == [64, 64, 80, 96, 112, 128, 160, 192]
    lengths = [20, 21, 40, 41, 42, 90, 17, 18, 19]
    plan = loader_mod.BatchPlan(lengths, 2, seed=5)
    e0 = plan.epoch(0)
    assert e0 == loader_mod.BatchPlan(lengths, 2, seed=5).epoch(0) and e0 != plan.epoch(1)
    seen = [i for step in e0 for i in step if i is not None]
    assert sorted(seen) == list(range(len(lengths)))
    for step in e0:  # one length bucket per step
        assert len({data.bucket(lengths[i]) for i in step if i is not None}) == 1
    pos = loader_mod.Position()
    for _ in range(len(e0)):
        pos = plan.advance(pos)
    assert pos == loader_mod.Position(1, 0)


# ----------------------------------------------------------------------------- runs
def test_resume_continues_exactly(tiny_folder, monkeypatch):
    """4 steps straight == 2 steps, stop, resume, 2 more: identical params. The output folder
    loads as a model and exports to an HF folder."""
    from qwen2vl_jax import checkpoint as ck
    from qwen2vl_jax.config import Qwen2VLConfig
    from qwen2vl_jax.train.run import TrainOptions, fit

    root, infos = tiny_folder
    rows = [qa(f"img/{i}.png", "What shape is this?", info["shape"]) for i, info in enumerate(infos)]
    path = write_jsonl(root / "qa.jsonl", rows)
    common = dict(model=root / "model", data=path, stage=3, steps=4, batch_size=2, learning_rate=1e-2,
                  warmup_steps=1, seed=1, log_every=1, progress=False)
    logs = []
    from qwen2vl_jax.train.cli import main  # the straight run goes through the CLI, progress bar and all

    monkeypatch.chdir(root)  # relative paths, as typed at a shell
    assert main(["--model", "model", "--data", "qa.jsonl", "--stage", "3", "--steps", "4", "--out", "straight",
                 "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--seed", "1", "--log-every", "1"]) == 0
    fit(TrainOptions(out=root / "split", stop_at=2, **common), log=logs.append)
    with pytest.raises(InputError, match="already holds a training run"):
        fit(TrainOptions(out=root / "split", **common), log=logs.append)
    with pytest.raises(InputError, match=r"^--resume: .* other settings: --lr \(was 0\.01, now 0\.001\); resume "):
        fit(TrainOptions(out=root / "split", resume=True, **{**common, "learning_rate": 1e-3}), log=logs.append)
    fit(TrainOptions(out=root / "split", resume=True, **common), log=logs.append)
    assert any("resuming stage 3 at step 2" in line for line in logs)

    config = Qwen2VLConfig.from_hf(root / "model")
    a = flat(ck.load_params(root / "straight", config))
    b = flat(ck.load_params(root / "split", config))
    init = flat(ck.load_params(root / "model", config))
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert any(not np.array_equal(a[k], init[k]) for k in a)
    assert (root / "split" / "loss.png").is_file()
    log_rows = [json.loads(x) for x in (root / "split" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_rows] == [1, 2, 3, 4] and all(r["tokens_per_s"] > 0 for r in log_rows)

    from qwen2vl_jax.convert.cli import export_main
    from qwen2vl_jax.api import Qwen2VL

    model = Qwen2VL.from_pretrained(root / "split", dtype="float32")
    assert model.logits(input_ids=np.array([[5, 6, 7]])).shape == (1, 3, config.text.vocab_size)
    assert export_main([str(root / "split"), str(root / "hf")]) == 0
    assert any((root / "hf").glob("*.safetensors"))


def test_interrupted_then_resumed_run_logs_like_one_run(tiny_folder, monkeypatch):
    """Ctrl-C at step 3 of 4 (rows every 3 steps, checkpoints every 2): loss.png is there
    already and losses.csv covers the checkpoint's steps, though no row was logged; after
    --resume, train_log.jsonl, losses.csv and loss.png are those of a run that never stopped:
    the row at step 3 averages steps 1-3, though the resumed part ran only 3 and 4."""
    from qwen2vl_jax.train.run import Interrupted, TrainOptions, fit

    root, infos = tiny_folder
    rows = [qa(f"img/{i}.png", "What shape is this?", info["shape"]) for i, info in enumerate(infos)]
    common = dict(model=root / "model", data=write_jsonl(root / "qa_logs.jsonl", rows), stage=3, steps=4,
                  batch_size=2, learning_rate=1e-2, warmup_steps=1, seed=1, log_every=3, save_every=2,
                  progress=False)
    fit(TrainOptions(out=root / "logs_whole", **common), log=lambda _: None)

    real, calls = loop.Trainer.step, []

    def stop_at_the_third(self, state, batch):
        calls.append(int(state.step))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, state, batch)

    monkeypatch.setattr(loop.Trainer, "step", stop_at_the_third)
    cut = root / "logs_cut"
    with pytest.raises(Interrupted) as e:
        fit(TrainOptions(out=cut, **common), log=lambda _: None)
    assert e.value.step == 2
    assert (cut / "loss.png").is_file()  # drawn at the checkpoint, before a later run finishes
    header, *rows = (cut / "losses.csv").read_text().splitlines()
    assert header == "step,loss" and [int(x.split(",")[0]) for x in rows] == [1, 2]
    assert not (cut / "train_log.jsonl").exists()  # no row yet
    monkeypatch.setattr(loop.Trainer, "step", real)
    (cut / "loss.png").unlink()
    fit(TrainOptions(out=cut, resume=True, **common), log=lambda _: None)

    def log_rows(out, field):
        return [r[field] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]

    assert log_rows(cut, "step") == log_rows(root / "logs_whole", "step") == [3, 4]
    for field in ("loss", "lr", "grad_norm"):
        assert log_rows(cut, field) == pytest.approx(log_rows(root / "logs_whole", field), rel=1e-6), field
    assert (cut / "losses.csv").read_text() == (root / "logs_whole" / "losses.csv").read_text()
    assert (cut / "loss.png").is_file()
    from PIL import Image, ImageChops

    same = ImageChops.difference(Image.open(cut / "loss.png").convert("RGB"),
                                 Image.open(root / "logs_whole" / "loss.png").convert("RGB"))
    assert same.getbbox() is None  # the same curve: every step, none missing


def test_loss_plot_ticks_name_whole_steps():
    from qwen2vl_jax.train.plot import step_ticks

    assert step_ticks(1, 4) == [1, 2, 3, 4]  # was 1 1 2 3 4, at steps 1, 1.75, 2.5, ...
    assert step_ticks(1, 1000) == [1, 251, 500, 750, 1000]
    assert step_ticks(7, 8) == [7, 8]


# ----------------------------------------------------------------------------- CLI robustness
def train_cli(*args: str) -> int:
    """Runs qwen2vl-train in-process -> its exit status (capsys holds its stderr)."""
    from qwen2vl_jax.train.cli import main

    return main([*args, "--no-progress"])


def err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def tree_listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# case: (arguments after the good ones, what the one error line says)
BAD_RUNS = {
    "log-every 0": (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    "negative lr": (["--lr", "-1"], "--lr must be positive, got -1"),
    "nan lr": (["--lr", "nan"], "--lr must be positive, got nan"),
    "bad regex": (["--train", "("], "--train '(' is not a valid regex"),
    "regex matching nothing": (["--train", "^nothing/"], "no parameter path matches the patterns ['^nothing/'] (--train"),
    "end lr ratio": (["--end-lr-ratio", "2"], "--end-lr-ratio must be between 0 and 1"),
    "negative seed": (["--seed", "-1"], "--seed must be at least 0"),
    "loss chunk 0": (["--loss-chunk", "0"], "--loss-chunk must be at least 1, got 0"),
    "latin-1 data": (["--data", "latin1.jsonl"], "latin1.jsonl line 2: not UTF-8 text"),
    "out is the model": (["--out", "../model"], "is the --model folder"),
    "out inside the model": (["--out", "../model/run"], "is inside the --model folder"),
    "out inside the model, resumed": (["--out", "../model/run", "--resume"], "is inside the --model folder"),
    "model inside out's checkpoints": (["--model", "holder/train_state/model", "--out", "holder", "--force"],
                                       "holder/train_state, which training into --out"),
    "out is another model": (["--out", "other_model"], "exists and is not empty (pass --force to replace it)"),
    "out cannot be made": (["--out", "a_file/out"], "cannot create the folder"),
    "resume with nothing": (["--out", "empty_run", "--resume"], "holds no checkpoint to resume from"),
    "no model": (["--model", "nowhere"], "--model nowhere: no such folder"),
    "no data": (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
    "broken jsonl": (["--data", "broken.jsonl"],
                     "broken.jsonl line 2: not valid JSON (unterminated string"),
    "bad tokenizer_config": (["--model", "bad_tokenizer"], "tokenizer_config.json: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_runs_stop_up_front_in_one_line(tiny_folder, monkeypatch, capsys, case):
    """Bad numbers, an invalid regex, undecodable data and an --out that would clobber
    something (the model itself, a folder inside it, another model, a --model inside what the
    run replaces) or cannot be made stop before training with one line and status 2, and leave
    every folder as it was."""
    root, _ = tiny_folder
    work = root / "bad_runs"
    if not work.exists():
        work.mkdir()
        write_jsonl(work / "ok.jsonl", [qa("../img/0.png", "What shape?", "circle")])
        rows = [qa("../img/0.png", "What shape?", "circle"), qa("../img/1.png", "Quelle forme ?", "carré")]
        (work / "latin1.jsonl").write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode("latin-1") + b"\n"
                                                     for r in rows))
        (work / "other_model").mkdir()
        for name in ("config.json", "qwen2vl_jax.json"):
            (work / "other_model" / name).write_text("{}")
        (work / "a_file").write_text("not a folder")
        (work / "empty_run" / "train_state").mkdir(parents=True)  # what a run killed before saving left
        write_jsonl(work / "broken.jsonl", [qa("../img/0.png", "What shape?", "circle"),
                                            '{"messages": [{"role": "user", "content": "What shape?}]}'])
        shutil.copytree(root / "model", work / "bad_tokenizer")
        shutil.copytree(root / "model", work / "holder" / "train_state" / "model")
        (work / "bad_tokenizer" / "tokenizer_config.json").write_text('{"pad_token": "<|endoftext|>",}')
    monkeypatch.chdir(work)
    before = tree_listing(work), tree_listing(root / "model")
    extra, message = BAD_RUNS[case]
    rc = train_cli("--model", "../model", "--data", "ok.jsonl", "--stage", "3", "--steps", "1", "--out", "new", *extra)
    err = err_lines(capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("qwen2vl-train: error: ") and message in err[0], err
    assert (tree_listing(work), tree_listing(root / "model")) == before


def test_help_says_what_each_stage_trains(capsys):
    from qwen2vl_jax.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "(default: None)" not in out and not any(line.count("default") > 1 for line in out.splitlines())
    for words in ("1  the vision tower and merger, the LLM frozen", "2  every parameter",
                  "3  the LLM (embeddings, decoder, lm_head), the vision tower and merger frozen",
                  '{"messages": [{"role": "user"', "--force", "--resume"):
        assert words in out, words
    for n, stage in st.STAGES.items():  # the learning rates it quotes are the stages'
        assert f"lr {stage.learning_rate:.0e}".replace("e-0", "e-") in out, n


def test_interrupt_before_the_first_checkpoint_says_so(tiny_folder, monkeypatch, capsys):
    """Ctrl-C in a run that saved nothing yet (--save-every 0) says so and leaves no folder;
    --resume there is then one error line, not a traceback."""
    root, _ = tiny_folder
    monkeypatch.chdir(root)
    write_jsonl(root / "one.jsonl", [qa("img/0.png", "What shape?", "circle")])

    def interrupted(self, state, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "step", interrupted)
    args = ("--model", "model", "--data", "one.jsonl", "--stage", "3", "--steps", "2", "--out", "cut")
    assert train_cli(*args) == 130
    assert err_lines(capsys)[-1].startswith("qwen2vl-train: interrupted before the first checkpoint; nothing was saved")
    assert not (root / "cut").exists()
    assert train_cli(*args, "--resume") == 2
    err = err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("qwen2vl-train: error: --resume: ") and "no checkpoint" in err[0]


def test_resume_mismatch_names_the_flags():
    from qwen2vl_jax.train.run import TrainOptions, _run_key, resume_mismatch

    def key(**changes):
        opts = TrainOptions(**{"model": "m", "data": "d.jsonl", "stage": 3, "steps": 4, "out": "o", "batch_size": 2,
                               **changes})
        return _run_key(opts, opts.stage_spec(), records=6)

    saved = key(learning_rate=1e-2)
    assert resume_mismatch(saved, key(learning_rate=1e-2)) == []
    assert resume_mismatch(saved, key(learning_rate=1e-3, accum=2)) == ["--lr (was 0.01, now 0.001)",
                                                                       "--accum (was 1, now 2)"]
    assert resume_mismatch(saved, key(stage=2, learning_rate=1e-2)) == ["--stage (was 3, now 2)"]
    assert resume_mismatch(saved, key(learning_rate=1e-2, train=("^visual/",))) == [
        "--train (was ^model/ ^lm_head/, now ^visual/)"]
    fewer = {**saved, "records": 5}
    assert resume_mismatch(fewer, key(learning_rate=1e-2)) == ["the number of records in --data (was 5, now 6)"]


def test_os_errors_are_one_line(monkeypatch, capsys):
    """A failing disk or permission (OSError) mid-run is one line and a non-zero exit."""
    from qwen2vl_jax.train import run

    def full_disk(opts, log=None):
        raise OSError(28, "No space left on device", "/runs/out/params")

    monkeypatch.setattr(run, "fit", full_disk)
    assert train_cli("--model", "m", "--data", "d.jsonl", "--stage", "3", "--steps", "1", "--out", "o") == 1
    assert err_lines(capsys) == ["qwen2vl-train: error: No space left on device: /runs/out/params"]


def interrupted_save(tiny_folder, monkeypatch, capsys, name: str, save_params) -> Path:
    """A 3-step run with --save-every 1 whose `checkpoint.save_params` is `save_params`;
    -> its --out, after checking it holds a whole model that exports."""
    from qwen2vl_jax import checkpoint as ck
    from qwen2vl_jax.config import Qwen2VLConfig
    from qwen2vl_jax.convert.cli import export_main

    root, _ = tiny_folder
    monkeypatch.chdir(root)
    write_jsonl(root / "one.jsonl", [qa("img/0.png", "What shape?", "circle")])
    monkeypatch.setattr(ck, "save_params", save_params)
    assert train_cli("--model", "model", "--data", "one.jsonl", "--stage", "3", "--steps", "3", "--out", name,
                     "--save-every", "1", "--batch-size", "1") == 130
    out = root / name
    ck.load_params(out, Qwen2VLConfig.from_hf(out))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    assert export_main([str(out), str(root / f"{name}_hf"), "--quiet"]) == 0
    return out


def test_interrupted_params_save_keeps_the_last_model(tiny_folder, monkeypatch, capsys):
    """An interrupt that stops a params save halfway (after Orbax removed the old params/, as
    it does when overwriting) leaves OUT with the previous complete params."""
    from qwen2vl_jax import checkpoint as ck

    real, calls = ck.save_params, []

    def save_params(params, folder, *, overwrite=False):
        calls.append(folder)
        if len(calls) == 2:
            if overwrite:
                shutil.rmtree(Path(folder) / ck.PARAMS, ignore_errors=True)
            raise KeyboardInterrupt
        return real(params, folder, overwrite=overwrite)

    interrupted_save(tiny_folder, monkeypatch, capsys, "cut_save", save_params)
    assert err_lines(capsys)[-1].endswith("holds the checkpoint of step 2, which --resume continues from")


def test_ctrl_c_during_a_save_lets_it_finish(tiny_folder, monkeypatch, capsys):
    """A real SIGINT while the params are written is held until the save is done: the step's
    checkpoint and params are complete, and the message names that step."""
    import signal

    from qwen2vl_jax import checkpoint as ck

    real = ck.save_params

    def save_params(params, folder, *, overwrite=False):
        signal.raise_signal(signal.SIGINT)
        return real(params, folder, overwrite=overwrite)

    out = interrupted_save(tiny_folder, monkeypatch, capsys, "cut_signal", save_params)
    assert err_lines(capsys)[-1].endswith("holds the checkpoint of step 1, which --resume continues from")
    assert sorted(p.name for p in (out / "train_state").iterdir()) == ["1"]


def test_force_starts_a_fresh_log(tiny_folder, monkeypatch, capsys):
    """A folder holding a dead run's logs is refused without --force; with it the new run's
    losses.csv and train_log.jsonl hold its own steps only."""
    root, _ = tiny_folder
    monkeypatch.chdir(root)
    write_jsonl(root / "one.jsonl", [qa("img/0.png", "What shape?", "circle")])
    out = root / "dead"
    out.mkdir()
    (out / "losses.csv").write_text("".join(f"{s},9.0\n" for s in range(1, 30)))
    (out / "train_log.jsonl").write_text(json.dumps({"step": 29, "loss": 9.0}) + "\n")
    args = ("--model", "model", "--data", "one.jsonl", "--stage", "3", "--steps", "1", "--out", "dead",
            "--log-every", "1", "--batch-size", "1")
    assert train_cli(*args) == 2
    assert "exists and is not empty (pass --force" in err_lines(capsys)[-1]
    assert train_cli(*args, "--force") == 0
    assert [x.split(",")[0] for x in (out / "losses.csv").read_text().splitlines()] == ["step", "1"]
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1]


def test_synthetic_dataset_is_valid(tmp_path):
    paths = synthetic.write_dataset(tmp_path, seed=1, counts=synthetic.Counts(images=12, videos=8, other=6,
                                                                              eval_per_task=4))
    for name in ("stage1", "stage2", "stage3", "eval"):
        records, problems = data.read_jsonl(paths[name])
        assert records and not problems, problems
    evals = [json.loads(x) for x in paths["eval"].read_text().splitlines()]
    assert [r["task"] for r in evals] == [t for t in synthetic.EVAL_TASKS for _ in range(4)]
    by_task = {t: [r for r in evals if r["task"] == t] for t in synthetic.EVAL_TASKS}
    # each count and each direction equally often; the motion rows hold a video
    assert sorted(r["answer"] for r in by_task["count"]) == ["1", "2", "3", "4"]
    assert sorted(r["answer"] for r in by_task["motion"]) == sorted(synthetic.DIRECTIONS)
    assert all(r["messages"][0]["content"][0]["type"] == "video" for r in by_task["motion"])
    assert {r["answer"] for r in by_task["word"]} <= set(synthetic.WORDS)
    assert {r["answer"] for r in by_task["offcentre"]} <= set(synthetic.SHAPES)
    # unrelated questions: the fixed answer, to questions training never asks
    train_text = paths["stage3"].read_text()
    assert {r["answer"] for r in by_task["other"]} == {synthetic.OTHER_ANSWER}
    for r in by_task["other"]:
        question = r["messages"][0]["content"][-1]["text"]
        assert json.dumps(question) not in train_text
    assert train_text.count(json.dumps(synthetic.OTHER_ANSWER)) == 6
    captions = paths["stage1"].read_text()
    for d in synthetic.DIRECTIONS:  # the videos go every way, two each
        assert captions.count(f" moving {d}") == 2
    # where a shape is: its box in pixels of its canvas, the answer the markup of that box
    for task in synthetic.GROUNDING_TASKS:
        for r in by_task[task]:
            (x1, y1, x2, y2), (w, h) = r["box"], r["canvas"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            question = r["messages"][0]["content"][-1]["text"]
            label = "the " + question.removeprefix("Where is the ").removesuffix("?").removesuffix(" in the image")
            assert r["answer"] == grounding.label_markup(label, [r["box"]], w, h)
            assert len(label.split()) == (2 if task == "where" else 3)  # among several: colour and kind
    # training asks it too, as box items the loader writes as markup
    for name in ("stage2", "stage3"):
        boxes = [item for line in paths[name].read_text().splitlines() for m in json.loads(line)["messages"]
                 if m["role"] == "assistant" for item in m["content"] if item["type"] == "box"]
        assert boxes and all(b["label"].startswith("the ") and len(b["box"]) == 4 for b in boxes)


def test_writing_the_dataset_shows_progress_and_runs_from_a_shell(tmp_path, capsys):
    """write_dataset shows a bar as it goes (one tick per item), and its command line writes
    the same files as the function with the same counts."""
    counts = synthetic.Counts(images=3, videos=1, other=1, eval_per_task=1)
    paths = synthetic.write_dataset(tmp_path / "fn", seed=4, counts=counts)
    err = capsys.readouterr().err
    total = 3 + 1 + 1 + len(synthetic.EVAL_TASKS)
    assert f"writing {tmp_path / 'fn'}" in err and f"{total}/{total}" in err, err
    synthetic.write_dataset(tmp_path / "quiet", seed=4, counts=counts, progress=False)
    assert capsys.readouterr().err == ""
    assert synthetic.main([str(tmp_path / "cli"), "--seed", "4", "--images", "3", "--videos", "1", "--other", "1",
                           "--eval-per-task", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith(f"wrote {tmp_path / 'cli' / 'stage1.jsonl'}")
    for name, path in paths.items():
        assert (tmp_path / "cli" / path.name).read_text() == path.read_text(), name
    assert synthetic.main([str(tmp_path / "bad"), "--images", "-1"]) == 2
    assert capsys.readouterr().err == "python -m qwen2vl_jax.train.synthetic: error: --images must be at least 0, got -1\n"


def test_synthetic_shapes_anywhere_and_counts():
    rng = random.Random(5)
    canvases = set()
    for _ in range(60):
        img, info = synthetic.placed_shape(rng, off_centre=True)
        (w, h), (cx, cy) = info["canvas"], info["centre"]
        canvases.add((w, h))
        assert img.size == (w, h)
        assert np.hypot(cx - w / 2, cy - h / 2) >= min(w, h) / 4
        assert img.getpixel((int(cx), int(cy))) == synthetic.COLOURS[info["colour"]]  # drawn where it says
    assert {(640, 480), (320, 240)} <= canvases
    for count in (1, 2, 3, 4):
        for canvas in ((synthetic.SIZE, synthetic.SIZE), (640, 480)):
            img, info = synthetic.many_shapes(rng, count=count, canvas=canvas)
            assert img.size == canvas and info["count"] == count == len(info["items"])
    drawn = [synthetic.many_shapes(rng)[1]["count"] for _ in range(400)]
    assert min(drawn.count(2), drawn.count(3)) > drawn.count(1)  # two and three well represented
    # the README's example image is still the same drawing (a square)
    assert synthetic.single_shape(random.Random(3))[1]["shape"] == "square"


def test_synthetic_boxes_are_the_drawn_shapes_extent():
    """The box a grounding answer is scored against is what was drawn: the extent of the pixels
    that differ from the background, to a pixel; among several shapes, the one asked about is
    the only one of its colour and kind."""
    rng = random.Random(8)
    for _ in range(24):
        img, info = synthetic.placed_shape(rng)
        pixels = np.asarray(img).astype(int)
        ys, xs = np.nonzero(np.abs(pixels - pixels[0, 0]).sum(-1) > 30)
        assert np.allclose(info["box"], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.01), info
        task, question, item = synthetic.where_question(info, rng)
        assert task == "where" and question.startswith(f"Where is the {info['shape']}")
        assert item == {"type": "box", "label": f"the {info['shape']}", "box": info["box"]}
    for _ in range(24):
        img, info = synthetic.many_shapes(rng, count=rng.randint(2, 4), canvas=rng.choice(synthetic.CANVASES))
        pixels = np.asarray(img).astype(int)
        asked = synthetic.where_question(info, rng)
        if asked is None:  # no shape is the only one of its colour and kind
            assert all(info["items"].count(x) > 1 for x in info["items"])
            continue
        task, question, item = asked
        (shape, colour), = [x for x, b in zip(info["items"], info["boxes"]) if b == item["box"]]
        assert task == "wheremany" and item["label"] == f"the {colour} {shape}" and info["items"].count((shape, colour)) == 1
        x1, y1, x2, y2 = item["box"]
        inside = np.zeros(pixels.shape[:2], bool)
        inside[int(y1):int(y2) + 1, int(x1):int(x2) + 1] = True
        ys, xs = np.nonzero((np.abs(pixels - np.array(synthetic.COLOURS[colour])).sum(-1) < 10) & inside)
        assert np.allclose(item["box"], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.01)


def test_synthetic_grounding_pictures_ask_where_every_nameable_shape_is(tmp_path):
    """--grounding N adds N pictures asked only where things are: one conversation per picture
    asking where each shape that no other shares its colour and kind is, once each, its box the
    drawn one; the rest of the dataset (and the eval rows) are as without them."""
    from PIL import Image

    counts = {"images": 6, "videos": 1, "other": 2, "eval_per_task": 2}
    plain = synthetic.write_dataset(tmp_path / "plain", seed=5, counts=synthetic.Counts(**counts), progress=False)
    extra = synthetic.write_dataset(tmp_path / "extra", seed=5, counts=synthetic.Counts(**counts, grounding=12),
                                    progress=False)
    assert extra["eval"].read_text() == plain["eval"].read_text()
    for name in ("stage1", "stage2", "stage3"):
        records, problems = data.read_jsonl(extra[name])
        assert records and not problems, problems
        rows = extra[name].read_text().splitlines()
        added = [json.loads(r) for r in rows if '"images/g' in r]
        assert sorted(r for r in rows if '"images/g' not in r) == sorted(plain[name].read_text().splitlines())
        assert len(added) == (0 if name == "stage1" else 12)
        for rec in added:
            msgs = rec["messages"]
            picture = Image.open(tmp_path / "extra" / msgs[0]["content"][0]["image"]).convert("RGB")
            w, h = picture.size
            questions = [m["content"][-1]["text"] for m in msgs[0::2]]
            boxes = [m["content"] for m in msgs[1::2]]
            assert all(len(b) == 1 and b[0]["type"] == "box" for b in boxes)
            labels = [b[0]["label"] for b in boxes]
            assert len(set(labels)) == len(labels) >= 1  # each shape asked once
            for q, (item,) in zip(questions, boxes):
                assert q.startswith("Where is " + item["label"])
                x1, y1, x2, y2 = item["box"]
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
                if len(boxes) > 1:  # among several, by colour and kind, drawn in that colour
                    colour = synthetic.COLOURS[item["label"].split()[1]]
                    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                    assert picture.getpixel((int(cx), int(cy))) == colour


def test_synthetic_grounding_many_asks_only_among_several_shapes(tmp_path):
    """--grounding-many: every grounding picture holds 2-4 shapes, each asked by colour and kind
    ("wheremany"), none a lone shape; the rest of the dataset and the eval rows as without it."""
    counts = {"images": 4, "videos": 1, "other": 1, "eval_per_task": 2, "grounding": 30}
    plain = synthetic.write_dataset(tmp_path / "plain", seed=5, counts=synthetic.Counts(**counts), progress=False)
    many = synthetic.write_dataset(tmp_path / "many", seed=5,
                                   counts=synthetic.Counts(**counts, grounding_many=True), progress=False)
    assert many["eval"].read_text() == plain["eval"].read_text()
    for name in ("stage2", "stage3"):
        records, problems = data.read_jsonl(many[name])
        assert records and not problems, problems
        rows = many[name].read_text().splitlines()
        assert sorted(r for r in rows if '"images/g' not in r) == \
            sorted(r for r in plain[name].read_text().splitlines() if '"images/g' not in r)
        added = [json.loads(r)["messages"] for r in rows if '"images/g' in r]
        assert len(added) == 30
        for msgs in added:
            labels = [m["content"][0]["label"] for m in msgs[1::2]]
            assert labels and all(len(lab.split()) == 3 for lab in labels)  # "the red circle": colour and kind
    lone = [json.loads(r)["messages"] for r in plain["stage2"].read_text().splitlines() if '"images/g' in r]
    assert any(len(m[1]["content"][0]["label"].split()) == 2 for m in lone)  # without it, some lone shapes


def test_synthetic_grounding_parts_ask_by_colour_alone_and_kind_alone(tmp_path):
    """--grounding-parts: among several shapes, each is also asked by its colour alone ("the red
    shape") when no other shares that colour, and by its kind alone ("the circle") when no other
    shares that kind; its box is the drawn one. The eval rows stay as without it."""
    from PIL import Image

    counts = {"images": 2, "videos": 1, "other": 1, "eval_per_task": 2, "grounding": 30, "grounding_many": True}
    plain = synthetic.write_dataset(tmp_path / "plain", seed=3, counts=synthetic.Counts(**counts), progress=False)
    parts = synthetic.write_dataset(tmp_path / "parts", seed=3,
                                    counts=synthetic.Counts(**counts, grounding_parts=True), progress=False)
    assert parts["eval"].read_text() == plain["eval"].read_text()
    records, problems = data.read_jsonl(parts["stage2"])
    assert records and not problems, problems
    seen = {"colour": 0, "kind": 0}
    for line in parts["stage2"].read_text().splitlines():
        if '"images/g' not in line:
            continue
        msgs = json.loads(line)["messages"]
        picture = Image.open(tmp_path / "parts" / msgs[0]["content"][0]["image"]).convert("RGB")
        items = [m["content"][0] for m in msgs[1::2]]
        labels = [it["label"] for it in items]
        assert len(set(labels)) == len(labels)  # each question once
        full = {tuple(it["box"]): it["label"].split()[1:] for it in items if len(it["label"].split()) == 3
                and it["label"].split()[2] != "shape"}
        for it in items:
            words = it["label"].split()
            x1, y1, x2, y2 = it["box"]
            if words[-1] == "shape":  # by colour alone: drawn in that colour, no other shape of it
                seen["colour"] += 1
                assert picture.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2))) == synthetic.COLOURS[words[1]]
                assert sum(c == words[1] for c, _ in full.values()) <= 1
            elif len(words) == 2:  # by kind alone
                seen["kind"] += 1
                assert words[1] in synthetic.SHAPES and sum(k == words[1] for _, k in full.values()) <= 1
    assert seen["colour"] and seen["kind"]


def test_eval_scores_every_question_type(tiny_folder, tmp_path, capsys):
    """The eval script scores images, videos and text-only rows, one line per type; an answer
    counts when the whole of it matches."""
    from qwen2vl_jax.train import eval as ev

    root, _ = tiny_folder
    paths = synthetic.write_dataset(tmp_path, seed=2, counts=synthetic.Counts(images=4, videos=1, other=1,
                                                                              eval_per_task=1))
    capsys.readouterr()
    assert ev.main(["--model", str(root / "model"), "--data", str(paths["eval"]), "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    n = len(synthetic.EVAL_TASKS)
    assert "evaluating eval.jsonl" in captured.err and f"{n}/{n}" in captured.err  # a bar while it works
    lines = captured.out.splitlines()
    assert [x.split()[0] for x in lines] == sorted(synthetic.EVAL_TASKS) + ["all"]
    assert lines[-1].split()[1].endswith(f"/{n}")
    for line in lines:  # the grounding types with their IoU (3 tokens of a random model: no box, 0)
        assert ("mean IoU 0.000" in line) == (line.split()[0] in synthetic.GROUNDING_TASKS), line
    result = ev.evaluate(root / "model", paths["eval"], max_new_tokens=3, progress=False)
    assert capsys.readouterr().err == ""
    # the random model's own answers, given as the expected ones, all count (and nothing else);
    # a grounding row counts by its box only
    rows = [json.loads(x) for x in paths["eval"].read_text().splitlines()]
    got = {(m["task"], m["question"]): m["got"] for m in result["mistakes"]}
    assert len(got) == len(rows) - result["correct"]
    for r in rows:
        r["answer"] = got.get((r["task"], r["messages"][0]["content"][-1]["text"]), r["answer"]) + "."
    write_jsonl(paths["eval"], rows)
    again = ev.evaluate(root / "model", paths["eval"], max_new_tokens=3)
    assert again["correct"] == n - len(synthetic.GROUNDING_TASKS), again["mistakes"]
    assert {t: again["tasks"][t]["iou"] for t in synthetic.GROUNDING_TASKS} == dict.fromkeys(synthetic.GROUNDING_TASKS, 0.0)
    assert "iou" not in again["tasks"]["shape"]
    assert ev.normalize(" Square. ") == "square" and ev.normalize("square square") != ev.normalize("square")
    assert ev.normalize("I can only answer, questions!") == "i can only answer questions"


def test_eval_box_iou():
    """A grounding answer's first box, read into pixels of its image, against the true box."""
    from qwen2vl_jax.train import eval as ev

    assert ev.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert ev.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert ev.iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0 and ev.iou([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0
    answer = grounding.label_markup("the circle", [[40, 30, 120, 90], [0, 0, 1, 1]], 200, 100)
    assert ev.box_iou("It is " + answer, [40, 30, 120, 90], [200, 100]) == 1.0  # the first box
    # read on a 100 x 100 image, the box is [20, 30, 60, 90]: 20 x 60 in common of 40 x 60 and 80 x 60
    assert ev.box_iou(answer, [40, 30, 120, 90], [100, 100]) == pytest.approx(1200 / (2400 + 4800 - 1200))
    assert ev.box_iou("the circle", [40, 30, 120, 90], [200, 100]) == 0.0  # no box
    one = grounding.label_markup("the circle", [[40, 30, 120, 90]], 200, 100)
    assert ev.box_iou(one[:-len(grounding.BOX_END)], [40, 30, 120, 90], [200, 100]) == 0.0  # cut off


# ----------------------------------------------------------------------------- the demo
def test_demo_model_is_shipped_and_answers():
    from qwen2vl_jax.train.demo import DEMO_DIR

    if not (DEMO_DIR / "config.json").exists():
        pytest.skip("demo model not built (python -m qwen2vl_jax.train.demo)")
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.processing.detokenize import reply_text
    from qwen2vl_jax.train.eval import iou

    size = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert size < 10 * 2**20  # the README's budget
    proc = Processor.from_pretrained(DEMO_DIR)
    model = Qwen2VL.from_pretrained(DEMO_DIR, dtype="float32")

    def answer(*content, max_new_tokens: int = 5) -> str:
        msgs = [{"role": "user", "content": [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]}]
        media = {kind: [{k: v for k, v in c.items() if k != "type"} for c in content
                        if isinstance(c, dict) and c["type"] == kind] or None for kind in ("image", "video")}
        inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)], images=media["image"],
                      videos=media["video"])
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)
        return proc.batch_decode(np.asarray(out), skip_special_tokens=True)[0].strip()

    info = synthetic.single_shape(random.Random(3))[1]  # what make_example_image drew
    example = {"type": "image", "image": str(DEMO_DIR / "example.png")}
    assert answer(example, "What shape is this?") == info["shape"] == "square"  # the README's set-up command
    assert answer(example, "What colour is the shape?") == info["colour"]
    # asked where, it answers with the square's label and a box over it (markup kept)
    out = model.generate(**proc(text=[proc.apply_chat_template([{"role": "user", "content": [
        example, {"type": "text", "text": "Where is the square?"}]}], add_generation_prompt=True)],
        images=[{"image": example["image"]}]), max_new_tokens=32)
    where = reply_text(proc.tokenizer, np.asarray(out)[0])
    (found,), problems = grounding.boxes_for_images(where, [(synthetic.SIZE, synthetic.SIZE)])
    assert found["label"] == "the square" and not problems, where
    assert iou(found["box"], info["box"]) >= 0.5, (found, info["box"])
    # matmul="bf16": the demo's 64-patch vision tower takes bf16 inputs; the answers stay
    bf16 = Qwen2VL.from_pretrained(DEMO_DIR, dtype="float32", matmul="bf16")
    assert bf16.module.matmul == "bf16"
    model = bf16
    assert answer(example, "What shape is this?") == "square"
    assert answer(example, "What colour is the shape?") == info["colour"]
