"""Weight-only quantization (qwen2vl_jax.quant): the packed form, the matmul, quantized folders.

- Packing and the matmul on small random weights: int4 nibbles, error bounds of int8/int4,
  the blocked CPU matmul (decoding) and the dequantize-then-dot one (prefill) equal to a dot
  with the dequantized weight, through act-order permutations and groups smaller or larger
  than a block; the same for the CPU form (output-major blocks, padded when the inputs do not
  divide); the compiled decode matmul holds no full-size float weight.
- The demo model quantized to int8 and int4 (qwen2vl-convert --quantize of its folder): the
  eval accuracy per task (train/eval.py's evaluate) against float, greedy tokens of int8 equal
  to float's on the eval answers.
- Quantized folders: load as they are, report their bytes, refuse a packed shape that does
  not fit the config; on 8 simulated devices the packed leaves shard like the float weights,
  sharded logits equal unsharded ones (through the blocked matmul), and a mesh that would cut a group is refused.
(GPTQ and AWQ checkpoints kept packed: tests/test_gptq.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax import checkpoint, xla_flags
from qwen2vl_jax import params as params_lib
from qwen2vl_jax.quant import cpu, quantize, tree
from qwen2vl_jax.quant import format as qformat
from qwen2vl_jax.quant import matmul as qmatmul
from qwen2vl_jax.config import DEMO_DIR
from qwen2vl_jax.convert.cli import convert_main
from qwen2vl_jax.errors import CheckpointError, InputError

from children import Child, Children, environ

REPO = Path(__file__).resolve().parents[1]
# The checks in child processes (8 simulated devices; XLA_FLAGS set before JAX starts) run in
# the background from the start of the session (children.py).
CHILDREN = Children(__name__)


# ---------------------------------------------------------------- packing and the matmul
def test_int4_packs_two_rows_per_byte():
    q = np.arange(32, dtype=np.uint8).reshape(8, 4) % 16
    packed = qformat.pack_int4(q)
    assert packed.shape == (4, 4) and packed.dtype == np.uint8
    assert packed[0, 0] == q[0, 0] | (q[1, 0] << 4)
    np.testing.assert_array_equal(qformat.unpack_int4(packed), q)
    np.testing.assert_array_equal(np.asarray(qformat.unpack_int4(jnp.asarray(packed))), q)


def test_quantization_error_is_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    p8 = quantize.quantize_int8(w)
    assert p8["qweight"].dtype == np.int8 and p8["scales"].shape == (1, 40) and "zeros" not in p8
    assert (np.abs(qformat.dequantize(p8, 96) - w) <= p8["scales"] / 2 + 1e-7).all()
    p4 = quantize.quantize_int4(w, 24)
    assert p4["qweight"].shape == (48, 40) and p4["scales"].shape == (4, 40) and p4["zeros"].shape == (4, 40)
    err = np.abs(qformat.dequantize(p4, 96) - w).reshape(4, 24, 40)
    # a group's range may be clipped (CLIP), so the bound holds for all but its extremes
    assert (np.median(err, axis=1) <= p4["scales"] / 2 + 1e-7).all()
    assert np.sqrt((err ** 2).mean()) < 0.1 * w.std()


@pytest.mark.parametrize("in_f,group", [(128, 128), (128, 16), (96, 32)])
def test_group_sizes(in_f, group):
    g = quantize.group_for(in_f, group)
    assert in_f % g == 0 and g <= group and in_f // g >= min(quantize.MIN_GROUPS, in_f)
    assert quantize.group_for(4096, 128) == 128 and quantize.group_for(8960, 128) == 128
    assert quantize.group_for(in_f, -1) == in_f


def _leaves(rng, in_f, out_f, bits, group, perm):
    w = rng.standard_normal((in_f, out_f)).astype(np.float32)
    leaves = quantize.quantize_int8(w) if bits == 8 else quantize.quantize_int4(w, group)
    if perm:
        leaves["perm"] = rng.permutation(in_f).astype(np.int32)
    return leaves


@pytest.mark.parametrize("bits,group,perm", [(8, -1, False), (4, 16, True), (4, 64, False)])
@pytest.mark.parametrize("block_rows", [8, 24, 64])
def test_matmul_equals_the_dequantized_dot(bits, group, perm, block_rows, monkeypatch):
    """Both paths (few rows: blocked; many: dequantize then dot), blocks smaller and larger
    than a group, with and without an input permutation."""
    rng = np.random.default_rng(bits + group + block_rows)
    in_f, out_f = 64, 24
    leaves = _leaves(rng, in_f, out_f, bits, group, perm)
    w = qformat.dequantize({k: v for k, v in leaves.items() if k != "perm"}, in_f)
    monkeypatch.setattr(qmatmul, "BLOCK_BYTES", block_rows * 4 * out_f)  # 24: a shorter last block
    for shape in [(1, 1, in_f), (2, 3, in_f), (4, 9, in_f)]:  # 1 and 6 rows blocked, 36 not
        x = rng.standard_normal(shape).astype(np.float32)
        xp = x[..., leaves["perm"]] if perm else x
        got = np.asarray(jax.jit(qmatmul.matmul, static_argnums=2)(x, {k: jnp.asarray(v) for k, v in leaves.items()},
                                                                 jnp.float32))
        np.testing.assert_allclose(got, xp @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group,perm,in_f,block", [(8, -1, False, 100, 32), (8, -1, True, 100, 2048),
                                                        (4, 16, True, 96, 32), (4, -1, False, 70, 32),
                                                        (4, 48, False, 192, 32)])
def test_cpu_form_equals_the_dequantized_dot(bits, group, perm, in_f, block, monkeypatch):
    """cpu_layout's output-major blocks (one row: fused loops; a few rows: row by row; many:
    dequantized blocks) compute the stored weight's product: with blocks of 32 inputs, 100 and
    70 leave a padded last block and groups of 48 straddle blocks; 2048: one block."""
    rng = np.random.default_rng(bits + in_f + group)
    out_f = 24
    leaves = _leaves(rng, in_f, out_f, bits, group, perm)
    w = qformat.dequantize({k: v for k, v in leaves.items() if k != "perm"}, in_f)
    shapes = {"lm_head": {"kernel": jax.ShapeDtypeStruct((in_f, out_f), jnp.float32)}}
    monkeypatch.setattr(cpu, "BLOCK_INPUTS", block)
    form = cpu.cpu_layout({"lm_head": leaves}, shapes)["lm_head"]
    assert form["qweight"].ndim == 3 and form["qweight"].dtype == leaves["qweight"].dtype
    assert (form["qweight"].shape[0] > 1) == (block == 32)
    for rows in (1, 3, 20):
        x = rng.standard_normal((rows, in_f)).astype(np.float32)
        xp = x[..., leaves["perm"]] if perm else x
        got = np.asarray(jax.jit(qmatmul.matmul, static_argnums=2)(x, {k: jnp.asarray(v) for k, v in form.items()},
                                                                 jnp.float32))
        np.testing.assert_allclose(got, xp @ w, rtol=1e-5, atol=1e-5 * np.abs(xp @ w).max())


@pytest.mark.parametrize("bits,group", [(8, -1), (4, 16)])
def test_cpu_form_bf16_products(bits, group):
    """products="bf16": 64 rows or more (prefill) take bf16 inputs, as a float model's products
    do under matmul="bf16"; fewer rows are the f32 product bit for bit."""
    from qwen2vl_jax.quant.cpu import BF16_MIN_ROWS

    rng = np.random.default_rng(bits)
    in_f, out_f = 96, 40
    leaves = _leaves(rng, in_f, out_f, bits, group, False)
    w = qformat.dequantize(leaves, in_f).astype(np.float64)
    shapes = {"lm_head": {"kernel": jax.ShapeDtypeStruct((in_f, out_f), jnp.float32)}}
    form = {k: jnp.asarray(v) for k, v in cpu.cpu_layout({"lm_head": leaves}, shapes)["lm_head"].items()}
    run = jax.jit(qmatmul.matmul, static_argnums=(2, 3, 4))
    as_bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    for rows in (BF16_MIN_ROWS - 1, BF16_MIN_ROWS, 150):
        x = rng.standard_normal((rows, in_f)).astype(np.float32)
        f32 = np.asarray(run(x, form, jnp.float32, "cpu", "f32"))
        got = np.asarray(run(x, form, jnp.float32, "cpu", "bf16"))
        if rows < BF16_MIN_ROWS:
            np.testing.assert_array_equal(got, f32)
            continue
        scale = np.abs(x @ w).max()
        if group == -1:  # the integers are exact in bf16, the scale comes after the product: x alone is rounded
            np.testing.assert_allclose(got, as_bf16(x) @ w, rtol=0, atol=1e-4 * scale)
        else:  # int4 in groups: q * s (= w + zero * s) rounded to bf16, the zero points' term in f32; XLA
            # may keep x in f32 here (it is allowed excess precision), which it does for some shapes
            offsets = np.repeat(leaves["zeros"].astype(np.float64) * leaves["scales"], group, axis=0)
            weight = as_bf16(w + offsets)
            err = min(np.abs(got - (xr @ weight - x @ offsets)).max() for xr in (as_bf16(x), x))
            assert err <= 1e-4 * scale, err
        assert np.abs(got - f32).max() > 1e-3 * scale  # and clearly apart from the f32 product


def test_embedding_lookup_and_tied_head():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((37, 16)).astype(np.float32)
    packed = {k: jnp.asarray(v) for k, v in quantize.quantize_embedding(table).items()}
    assert packed["qweight"].shape == (37, 16) and packed["scales"].shape == (37, 1)
    rows = np.asarray(qmatmul.embed_lookup(jnp.arange(37), packed, jnp.float32))
    assert np.abs(rows - table).max() <= np.abs(table).max(axis=1).max() / 254 + 1e-6
    for n in (1, 20):  # blocked and plain
        h = rng.standard_normal((n, 16)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(qmatmul.embed_attend(h, packed, jnp.float32)), h @ rows.T,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU decode path")
def test_decode_matmul_never_builds_the_float_weight():
    """XLA's CPU compiler does not fuse a dequantize into the dot: `x @ dequantize(W)` writes
    the whole f32 weight every call. The decode path's compiled program holds only blocks."""
    in_f, out_f = 1024, 512
    leaves = {k: jnp.asarray(v) for k, v in quantize.quantize_int8(np.ones((in_f, out_f), np.float32)).items()}
    x = jnp.ones((1, in_f), jnp.float32)
    full = f"f32[{in_f},{out_f}]"
    naive = jax.jit(lambda x, p: x @ qformat.dequantize(p, in_f)).lower(x, leaves).compile().as_text()
    ours = jax.jit(lambda x, p: qmatmul.matmul(x, p, jnp.float32)).lower(x, leaves).compile().as_text()
    assert full in naive
    assert full not in ours and "while" in ours


