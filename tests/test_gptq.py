"""GPTQ (AutoGPTQ "gptq" v1) and AWQ (GEMM) checkpoints: tiny random HF models whose decoder
linears are quantized here (chosen integers, zeros and fp16 scales), packed into the published
layout by a packer written from the format's description, and converted, both kept packed (the
default) and dequantized to float (--dtype). Either way the weights equal the ones dequantized
from the chosen integers bit for bit, and fp32 logits equal HF's on a model holding those same
float weights. Unsupported quantizations and bad tensors are refused with one line and nothing
written."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import hf_utils
from hf_utils import read_all, to_tf5_name, write_folder
from qwen2vl_jax import checkpoint
from qwen2vl_jax.quant import format as quant
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.convert import gptq
from qwen2vl_jax.convert.cli import convert_main
from qwen2vl_jax.convert.convert import convert_checkpoint
from qwen2vl_jax.hf_mapping import hf_to_jax_name, normalize_hf_name, to_jax
from qwen2vl_jax.params import flatten
from qwen2vl_jax.errors import CheckpointError

torch = pytest.importorskip("torch")

# The CPU's packed matmul folds zero points into offsets (x @ (q * s) - sums @ (z * s), quant/cpu.py
# cpu_layout): two large terms cancel, so asymmetric 8-bit layers round a few times more than
# HF's x @ ((q - z) * s); measured up to 5.7e-6 of the largest logit.
PACKED_RTOL = 1.5e-5
CASE = {c.name: c for c in hf_utils.standard_cases()}["left_padded_batch"]

SPECS = hf_utils.GPTQ_SPECS  # widths that pack 8 (or 4) values per int32
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


@dataclasses.dataclass(frozen=True)
class Quant:
    model: str
    bits: int
    group_size: int  # -1: one group
    desc_act: bool  # shuffled g_idx
    sym: bool
    where: str  # quantization_config at the "top" of the nested config, under "text_config", or a "flat" config
    tf5_names: bool = False
    method: str = "gptq"  # or "awq" (4 bit, zero points, GEMM packing; no g_idx)


CASES = {
    "int4-g32": Quant("untied", 4, 32, desc_act=False, sym=True, where="top"),  # 48 = 32 + 16: a short last group
    "int4-desc_act-tied": Quant("tied", 4, 32, desc_act=True, sym=True, where="text_config"),
    "int8-asym-one_group-tf5": Quant("untied", 8, -1, desc_act=False, sym=False, where="flat", tf5_names=True),
    "int4-asym-desc_act-g16": Quant("untied", 4, 16, desc_act=True, sym=False, where="top"),
    "awq-g16": Quant("untied", 4, 16, desc_act=False, sym=False, where="top", method="awq"),
}
PACKED_CASES = [name for name in CASES if name != "int4-g32"]  # int4-g32's short group: the float path's
GENERATE_CASE = "int4-asym-desc_act-g16"  # greedy decoding through the packed layers, once


# ---------------------------------------------------------------- quantizing and packing
def quantize(rng, in_f: int, out_f: int, q: Quant):
    """Chosen integers [I, O], zero points [G, O], fp16 scales [G, O] and g_idx [I]."""
    top = 2**q.bits
    n_groups = 1 if q.group_size == -1 else -(-in_f // q.group_size)
    ints = rng.integers(0, top, (in_f, out_f))
    zeros = np.full((n_groups, out_f), top // 2) if q.sym else rng.integers(1, top, (n_groups, out_f))
    # std of the weights near 1/sqrt(fan_in), so a wrong weight moves the logits
    scales = (rng.uniform(0.5, 1.5, (n_groups, out_f)) / (0.3 * top * np.sqrt(in_f))).astype(np.float16)
    g_idx = np.arange(in_f) // q.group_size if q.group_size != -1 else np.zeros(in_f, np.int64)
    if q.desc_act:
        g_idx = g_idx[rng.permutation(in_f)]
        assert not np.array_equal(g_idx, np.sort(g_idx))
    return ints, zeros, scales, g_idx.astype(np.int32)


def dequantized(ints, zeros, scales, g_idx) -> np.ndarray:
    """W [I, O] from the unpacked integers (exact in float32)."""
    return (ints - zeros[g_idx]).astype(np.float32) * scales[g_idx].astype(np.float32)


def pack_rows(ints: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] -> int32 [R*bits/32, C]: row r is bits bits*(r%n).. of word r//n, n = 32/bits."""
    n = 32 // bits
    words = np.zeros((ints.shape[0] // n, ints.shape[1]), np.uint32)
    for r in range(ints.shape[0]):
        words[r // n] |= ints[r].astype(np.uint32) << np.uint32(bits * (r % n))
    return words.view(np.int32)


def pack_cols(ints: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] -> int32 [R, C*bits/32]: column c is bits bits*(c%n).. of word c//n."""
    return np.ascontiguousarray(pack_rows(ints.T, bits).T)


def pack_awq(ints: np.ndarray) -> np.ndarray:
    """[R, C] 4 bit -> int32 [R, C/8] as AutoAWQ's GEMM layer packs: nibble i of word k holds
    column 8k + (0, 2, 4, 6, 1, 3, 5, 7)[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    words = np.zeros((ints.shape[0], ints.shape[1] // 8), np.uint32)
    for k in range(words.shape[1]):
        for i in range(8):
            words[:, k] |= ints[:, 8 * k + order[i]].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def build(root: Path, q: Quant):
    """-> (HF model holding the dequantized float weights, GPTQ folder, {JAX kernel path: W})."""
    spec = SPECS[q.model]
    model = hf_utils.build_hf_model(spec)
    rng = np.random.default_rng(spec.seed)
    tensors, kernels = {}, {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            name = normalize_hf_name(name)
            if name == "lm_head.weight" and spec.tie:
                continue  # published tied checkpoints do not store it
            if QUANTIZED.match(name):
                out_f, in_f = p.shape
                ints, zeros, scales, g_idx = quantize(rng, in_f, out_f, q)
                w = dequantized(ints, zeros, scales, g_idx)
                p.copy_(torch.from_numpy(w.T))  # the reference model holds exactly these weights
                kernels[hf_to_jax_name(name)[0]] = w
                prefix = name[: -len(".weight")]
                if q.method == "awq":
                    tensors.update({f"{prefix}.qweight": pack_awq(ints), f"{prefix}.qzeros": pack_awq(zeros),
                                    f"{prefix}.scales": scales})
                else:
                    tensors.update({
                        f"{prefix}.qweight": pack_rows(ints, q.bits),
                        f"{prefix}.qzeros": pack_cols(zeros - 1, q.bits),  # v1 stores zero - 1
                        f"{prefix}.scales": scales,
                        f"{prefix}.g_idx": g_idx,
                    })
            else:  # vision, embeddings, norms, biases, lm_head stay fp16 in GPTQ releases
                half = p.half()
                p.copy_(half.float())
                tensors[name] = half.numpy()
    if q.tf5_names:
        tensors = {to_tf5_name(k): v for k, v in tensors.items()}
    root.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(root)  # transformers 5's nested layout
    config = json.loads((root / "config.json").read_text())
    if q.where == "flat":
        config = Qwen2VLConfig.from_hf(config).to_hf()
    quant = {"bits": q.bits, "group_size": q.group_size, "desc_act": q.desc_act, "sym": q.sym,
             "damp_percent": 0.01, "true_sequential": True, "quant_method": "gptq"}
    if q.method == "awq":
        quant = {"bits": 4, "group_size": q.group_size, "zero_point": True, "version": "gemm", "quant_method": "awq"}
    (config["text_config"] if q.where == "text_config" else config)["quantization_config"] = quant
    (root / "config.json").unlink()
    return model.eval(), write_folder(root / "gptq", tensors, config), kernels


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(tmp_path_factory.mktemp(name), CASES[name])
        return cache[name]

    return get


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---------------------------------------------------------------- tests
def test_unpack_reads_the_published_bit_order():
    words = np.array([[0x76543210, -0x01234568]], np.int32)  # the second is 0xFEDCBA98
    np.testing.assert_array_equal(gptq.unpack(words, 4, axis=1), [list(range(16))])
    np.testing.assert_array_equal(gptq.unpack(words.T, 4, axis=0), np.arange(16).reshape(16, 1))
    np.testing.assert_array_equal(gptq.unpack(np.array([[0x04030201]], np.int32), 8, axis=1), [[1, 2, 3, 4]])


def test_stored_zero_wraps_within_the_bit_width():
    """v1 stores zero - 1 in `bits` bits, so a zero point of 0 is stored as 15 and read back as
    (15 + 1) & 15 = 0 (AutoGPTQ's reading), not 16."""
    qweight = np.full((1, 8), 0x33333333, np.int32)  # 8 input rows of q = 3, 8 output columns
    qzeros = np.array([[-1]], np.int32)  # every 4-bit zero stored as 15
    scales = np.full((1, 8), 0.5, np.float16)
    w = gptq.dequantize(qweight, qzeros, scales, np.zeros(8, np.int32), bits=4)
    np.testing.assert_array_equal(w, np.full((8, 8), 1.5, np.float32))  # (3 - 0) * 0.5


@pytest.mark.parametrize("case_name", ["int4-g32", "int4-desc_act-tied", "int8-asym-one_group-tf5", "awq-g16"])
def test_gptq_converts_to_the_dequantized_weights(built, tmp_path, case_name):
    from qwen2vl_jax.api import Qwen2VL

    hf_model, src, kernels = built(case_name)
    out = tmp_path / "jax"
    assert convert_main([str(src), str(out), "--dtype", "float32", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config.get("text_config", {})

    ours = Qwen2VL.from_pretrained(out, dtype="float32")
    flat = flatten(ours.params)
    assert len(kernels) == 7 * SPECS[CASES[case_name].model].layers
    for path, want in kernels.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), want, err_msg=path)
    for name, value in hf_model.state_dict().items():  # the fp16 tensors too
        path, transform = hf_to_jax_name(name)
        if path in flat:
            np.testing.assert_array_equal(np.asarray(flat[path]), to_jax(value.numpy(), transform, None), err_msg=name)

    with torch.no_grad():
        ref = hf_model(**CASE.torch_inputs()).logits.numpy()
    mine = ours.logits(**CASE.inputs())
    hf_utils.assert_logits_close(mine, ref, CASE.attention_mask, PACKED_RTOL)


def test_bfloat16_output_is_the_dequantized_weight_rounded_once(built, tmp_path):
    _, src, kernels = built("int4-desc_act-tied")
    out = tmp_path / "jax"
    convert_checkpoint(src, out, dtype="bfloat16", progress=False)
    stored = checkpoint.load_numpy(out, list(kernels))
    for path, want in kernels.items():
        assert stored[path].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(stored[path].view(np.int16), want.astype(ml_dtypes.bfloat16).view(np.int16))


@pytest.mark.parametrize("case_name", PACKED_CASES)
def test_packed_checkpoints_stay_packed_and_match_hf(built, tmp_path, case_name):
    """Converted as they are: the folder records the scheme, every quantized layer is stored
    packed (no float kernel), its integers, zero points and fp16 scales dequantize to exactly
    the chosen weights (through the act-order permutation), and fp32 logits and greedy tokens
    equal HF's on the dequantized model (for one case, greedy tokens too: the decode steps take
    the blocked CPU matmul)."""
    from qwen2vl_jax.api import Qwen2VL

    q = CASES[case_name]
    hf_model, src, kernels = built(case_name)
    out = tmp_path / "jax"
    assert convert_main([str(src), str(out), "--quiet"]) == 0
    assert checkpoint.read_scheme(out) == quant.Scheme(q.method, q.bits, q.group_size, head=False)
    stored = checkpoint.stored_params(out)
    for path, want in kernels.items():
        head = path.rpartition("/")[0]
        assert path not in stored
        q_dtype = stored[f"{head}/qweight"][1]
        assert q_dtype == np.uint8, (path, q_dtype)
        assert stored[f"{head}/scales"][1] == np.float16  # as stored in the checkpoint
    flat = flatten(checkpoint.load_numpy(out, list(stored)))
    permuted = 0
    for path, want in kernels.items():
        head = path.rpartition("/")[0]
        leaves = {k: flat[f"{head}/{k}"] for k in quant.PARTS if f"{head}/{k}" in flat}
        w = quant.dequantize(leaves, want.shape[0])
        if "perm" in leaves:
            permuted += 1
            w_full = np.empty_like(w)
            w_full[leaves["perm"]] = w  # row i of the stored weight is input feature perm[i]
            w = w_full
        np.testing.assert_array_equal(w, want, err_msg=path)
    assert permuted == (len(kernels) if q.desc_act else 0)

    ours = Qwen2VL.from_pretrained(out, dtype="float32")
    with torch.no_grad():
        ref = hf_model(**CASE.torch_inputs()).logits.numpy()
    mine = ours.logits(**CASE.inputs())
    hf_utils.assert_logits_close(mine, ref, CASE.attention_mask, PACKED_RTOL)
    if case_name != GENERATE_CASE:
        return
    with torch.no_grad():
        hf_tokens = hf_model.generate(**CASE.torch_inputs(), max_new_tokens=6, do_sample=False).numpy()
    tokens = np.asarray(ours.generate(**CASE.inputs(), max_new_tokens=6, do_sample=False))
    eos = set(ours.generation_config.eos_token_ids)
    for mine, ref in zip(tokens.tolist(), hf_tokens[:, CASE.input_ids.shape[1]:].tolist()):
        cut = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
        assert mine[:cut] == ref[:cut]


def test_quantize_is_refused_for_a_packed_checkpoint(built, tmp_path, capsys):
    _, src, _ = built("int4-g32")
    out = tmp_path / "out"
    assert convert_main([str(src), str(out), "--quantize", "int8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is already GPTQ-quantized; --quantize takes a float checkpoint" in err and err.count("\n") == 1, err
    assert_nothing_left(out)


@pytest.mark.parametrize("change,message", [
    ({"bits": 3}, "config.json: GPTQ with bits=3 is not supported (only 4 or 8)"),
    ({"checkpoint_format": "gptq_v2"}, "config.json: GPTQ checkpoint_format 'gptq_v2' is not supported"),
    ({"quant_method": "bitsandbytes"}, "config.json: quantization method 'bitsandbytes' is not supported"),
    ({"quant_method": "awq", "version": "gemv"}, "config.json: AWQ version 'gemv' is not supported (only GEMM"),
    ([4, 128], "config.json: quantization_config is not a JSON object"),
])
def test_unsupported_quantization_is_refused_in_one_line(built, tmp_path, capsys, change, message):
    _, src, _ = built("int4-g32")
    bad = Path(shutil.copytree(src, tmp_path / "bad"))
    config = json.loads((bad / "config.json").read_text())
    if isinstance(change, dict):
        config["quantization_config"].update(change)
    else:
        config["quantization_config"] = change
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert convert_main([str(bad), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen2vl-convert: error: " + message) and err.count("\n") == 1, err
    assert_nothing_left(out)


def test_bad_quantized_tensors_are_named_in_one_error(built, tmp_path):
    _, src, _ = built("int4-g32")
    t = read_all(src)
    t["model.layers.1.mlp.down_proj.qweight"] = t["model.layers.1.mlp.down_proj.qweight"][:-1].copy()  # I = 88
    del t["model.layers.0.self_attn.k_proj.scales"]
    t["model.layers.0.self_attn.v_proj.g_idx"] = np.zeros(47, np.int32)
    bad = write_folder(tmp_path / "bad", t, json.loads((src / "config.json").read_text()))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(bad, out, progress=False)
    msg = str(err.value)
    # one line naming the first problems and counting the rest
    assert msg == ("checkpoint does not match its config: 3 shape mismatch(es): "
                   "model.layers.0.self_attn.k_proj: quantized layer lacks model.layers.0.self_attn.k_proj.scales; "
                   "model.layers.0.self_attn.v_proj.g_idx: checkpoint shape (47,), config expects (48,) "
                   "and 1 more"), msg
    assert_nothing_left(out)
    # the one left out of the line
    from qwen2vl_jax.safetensors_io import list_tensors

    config = Qwen2VLConfig.from_hf(bad)
    _, problems = gptq.fold(list_tensors(bad), checkpoint.expected_shapes(config), gptq.read_quantization(bad))
    assert problems[2:] == ["model.layers.1.mlp.down_proj.qweight: checkpoint shape (10, 48), config expects (11, 48)"]
