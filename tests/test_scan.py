"""The scanned decoder (`scan_layers=True`): one layer compiled once and run by lax.scan over
stacked params, equal to the layer loop in logits, greedy tokens, continuous batching, a
sharded mesh, quantized weights and training gradients (fp32, tiny models)."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

import hf_utils

pytest.importorskip("torch")

from qwen2vl_jax import Qwen2VL  # noqa: E402
from qwen2vl_jax.errors import InputError  # noqa: E402
from qwen2vl_jax.params import flatten, is_stacked, stack_layers, unflatten, unstack_layers  # noqa: E402

CASES = {c.name: c for c in hf_utils.standard_cases()}


@pytest.fixture(scope="module")
def pair(tiny_hf, tiny_ours):
    """(the layer loop, the scanned decoder) over the same untied tiny model."""
    loop = tiny_ours["untied"]
    scanned = Qwen2VL(loop.config, loop.params, "float32", scan_layers=True)
    return loop, scanned


def test_stack_and_unstack_are_inverse(pair):
    loop, scanned = pair
    assert is_stacked(scanned.params) and not is_stacked(loop.params)
    n = loop.config.text.num_hidden_layers
    kernel = scanned.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.shape == (n, *loop.params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].shape)
    back = flatten(unstack_layers(scanned.params))
    assert sorted(back) == sorted(flatten(loop.params))
    for path, leaf in flatten(loop.params).items():
        np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(leaf), err_msg=path)
    assert stack_layers(scanned.params) is scanned.params  # already stacked: unchanged
    broken = flatten(loop.params)
    del broken["model/layers_1/mlp/up_proj/kernel"]
    with pytest.raises(InputError, match="decoder layer 1 does not hold"):
        stack_layers(unflatten(broken))


@pytest.mark.parametrize("case_name", list(CASES))
def test_scanned_logits_and_tokens_equal_the_loop(pair, case_name):
    loop, scanned = pair
    case = CASES[case_name]
    hf_utils.assert_same_model(scanned, loop, case.inputs(), 12)


@pytest.mark.parametrize("which", ["loop", "scanned"])
def test_continuous_batching_equals_offline(pair, which):
    """Prompts of three lengths prefilled, put into slots 0, 1 and 2 of a 4-row cache of 300
    slots and stepped together (on the 4-row and the 2-row bucket, attending over the 256-slot
    context bucket that holds them), as the server runs them: each row's tokens are the layer
    loop's offline greedy tokens, for the layer loop and the scanned decoder."""
    from qwen2vl_jax.serving.slots import Slots
    from qwen2vl_jax.sampling import GenerationConfig

    loop, scanned = pair
    model = scanned if which == "scanned" else loop
    n = 8
    generation = GenerationConfig(max_new_tokens=n, eos_token_ids=())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 190, size=k) for k in (5, 13, 30)]
    want = [loop.generate(p[None], max_new_tokens=n, eos_token_ids=())[0].tolist() for p in prompts]
    slots = Slots(model.engine, max_batch=4, max_context=300)
    assert slots.context_buckets == (256, 300) and slots.context_for(40) == 256
    assert Slots(model.engine, max_context=4096).context_buckets == (256, 1024, 4096)
    state = slots.init_state()
    got = [[] for _ in prompts]
    context = lambda live: max(len(prompts[i]) + len(got[i]) for i in live)  # noqa: E731 - as Batcher._step
    for i, p in enumerate(prompts[:2]):
        prefix = slots.prefill(model.params, slots.prompt_inputs(p, max_new_tokens=n), None, generation)
        got[i].append(int(prefix.token[0]))
        state = slots.insert(state, prefix, i)
    for _ in range(3):  # rows 0-1 alone: the 2-row bucket, written back into the 4-row state
        state, (tok, _) = slots.step(model.params, state, 2, context((0, 1)))
        for i in range(2):
            got[i].append(int(tok[i]))
    prefix = slots.prefill(model.params, slots.prompt_inputs(prompts[2], max_new_tokens=n), None, generation)
    got[2].append(int(prefix.token[0]))
    state = slots.insert(state, prefix, 2)
    while min(len(g) for g in got) < n:
        state, (tok, _) = slots.step(model.params, state, 3, context((0, 1, 2)))
        for i in range(3):
            if len(got[i]) < n:
                got[i].append(int(tok[i]))
    assert got == want