def test_kernel_follows_the_model_backend_not_the_host(monkeypatch):
    """The packed product's kernel is a setting of the loaded model (`backend`, read once at
    load), not `jax.default_backend()` read while tracing: built for "tpu" on this host, an int8
    model keeps its kernels as stored and lowers the dequantize-and-dot a TPU runs; built for
    "cpu" (this host's default) it takes the CPU form. Both give the same logits and tokens,
    without reading the host's backend once built."""
    import hf_utils
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.config import TINY
    from qwen2vl_jax.modules.qwen2vl import init_params

    in_f, out_f = 64, 48
    leaves = {k: jnp.asarray(v) for k, v in quantize.quantize_int8(np.ones((in_f, out_f), np.float32)).items()}
    x = jnp.ones((1, in_f), jnp.float32)
    lowered = {b: jax.jit(lambda x, p, b=b: qmatmul.matmul(x, p, jnp.float32, b)).lower(x, leaves).as_text()
               for b in ("cpu", "tpu")}
    assert "while" in lowered["cpu"] and "while" not in lowered["tpu"]

    scheme = qformat.Scheme.of("int8")
    packed = tree.quantize_params(jax.tree_util.tree_map(np.asarray, init_params(TINY, jax.random.PRNGKey(0))), scheme)
    host = Qwen2VL(TINY, packed, "float32", quantization=scheme)
    tpu = Qwen2VL(TINY, packed, "float32", quantization=scheme, backend="tpu")
    assert host.backend == jax.default_backend() and tpu.backend == "tpu" == tpu.module.backend
    assert tpu.params["model"]["layers_0"]["mlp"]["up_proj"]["qweight"].ndim == 2  # as stored
    if jax.default_backend() == "cpu":
        assert host.params["model"]["layers_0"]["mlp"]["up_proj"]["qweight"].ndim == 3  # the CPU form

    def no_backend_while_tracing():
        raise AssertionError("jax.default_backend() read after the model was built")

    monkeypatch.setattr(jax, "default_backend", no_backend_while_tracing)
    case = hf_utils.make_case("q", [[5, 6, 7, 8, 9], [3, 4, 9, 2, 2]], [], [], seed=3)
    ref = host.logits(**case.inputs())
    np.testing.assert_allclose(tpu.logits(**case.inputs()), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(tpu.generate(**case.inputs(), max_new_tokens=4),
                                  host.generate(**case.inputs(), max_new_tokens=4))
    with pytest.raises(InputError, match="backend must be one of cpu, gpu, tpu"):
        Qwen2VL(TINY, packed, "float32", quantization=scheme, backend="npu")


def test_format_and_quantizers_import_no_jax():
    """convert/'s side of quantization (the stored format, the offline quantizers) is numpy only."""
    code = ("import sys, qwen2vl_jax.quant.format, qwen2vl_jax.quant.quantize; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'orbax')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def _computations(hlo: str) -> list[str]:
    return [c for c in hlo.split("\n\n") if "{" in c]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU decode path")
@pytest.mark.parametrize("head", [False, True])
def test_integer_loops_read_their_input_from_a_buffer(head):
    """A fused integer loop must not recompute its input's producer (here abs; in the model an
    RMSNorm or silu(gate) * up) for every weight element it reads; a row whose first input is
    NaN still gives NaNs, and the other rows are unchanged."""
    rng = np.random.default_rng(3)
    in_f, out_f = 64, 48
    w = rng.standard_normal((in_f, out_f)).astype(np.float32)
    if head:  # the tied output head: an int8 table [V, D]
        packed = {k: jnp.asarray(v) for k, v in quantize.quantize_embedding(w.T).items()}
        fn = lambda x, p: qmatmul.embed_attend(jnp.abs(x), p, jnp.float32)  # noqa: E731
        ref = packed["qweight"].astype(np.float32).T * np.asarray(packed["scales"])[:, 0]
    else:
        shapes = {"lm_head": {"kernel": jax.ShapeDtypeStruct((in_f, out_f), jnp.float32)}}
        packed = cpu.cpu_layout({"lm_head": quantize.quantize_int8(w)}, shapes)["lm_head"]
        packed = {k: jnp.asarray(v) for k, v in packed.items()}
        fn = lambda x, p: qmatmul.matmul(jnp.abs(x), p, jnp.float32)  # noqa: E731
        ref = qformat.dequantize(quantize.quantize_int8(w), in_f)
    # the head fuses its table into the loop for one row (more rows convert the table once)
    x = (0.1 * rng.standard_normal((1 if head else 3, in_f))).astype(np.float32)
    compiled = jax.jit(fn).lower(x, packed).compile().as_text()
    loops = [c for c in _computations(compiled) if "s8[" in c and "convert(" in c]
    assert loops and not any("abs(" in c for c in loops)
    got = np.asarray(jax.jit(fn)(x, packed))
    np.testing.assert_allclose(got, np.abs(x) @ ref, rtol=1e-5, atol=1e-5)
    nan_row = len(x) // 2
    x[nan_row, 0] = np.nan
    got = np.asarray(jax.jit(fn)(x, packed))
    others = [r for r in range(len(x)) if r != nan_row]
    assert np.isnan(got[nan_row]).all() and not np.isnan(got[others]).any()
    np.testing.assert_allclose(got[others], np.abs(x[others]) @ ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the demo model
@pytest.fixture(scope="module")
def demo_quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_q")
    for method in ("int8", "int4"):
        assert convert_main([str(DEMO_DIR), str(root / method), "--quantize", method, "--quiet"]) == 0
    return root


def test_demo_accuracy_quantized(demo_quantized, tmp_path, monkeypatch, capsys):
    """evaluate() on the same held-out questions: float, int8 and int4 per task; int8's greedy
    tokens equal float's on at least 95% of the answers that are not boxes. (The numbers are printed.)"""
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.train import synthetic
    from qwen2vl_jax.train.eval import evaluate

    paths = synthetic.write_dataset(tmp_path / "data", seed=11, counts=synthetic.Counts(
        images=1, videos=1, other=1, eval_per_task=3))
    answers: dict[str, list] = {}
    generate = Qwen2VL.generate

    def recording(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        key = self.quantization.method if self.quantization else "float"
        answers.setdefault(key, []).extend(np.asarray(out).tolist())
        return out

    monkeypatch.setattr(Qwen2VL, "generate", recording)
    results = {name: evaluate(folder, paths["eval"], batch_size=32) for name, folder in
               (("float", DEMO_DIR), ("int8", demo_quantized / "int8"), ("int4", demo_quantized / "int4"))}
    with capsys.disabled():
        for name, r in results.items():
            print(f"\n{name}: {r['accuracy']:.3f} " + " ".join(f"{t}={v['accuracy']:.2f}" for t, v in r["tasks"].items()))
    total = results["float"]["total"]
    assert total == 3 * len(synthetic.EVAL_TASKS) and len(answers["float"]) == len(answers["int8"]) == total
    for task, ref in results["float"]["tasks"].items():
        if task in synthetic.GROUNDING_TASKS:  # boxes: the mean IoU, as a hit at 0.5 turns on a few pixels
            assert abs(results["int8"]["tasks"][task]["iou"] - ref["iou"]) <= 0.05, task
            assert abs(results["int4"]["tasks"][task]["iou"] - ref["iou"]) <= 0.25, task
            continue
        assert abs(results["int8"]["tasks"][task]["accuracy"] - ref["accuracy"]) <= 0.01, task
        # int4 on this 128-wide model: at most one answer of the task differs
        assert abs(results["int4"]["tasks"][task]["accuracy"] - ref["accuracy"]) <= 1 / ref["total"] + 1e-9, task
    eos = set(Qwen2VL.from_pretrained(DEMO_DIR).generation_config.eos_token_ids)

    def until_eos(tokens):
        return next((tokens[:i + 1] for i, t in enumerate(tokens) if t in eos), tokens)

    # int8's tokens equal float's, but for the box digits, which turn on near ties (a box's
    # worth is its IoU, checked above)
    tasks = [json.loads(x)["task"] for x in paths["eval"].read_text().splitlines()]
    pairs = [(a, b) for a, b, t in zip(answers["float"], answers["int8"], tasks) if t not in synthetic.GROUNDING_TASKS]
    same = sum(until_eos(a) == until_eos(b) for a, b in pairs)
    assert len(pairs) == total - 3 * len(synthetic.GROUNDING_TASKS) and same >= 0.95 * len(pairs), f"{same} of {len(pairs)}"


def test_quantized_folder_loads_as_it_is_and_reports_its_bytes(demo_quantized, tmp_path):
    from qwen2vl_jax.api import Qwen2VL

    float_model = Qwen2VL.from_pretrained(DEMO_DIR)
    sizes, decoder = {}, {}
    for method in ("int8", "int4"):
        model = Qwen2VL.from_pretrained(demo_quantized / method)
        assert model.quantization == qformat.Scheme.of(method)
        layer = model.params["model"]["layers_0"]["mlp"]["down_proj"]
        assert "kernel" not in layer and layer["qweight"].dtype == (jnp.int8 if method == "int8" else jnp.uint8)
        assert "qweight" in model.params["model"]["embed_tokens"]  # the tied head
        assert "kernel" in model.params["visual"]["blocks_0"]["mlp"]["fc1"]  # the vision tower stays float
        sizes[method] = model.param_bytes
        assert sizes[method] == sum(model.param_bytes_per_device().values())
        decoder[method] = params_lib.param_bytes(model.params["model"])
    # the decoder: int8 weights, f32 norms, biases and scales; int4 smaller again
    assert decoder["int4"] < decoder["int8"] < 0.3 * params_lib.param_bytes(float_model.params["model"])
    assert sizes["int4"] < sizes["int8"] < float_model.param_bytes

    # a packed shape that does not fit the config is one CheckpointError naming the layer
    bad = Path(shutil.copytree(demo_quantized / "int8", tmp_path / "bad"))
    tree = checkpoint.load_numpy(bad, list(checkpoint.stored_params(bad)))
    tree["model/layers_1/self_attn/q_proj/scales"] = tree["model/layers_1/self_attn/q_proj/scales"][:, :-1]
    shutil.rmtree(bad / "params")
    from qwen2vl_jax.params import unflatten

    checkpoint._ocp().save((bad / "params").resolve(), unflatten(tree))
    with pytest.raises(CheckpointError, match=r"model/layers_1/self_attn/q_proj: scales \(1, 127\) are not"):
        Qwen2VL.from_pretrained(bad)


# ---------------------------------------------------------------- sharding (8 simulated devices)
def _sharding_worker() -> dict:
    import hf_utils
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.errors import InputError
    from qwen2vl_jax.modules.qwen2vl import init_params
    from qwen2vl_jax.sharding import make_mesh

    config = hf_utils.TINY_CONFIGS["sharded"]
    params = tree.quantize_params(jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0))),
                                  qformat.Scheme.of("int4", group_size=16))
    case = hf_utils.make_case("q", [[5, 6, 7, 8, 9], [3, 4, 9, 2, 2]], [], [], seed=3)
    ref = Qwen2VL(config, params, "float32")
    ref_logits = ref.logits(**case.inputs())  # 10 rows: the blocked decode matmul
    model = Qwen2VL(config, params, "float32", mesh=make_mesh("data=2,fsdp=2,tensor=2"))
    layer = model.params["model"]["layers_0"]
    specs = {name: [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec]
             for name, leaf in (("q_qweight", layer["self_attn"]["q_proj"]["qweight"]),
                                ("q_scales", layer["self_attn"]["q_proj"]["scales"]),
                                ("down_qweight", layer["mlp"]["down_proj"]["qweight"]),
                                ("down_scales", layer["mlp"]["down_proj"]["scales"]))}
    out = {"specs": specs,
           "logits_err": float(np.abs(model.logits(**case.inputs()) - ref_logits).max() / np.abs(ref_logits).max())}
    try:
        Qwen2VL(config, params, "float32", mesh=make_mesh("data=2,tensor=4"))
        out["refused"] = None
    except InputError as e:
        out["refused"] = str(e)
    return out


def _sharding_child() -> Child:
    env = environ()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    code = ("import jax; jax.config.update('jax_num_cpu_devices', 8); import json, test_quant; "
            "print(json.dumps(test_quant._sharding_worker()))")
    return Child([sys.executable, "-c", code], env=env, timeout=300)


CHILDREN.add("sharding", _sharding_child, read_by=("test_packed_params_shard_like_float_weights",))


def test_packed_params_shard_like_float_weights():
    proc = CHILDREN.result("sharding")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # q_proj [64, 64] is (param_embed, heads): rows over fsdp, columns over tensor; its 4 groups
    # of 16 split with the rows. down_proj [96, 64] is (mlp, param_embed): rows (6 groups) over
    # tensor=2; tensor=4 would cut them.
    assert report["specs"] == {"q_qweight": ["fsdp", "tensor"], "q_scales": ["fsdp", "tensor"],
                               "down_qweight": ["tensor", "fsdp"], "down_scales": ["tensor", "fsdp"]}
    assert report["logits_err"] < 1e-5
    assert report["refused"].startswith("the mesh would cut the quantization groups of ")
    assert "model/layers_0/mlp/down_proj (6 groups over tensor=4)" in report["refused"]
    assert "\n" not in report["refused"]


_PREFILL_TEMP = """
import json, sys
import jax, numpy as np
from qwen2vl_jax import xla_flags
assert xla_flags.sequential_cpu_schedule() is (sys.argv[1] == "off")  # as the CLIs do for a quantized folder
from qwen2vl_jax.quant import format as qformat, tree
from qwen2vl_jax.api import Qwen2VL
from qwen2vl_jax.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_jax.modules.qwen2vl import init_params
from qwen2vl_jax.engine import RowSettings
from qwen2vl_jax.sampling import GenerationConfig

cfg = Qwen2VLConfig(vision=VisionConfig(depth=1, embed_dim=32, num_heads=2, out_hidden_size=512),
                    text=TextConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                    num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12)),
                    tie_word_embeddings=True)
scheme = qformat.Scheme.of("int8")
params = tree.quantize_params(jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.PRNGKey(0))), scheme)
model = Qwen2VL(cfg, params, "float32", quantization=scheme)
built = model.inputs(input_ids=np.ones((1, 200), np.int64), attention_mask=np.ones((1, 200), np.int64), max_new_tokens=1)
slots = model.engine.cache_slots(built, 1)
batch = {"input_ids": built.input_ids, "positions": built.positions, "pos_offset": built.pos_offset,
         "mask": built.attention_mask}
generation = GenerationConfig(max_new_tokens=1, eos_token_ids=())
compiled = model.engine.program("prefill").lower(model.params, batch, None, RowSettings.repeat(generation, 1), slots, True).compile()
print(json.dumps({"temp": compiled.memory_analysis().temp_size_in_bytes}))
"""


def _prefill_child(schedule: str) -> Child:
    env = {k: v for k, v in environ().items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if schedule == "on":  # the user's own setting stays
        env["XLA_FLAGS"] = f"--{xla_flags.SCHEDULER_FLAG}=true"
    return Child([sys.executable, "-c", _PREFILL_TEMP, schedule], env=env, timeout=300)


def _prefill_temp(schedule: str) -> int:
    done = CHILDREN.result(f"prefill_{schedule}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["temp"]


if xla_flags.jaxlib_version() in xla_flags.SCHEDULER_FLAG_VERSIONS:  # else the test skips
    for _schedule in ("off", "on"):
        CHILDREN.add(f"prefill_{_schedule}", lambda s=_schedule: _prefill_child(s),
                     read_by=("test_quantized_prefill_holds_one_layer_of_dequantized_weights",))


def test_quantized_prefill_holds_one_layer_of_dequantized_weights():
    # On CPU each layer's int8 weights become f32 for the prefill's products; XLA's
    # concurrency-optimised scheduler keeps all layers' copies live at once (a multi-GB
    # temporary at 2B, page-faulted on every call); sequential_cpu_schedule turns it off.
    version = xla_flags.jaxlib_version()
    if version not in xla_flags.SCHEDULER_FLAG_VERSIONS:
        pytest.skip(f"the scheduler flag is set only for jaxlib {xla_flags.SCHEDULER_FLAG_VERSIONS} (this is {version})")
    d, f, kv = 512, 2048, 2 * 64
    one_layer = 4 * (3 * d * f + 2 * d * d + 2 * d * kv)  # f32 bytes of one layer's dequantized kernels
    assert _prefill_temp("off") < 2 * one_layer  # all six layers live at once would be >= 6x
    assert _prefill_temp("on") > 4 * one_layer  # what the flag is for: the scheduler left on


_LOAD_FLAGS = """
import os, sys
from qwen2vl_jax import xla_flags
xla_flags.for_model(sys.argv[1])  # as the command-line tools do, before JAX starts
from qwen2vl_jax.api import Qwen2VL
Qwen2VL.from_pretrained(sys.argv[1])
print(os.environ.get("XLA_FLAGS", ""))
"""


def test_only_a_quantized_folder_turns_the_scheduler_off(demo_quantized):
    if xla_flags.jaxlib_version() not in xla_flags.SCHEDULER_FLAG_VERSIONS:
        pytest.skip(f"the scheduler flag is set only for jaxlib {xla_flags.SCHEDULER_FLAG_VERSIONS}")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    runs = [(folder, expected, Child([sys.executable, "-c", _LOAD_FLAGS, str(folder)], env=env, timeout=300))
            for folder, expected in ((demo_quantized / "int8", f"--{xla_flags.SCHEDULER_FLAG}=false"), (DEMO_DIR, ""))]
    try:
        for folder, expected, child in runs:  # the two processes at once
            done = child.result()
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stdout.strip().splitlines()[-1:] == ([expected] if expected else []), folder
    finally:
        for _, _, child in runs:
            child.kill()


