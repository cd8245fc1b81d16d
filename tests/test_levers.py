"""Decode levers that change how the work is laid out, not what is computed: fused projections
(`params.fuse_projections`: q/k/v and gate/up as one matmul each) and several decode steps per
loop iteration (`Engine(steps_per_iteration=K)`). Each equals the plain model (fp32, tiny
models); benchmarks/limits.py measures what they are worth."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import hf_utils

pytest.importorskip("torch")

from qwen2vl_jax import Qwen2VL  # noqa: E402
from qwen2vl_jax.config import TINY  # noqa: E402 - even widths, as int4 packing needs
from qwen2vl_jax.engine import Engine  # noqa: E402
from qwen2vl_jax.errors import InputError  # noqa: E402
from qwen2vl_jax.modules.qwen2vl import init_params  # noqa: E402
from qwen2vl_jax.quant.format import Scheme  # noqa: E402
from qwen2vl_jax.quant.tree import quantize_params  # noqa: E402
from qwen2vl_jax.params import flatten, fuse_projections, stack_layers, unflatten  # noqa: E402
from qwen2vl_jax.sampling import GenerationConfig  # noqa: E402

CASES = {c.name: c for c in hf_utils.standard_cases()}


@pytest.fixture(scope="module")
def pair(tiny_hf, tiny_ours):
    """(plain, fused) over the same untied tiny model (biases on q/k/v)."""
    plain = tiny_ours["untied"]
    return plain, Qwen2VL(plain.config, plain.params, "float32", fuse_projections=True)


def test_fused_params_are_the_concatenated_weights(pair):
    plain, fused = pair
    cfg = plain.config.text
    p, f = plain.params["model"]["layers_1"], fused.params["model"]["layers_1"]
    assert sorted(f["self_attn"]) == ["o_proj", "qkv_proj"] and sorted(f["mlp"]) == ["down_proj", "gate_up_proj"]
    q, k, v = (np.asarray(p["self_attn"][n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
    qkv = np.asarray(f["self_attn"]["qkv_proj"]["kernel"])
    assert qkv.shape == (cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim)
    np.testing.assert_array_equal(qkv, np.concatenate([q, k, v], axis=1))
    bias = np.concatenate([np.asarray(p["self_attn"][n]["bias"]) for n in ("q_proj", "k_proj", "v_proj")])
    np.testing.assert_array_equal(np.asarray(f["self_attn"]["qkv_proj"]["bias"]), bias)
    gate_up = np.asarray(f["mlp"]["gate_up_proj"]["kernel"])
    np.testing.assert_array_equal(gate_up, np.concatenate([np.asarray(p["mlp"]["gate_proj"]["kernel"]),
                                                           np.asarray(p["mlp"]["up_proj"]["kernel"])], axis=1))
    again = flatten(fuse_projections(fused.params))  # already fused: the same leaves
    assert sorted(again) == sorted(flatten(fused.params))
    for path, leaf in flatten(fused.params).items():
        np.testing.assert_array_equal(np.asarray(again[path]), np.asarray(leaf), err_msg=path)
    assert fused.param_bytes == plain.param_bytes


@pytest.mark.parametrize("case_name", list(CASES))
def test_fused_logits_and_tokens_equal_plain(pair, case_name):
    plain, fused = pair
    case = CASES[case_name]
    hf_utils.assert_same_model(fused, plain, case.inputs(), 12)


def test_fused_and_scanned(pair):
    plain, _ = pair
    both = Qwen2VL(plain.config, plain.params, "float32", fuse_projections=True, scan_layers=True)
    assert "qkv_proj" in both.params["model"]["layers"]["self_attn"]
    case = CASES["one_image"]
    hf_utils.assert_same_model(both, plain, case.inputs(), 10)
    with pytest.raises(InputError, match="before stacking"):
        fuse_projections(stack_layers(plain.params))


def _with_perms(packed: dict, seed: int, differ: str | None = None) -> dict:
    """The packed tree with act-order input permutations on every q/k/v and gate/up (one per
    set, as GPTQ gives projections of one input; `differ` gets a permutation of its own)."""
    rng = np.random.default_rng(seed)
    flat = flatten(packed)
    for layer in {p.split("/")[1] for p in flat if p.startswith("model/layers_")}:
        for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            heads = [next(h for h in (f"model/{layer}/self_attn/{m}", f"model/{layer}/mlp/{m}")
                          if f"{h}/qweight" in flat) for m in members]
            in_f = TINY.text.hidden_size
            perm = rng.permutation(in_f).astype(np.int32)
            for head in heads:
                flat[f"{head}/perm"] = rng.permutation(in_f).astype(np.int32) if head.endswith(differ or "-") else perm
    return unflatten(flat)


@pytest.mark.parametrize("scheme", [("int8", 8, -1, True), ("int4", 4, 16, False)], ids=["int8", "int4"])
def test_fused_quantized_equals_plain(scheme):
    """Packed weights (with act-order permutations shared by each set) fused, then laid out for
    the CPU: the same logits and tokens as the plain packed model; sets whose permutations
    differ are refused in one line."""
    params = jax.tree.map(np.asarray, init_params(TINY, jax.random.PRNGKey(5)))
    s = Scheme(*scheme)
    packed = _with_perms(quantize_params(params, s), seed=1)
    plain = Qwen2VL(TINY, packed, "float32", quantization=s)
    fused = Qwen2VL(TINY, packed, "float32", quantization=s, fuse_projections=True)
    layer = fused.params["model"]["layers_0"]
    assert "qweight" in layer["self_attn"]["qkv_proj"] and "perm" in layer["mlp"]["gate_up_proj"]
    case = CASES["one_image"]
    hf_utils.assert_same_model(fused, plain, case.inputs(), 10)
    with pytest.raises(InputError, match=r"layers_\d+/self_attn/qkv_proj: .* read their inputs in different orders"):
        fuse_projections(_with_perms(quantize_params(params, s), seed=1, differ="k_proj"))
    # The stored form (what a GPU or TPU runs; on CPU under a mesh): fused, the same again.
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    stored = Qwen2VL(TINY, packed, "float32", mesh=mesh, quantization=s, fuse_projections=True)
    assert stored.params["model"]["layers_0"]["mlp"]["gate_up_proj"]["qweight"].ndim == 2
    np.testing.assert_allclose(stored.logits(**case.inputs()), plain.logits(**case.inputs()), rtol=0, atol=2e-5)
    # The CPU layout (what a CPU model holds) is not the stored form: refused, not misjoined.
    with pytest.raises(InputError, match="CPU layout"):
        Qwen2VL(TINY, plain.params, "float32", quantization=s, fuse_projections=True)


def test_fuse_refuses_sets_that_do_not_match(pair):
    plain, _ = pair
    flat = flatten(plain.params)
    del flat["model/layers_0/self_attn/k_proj/bias"]
    with pytest.raises(InputError, match="layers_0/self_attn/qkv_proj: .* do not hold the same leaves"):
        fuse_projections(unflatten(flat))


@pytest.mark.parametrize("eos", ["none", "early"])
def test_steps_per_iteration_gives_the_same_tokens(pair, eos):
    """K steps per loop iteration: the same tokens for K = 1, 3, 4 (13 new tokens, not a
    multiple of either), also when every row stops on an EOS before max_new_tokens."""
    plain, _ = pair
    ids = np.random.default_rng(0).integers(0, 190, size=(2, 9))
    inputs = plain.inputs(ids, max_new_tokens=13)
    generation = GenerationConfig(max_new_tokens=13, eos_token_ids=())
    free = Engine(plain.module).generate(plain.params, inputs, generation).tokens
    if eos == "early":  # row 0's 4th token and row 1's 6th as EOS ids: every row ends before 13
        generation = GenerationConfig(max_new_tokens=13, eos_token_ids=(int(free[0, 3]), int(free[1, 5])))
    results = [Engine(plain.module, steps_per_iteration=k).generate(plain.params, inputs, generation) for k in (1, 3, 4)]
    want = results[0].tokens
    if eos == "early":
        assert want.shape[1] < 13 and results[0].finished.all()
    else:
        np.testing.assert_array_equal(want, free)
    for r in results[1:]:
        np.testing.assert_array_equal(r.tokens, want)
        np.testing.assert_array_equal(r.finished, results[0].finished)
    with pytest.raises(ValueError, match="at least 1"):
        Engine(plain.module, steps_per_iteration=0)