def test_warm_up_compiles_short_prompts_within_a_small_context(pair):
    """Warm-up compiles one prompt per bucket up to 64 tokens, each with room for a new token:
    a 30-slot cache takes prompts of 1-29 (buckets 16-32 would not fit it whole); with
    mask_words, each also under a grammar's mask."""
    from qwen2vl_jax.serving.scheduler import Batcher
    from qwen2vl_jax.serving.slots import Slots, short_prompt_lengths
    from qwen2vl_jax.inputs import bucket

    assert [bucket(n, 16) for n in short_prompt_lengths(4096)] == [16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert short_prompt_lengths(30) == [1, 17, 21, 25, 29] and short_prompt_lengths(2) == [1]
    from compile_counter import count_compiles
    from qwen2vl_jax.sampling import GenerationConfig

    from qwen2vl_jax.serving.grammar import mask_words

    loop, _ = pair
    slots = Slots(loop.engine, max_batch=2, max_context=30)
    words = mask_words(loop.config.text.vocab_size)
    Batcher(slots, loop.params).warm_up(mask_words=words)
    generation = GenerationConfig(max_new_tokens=1)
    state = slots.init_state()
    every = lambda rows: np.full((rows, words), -1, np.int32)  # noqa: E731
    with count_compiles() as c:  # any prompt that fits, then a step on every bucket: nothing new
        for n, masked in itertools.product((1, 2, 9, 16, 17, 23, 29), (False, True)):
            inputs = slots.prompt_inputs(np.ones((n,), np.int32), max_new_tokens=1)
            prefix, _ = slots.start(loop.params, inputs, None, generation, allow=every(1) if masked else None)
            state = slots.insert(state, prefix, n % 2)
        for rows in slots.row_buckets:
            for context, masked in itertools.product(slots.context_buckets, (False, True)):
                state, tok = slots.step(loop.params, state, rows, context, allow=every(rows) if masked else None)
        jax.block_until_ready(tok)
    assert c["n"] == 0, c


@pytest.mark.parametrize("scheme", [("int8", 8, -1, True), ("int4", 4, 16, False)], ids=["int8", "int4"])
def test_scanned_quantized_equals_the_loop(pair, scheme):
    """Packed weights (in their CPU form) stacked: the scanned model's logits and tokens are
    the layer loop's on the same packed params."""
    from qwen2vl_jax.quant.format import Scheme, is_quantized
    from qwen2vl_jax.quant.tree import quantize_params

    from qwen2vl_jax.config import TINY  # even widths, as int4 packing needs
    from qwen2vl_jax.modules.qwen2vl import init_params

    params = jax.tree.map(np.asarray, init_params(TINY, jax.random.PRNGKey(5)))
    packed = quantize_params(params, Scheme(*scheme))
    a = Qwen2VL(TINY, packed, "float32", quantization=Scheme(*scheme))
    b = Qwen2VL(TINY, packed, "float32", quantization=Scheme(*scheme), scan_layers=True)
    assert is_quantized(b.params) and "qweight" in b.params["model"]["layers"]["mlp"]["up_proj"]
    case = CASES["one_image"]
    hf_utils.assert_same_model(b, a, case.inputs(), 10)


def test_scanned_training_gradients_equal_the_loop():
    """A stage-2 train step's loss and gradients (remat on) through the scanned decoder are
    the layer loop's; a stage that trains some layers but not others is refused in one line."""
    from qwen2vl_jax.config import TINY
    from qwen2vl_jax.modules.qwen2vl import init_params
    from qwen2vl_jax.train import data, loop, stages as st
    from test_train import case_examples

    exs = case_examples(TINY)
    batch = data.stack_micro([data.collate(exs[:4], TINY)])
    params = jax.tree.map(np.asarray, init_params(TINY, jax.random.PRNGKey(2)))
    stage = st.get_stage(2)
    la, ga = loop.Trainer(TINY, stage, 10, remat=True).grads(params, batch)
    lb, gb = loop.Trainer(TINY, stage, 10, remat=True, scan_layers=True).grads(stack_layers(params), batch)
    assert abs(float(la) - float(lb)) <= 1e-6 * float(la)
    ga, gb = flatten(ga), flatten(unstack_layers(jax.device_get(gb)))
    assert sorted(ga) == sorted(gb)
    for k in ga:
        err = np.linalg.norm(gb[k] - ga[k]) / max(np.linalg.norm(ga[k]), 1e-30)
        assert err <= 1e-5, (k, err)
    one_layer = st.get_stage(2, train=(r"model/layers_0/",))
    with pytest.raises(InputError, match="some decoder layers but not others"):
        st.trainable_paths(stack_layers(params), one_layer)


def test_scanned_weight_decay_skips_stacked_norms_and_biases():
    """AdamW decays matrices only: a stacked norm scale or bias ([n, D]) is not a matrix."""
    from qwen2vl_jax.config import TINY
    from qwen2vl_jax.modules.qwen2vl import init_shapes
    from qwen2vl_jax.train import stages as st

    loop_mask = flatten(st.decay_mask(init_shapes(TINY)))
    scan_mask = flatten(st.decay_mask(init_shapes(TINY, scan_layers=True)))
    for path, decays in scan_mask.items():
        assert decays == loop_mask[path.replace("model/layers/", "model/layers_0/")], path
    assert scan_mask["model/layers/mlp/up_proj/kernel"] and not scan_mask["model/layers/input_layernorm/scale"]


def test_cli_scan_layers_flag_answers_the_same(tmp_path):
    """qwen2vl-generate --scan-layers on the demo model: the same tokens as without it."""
    import contextlib
    import io
    import json
    import random

    from qwen2vl_jax.cli import generate_main
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.train import synthetic

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("the demo model is not shipped in this checkout")
    image, _ = synthetic.single_shape(random.Random(4))
    image.save(tmp_path / "shape.png")
    base = ["--image", str(tmp_path / "shape.png"), "--prompt", "What shape is this?", "--max-new-tokens", "8",
            "--json"]
    outs = []
    for extra in ([], ["--scan-layers"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert generate_main(base + extra) == 0
        outs.append(json.loads(out.getvalue())["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) > 1


def test_train_cli_scan_layers(tmp_path_factory, monkeypatch):
    """qwen2vl-train --scan-layers: two stage-2 steps give the params the layer loop's run
    gives (exported with HF paths, 1e-5), and a run cannot resume with the other decoder (exact
    resume itself is test_train's and test_lora's)."""
    from qwen2vl_jax import checkpoint as ck
    from qwen2vl_jax.config import Qwen2VLConfig
    from qwen2vl_jax.train.cli import main
    from qwen2vl_jax.train.run import TrainOptions, fit
    from test_train import make_tiny_folder, qa, write_jsonl

    root = tmp_path_factory.mktemp("scan_train")
    infos = make_tiny_folder(root, images=4)
    write_jsonl(root / "qa.jsonl", [qa(f"img/{i}.png", "What shape is this?", info["shape"])
                                    for i, info in enumerate(infos)])
    monkeypatch.chdir(root)
    argv = ["--model", "model", "--data", "qa.jsonl", "--stage", "2", "--steps", "2", "--batch-size", "2",
            "--lr", "1e-2", "--warmup", "0", "--no-progress"]
    assert main(argv + ["--out", "loop"]) == 0
    assert main(argv + ["--out", "scan", "--scan-layers"]) == 0
    with pytest.raises(InputError, match=r"--scan-layers \(was True, now False\)"):
        fit(TrainOptions(model="model", data="qa.jsonl", stage=2, steps=3, out="scan", batch_size=2,
                         learning_rate=1e-2, warmup_steps=0, resume=True, progress=False), log=lambda _: None)
    config = Qwen2VLConfig.from_hf(root / "model")
    a, b = flatten(ck.load_params(root / "loop", config)), flatten(ck.load_params(root / "scan", config))
    init = flatten(ck.load_params(root / "model", config))
    assert sorted(a) == sorted(b) and "model/layers_0/mlp/up_proj/kernel" in b
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)
    assert any(not np.array_equal(a[k], init[k]) for k in a)


def test_stacking_orders_eleven_or_more_layers_by_number():
    """An 11-layer decoder: row i of every stacked leaf is layer i (layers_10 comes after
    layers_9, not after layers_1 as a sort of the names would put it), unstacking gives the
    same tree back, and the scanned model's logits are the layer loop's."""
    import dataclasses

    from qwen2vl_jax.modules.qwen2vl import init_shapes

    config = hf_utils.spec_config(dataclasses.replace(hf_utils.SPECS["untied"], layers=11))
    rng = np.random.default_rng(7)  # random values straight from the shapes (init_params is slow here)
    flat = {p: ((p.endswith("scale") + 0.1 * rng.standard_normal(s.shape))).astype(s.dtype)
            for p, s in flatten(init_shapes(config)).items()}
    params = unflatten(flat)
    stacked = flatten(stack_layers(params))
    layer_leaves = [p for p in flat if p.startswith("model/layers_0/")]
    assert layer_leaves
    for path in layer_leaves:
        name = path[len("model/layers_0/"):]
        rows = np.asarray(stacked["model/layers/" + name])
        assert rows.shape[0] == 11, name
        for i in range(11):
            np.testing.assert_array_equal(rows[i], flat[f"model/layers_{i}/{name}"], err_msg=f"{name} row {i}")
    back = flatten(unstack_layers(stack_layers(params)))
    assert sorted(back) == sorted(flat)
    for path, leaf in flat.items():
        np.testing.assert_array_equal(np.asarray(back[path]), leaf, err_msg=path)
    # the abstract tree (what loading and sharding plan with) stacks the same way
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert {p: s.shape for p, s in flatten(unstack_layers(stack_layers(shapes))).items()} == {
        p: x.shape for p, x in flat.items()}
    # every layer holds its own random weights: a scan over rows in any other order answers otherwise
    loop = Qwen2VL(config, params, "float32")
    scanned = Qwen2VL(config, params, "float32", scan_layers=True)
    inputs = CASES["text"].inputs()
    np.testing.assert_allclose(scanned.logits(**inputs), loop.logits(**inputs), rtol=0, atol=2e-5)
