"""Sharded generation on 8 simulated CPU devices equals the unsharded run.

`jax_num_cpu_devices` only takes effect before JAX starts its backend, which other test modules
in the same pytest process will already have done; so the checks run in one child process
(this file run as a script), and the tests here read its JSON report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from children import Child, Children, environ

MESHES = {
    "data8": "data=8",
    "data2_tensor4": "data=2,tensor=4",
    "fsdp2_tensor4": "fsdp=2,tensor=4",
}
STEPS = 4


# ---------------------------------------------------------------- the child process
def _worker() -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_platforms", "cpu")
    import numpy as np

    import hf_utils  # tests/ is on PYTHONPATH (set by the `report` fixture)
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.engine import KVCache
    from qwen2vl_jax.errors import InputError
    from qwen2vl_jax.modules.qwen2vl import init_params, init_shapes
    from qwen2vl_jax.sampling import GenerationConfig
    from qwen2vl_jax.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    # Heads, KV heads and widths that tensor=4 divides; prime-ish elsewhere.
    config = hf_utils.TINY_CONFIGS["sharded"]
    # Flax's init (fan-in scaled) keeps this random network well conditioned, so fp32
    # reordering across shards stays near 1e-7; larger weights make it chaotic.
    params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init_shapes(config))

    g1, g2, v1 = (1, 4, 6), (1, 2, 2), (2, 4, 4)
    rows = [[5, ("img", g1), 7, 8], [3, 4, 9], [5, ("vid", v1), 6], [11, 12, 13, 14, 15],
            [2, ("img", g2), 8], [7, 7, 7], [9, 1], [4, ("img", g2), 6, 10]]
    case = hf_utils.make_case("batch8", rows, [g1, g2, g2], [v1], seed=7)
    generation = GenerationConfig(max_new_tokens=STEPS + 1, eos_token_ids=())

    def run(model):
        engine = model.engine
        inputs = model.inputs(**case.inputs(), max_new_tokens=generation.max_new_tokens)
        _, state, _ = engine.start(model.params, inputs, generation)
        logits, tokens = [np.asarray(state.logits)], [np.asarray(state.token)]
        for _ in range(STEPS):
            state, _ = engine.step(model.params, state, True)  # the state is donated: read it first
            logits.append(np.asarray(state.logits))
            tokens.append(np.asarray(state.token))
        full = model.logits(**case.inputs())
        return np.stack(logits), np.stack(tokens), full, state

    def spec_of(x, sharding=None):
        """The mesh axes of each dim of x (None: replicated), as JSON."""
        sharding = sharding or x.sharding
        spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
        return [list(a) if isinstance(a, tuple) else a for a in spec]

    ref_logits, ref_tokens, ref_full, _ = run(Qwen2VL(config, params, "float32"))

    def against_ref(logits, tokens, full):
        """Step and forward logits' errors relative to the unsharded run's largest, and whether
        the tokens are its tokens."""
        return {"step_logits_err": float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()),
                "forward_logits_err": float(np.abs(full - ref_full).max() / np.abs(ref_full).max()),
                "tokens_equal": bool(np.array_equal(tokens, ref_tokens))}

    report = {"ref_logits_absmax": float(np.abs(ref_logits).max()),
              "ref_logits_std": float(ref_logits.std())}
    for name, spec in MESHES.items():
        mesh = make_mesh(spec)
        model = Qwen2VL(config, params, "float32", mesh=mesh)
        logits, tokens, full, state = run(model)
        p = model.params["model"]["layers_0"]
        q = p["self_attn"]["q_proj"]["kernel"]
        report[name] = {
            "mesh": dict(mesh.shape),
            **against_ref(logits, tokens, full),
            "specs": {
                "q_proj": spec_of(q),
                "k_proj": spec_of(p["self_attn"]["k_proj"]["kernel"]),
                "o_proj": spec_of(p["self_attn"]["o_proj"]["kernel"]),
                "gate_proj": spec_of(p["mlp"]["gate_proj"]["kernel"]),
                "down_proj": spec_of(p["mlp"]["down_proj"]["kernel"]),
                "embed": spec_of(model.params["model"]["embed_tokens"]["embedding"]),
                "vision_fc1": spec_of(model.params["visual"]["blocks_0"]["mlp"]["fc1"]["kernel"]),
                "cache_k": spec_of(state.cache.k[0]),
                # What the cache type declares for that shape (KVCache.AXES through the rules).
                "cache_declared": spec_of(state.cache.k[0], KVCache.abstract(
                    config.text, *state.cache.k[0].shape[:2], np.float32).shardings(mesh, model.rules).k[0]),
            },
            "q_shard_shape": list(q.addressable_shards[0].data.shape),
            "q_shape": list(q.shape),
        }
    # The scanned decoder on the same mesh: stacked params split as layer 0's, after a
    # replicated layer axis; the stacked cache likewise.
    mesh = make_mesh(MESHES["fsdp2_tensor4"])
    model = Qwen2VL(config, params, "float32", mesh=mesh, scan_layers=True)
    logits, tokens, full, state = run(model)
    stacked = model.params["model"]["layers"]
    report["scanned"] = {
        **against_ref(logits, tokens, full),
        "q_proj": spec_of(stacked["self_attn"]["q_proj"]["kernel"]),
        "down_proj": spec_of(stacked["mlp"]["down_proj"]["kernel"]),
        "cache_k": spec_of(state.cache.k[0]),
        "cache_shape": list(state.cache.k[0].shape),
    }
    # Fused projections (params.fuse_projections) on a data x fsdp mesh: the concatenated
    # weights split over fsdp; a tensor axis, which would hold them whole, is refused.
    try:
        Qwen2VL(config, params, "float32", mesh=mesh, fuse_projections=True)
        report["fused_tensor_refused"] = ""
    except InputError as e:
        report["fused_tensor_refused"] = str(e)
    model = Qwen2VL(config, params, "float32", mesh=make_mesh("data=4,fsdp=2"), fuse_projections=True)
    logits, tokens, full, state = run(model)
    fused = model.params["model"]["layers_0"]
    report["fused"] = {
        **against_ref(logits, tokens, full),
        "qkv_proj": spec_of(fused["self_attn"]["qkv_proj"]["kernel"]),
        "gate_up_proj": spec_of(fused["mlp"]["gate_up_proj"]["kernel"]),
    }
    # Params restored from a checkpoint go straight into their shards (no gather on one host).
    import tempfile

    from qwen2vl_jax import checkpoint
    from qwen2vl_jax.sharding import param_shardings

    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save_params(params, folder)
        mesh = make_mesh(MESHES["fsdp2_tensor4"])
        loaded = checkpoint.load_params(folder, config, "float32", shardings=param_shardings(params, mesh))
    q = loaded["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    report["loaded"] = {
        "q_proj": spec_of(q), "embed": spec_of(loaded["model"]["embed_tokens"]["embedding"]),
        "q_shard_shape": list(q.addressable_shards[0].data.shape),
        "equal": all(np.array_equal(np.asarray(a), b) for a, b in zip(
            jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params))),
    }
    # A tensor size that does not divide the heads is refused with one line.
    tiny = hf_utils.TINY_CONFIGS["indivisible_heads"]
    try:
        Qwen2VL(tiny, {}, "float32", mesh=make_mesh("data=2,tensor=4"))
        report["refused"] = None
    except InputError as e:
        report["refused"] = str(e)
    try:
        make_mesh("data=3,tensor=2")
        report["bad_count"] = None
    except InputError as e:
        report["bad_count"] = str(e)
    return report


# ---------------------------------------------------------------- the tests
def _child() -> Child:
    repo = Path(__file__).resolve().parents[1]
    env = environ()
    path = [str(repo), str(repo / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env.pop("XLA_FLAGS", None)
    return Child([sys.executable, __file__, "--worker"], env=env, cwd=repo, timeout=900)


# The child runs in the background from the start of the session (children.py).
CHILDREN = Children(__name__)
CHILDREN.add("worker", _child, uses="report")


@pytest.fixture(scope="module")
def report():
    out = CHILDREN.result("worker")
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_logits_equal_unsharded(report, mesh_name):
    r = report[mesh_name]
    assert r["step_logits_err"] <= 1e-5, r
    assert r["forward_logits_err"] <= 1e-5, r
    assert r["tokens_equal"], r


def test_reference_logits_not_trivial(report):
    assert report["ref_logits_std"] > 0.1, report


def test_params_really_sharded(report):
    d8 = report["data8"]["specs"]
    # data=8 alone: params are replicated; the KV cache is split over the 8 rows.
    assert d8["q_proj"] == [None, None]
    assert d8["cache_k"] == ["data", None, None, None]
    t4 = report["data2_tensor4"]
    assert t4["specs"]["q_proj"] == [None, "tensor"]
    assert t4["specs"]["k_proj"] == [None, "tensor"]
    assert t4["specs"]["o_proj"] == ["tensor", None]
    assert t4["specs"]["gate_proj"] == [None, "tensor"]
    assert t4["specs"]["down_proj"] == ["tensor", None]
    assert t4["specs"]["vision_fc1"] == [None, "tensor"]
    assert t4["specs"]["cache_k"] == ["data", None, "tensor", None]
    assert t4["q_shard_shape"] == [t4["q_shape"][0], t4["q_shape"][1] // 4]
    f2 = report["fsdp2_tensor4"]
    assert f2["specs"]["q_proj"] == ["fsdp", "tensor"]
    assert f2["specs"]["embed"] == ["tensor", "fsdp"]
    assert f2["specs"]["cache_k"] == ["fsdp", None, "tensor", None]
    assert f2["q_shard_shape"] == [f2["q_shape"][0] // 2, f2["q_shape"][1] // 4]
    # Restored from a checkpoint onto the same mesh: the same layout, the same values.
    loaded = report["loaded"]
    assert loaded["q_proj"] == f2["specs"]["q_proj"] and loaded["embed"] == f2["specs"]["embed"]
    assert loaded["q_shard_shape"] == f2["q_shard_shape"] and loaded["equal"]
    for name in MESHES:  # the decode state's cache is laid out as its type declares
        assert report[name]["specs"]["cache_k"] == report[name]["specs"]["cache_declared"], name


def test_scanned_decoder_sharded(report):
    r = report["scanned"]
    assert r["step_logits_err"] <= 1e-5 and r["forward_logits_err"] <= 1e-5 and r["tokens_equal"], r
    assert r["q_proj"] == [None, "fsdp", "tensor"] and r["down_proj"] == [None, "tensor", "fsdp"], r
    assert r["cache_k"] == [None, "fsdp", None, "tensor", None], r
    assert r["cache_shape"][0] == 2, r  # the sharded config's layers, stacked


def test_bad_meshes_refused(report):
    assert report["refused"] and "tensor=4" in report["refused"] and "key/value heads" in report["refused"]
    assert "\n" not in report["refused"]
    assert report["bad_count"] and "8 are available" in report["bad_count"]


def test_fused_projections_sharded(report):
    r = report["fused"]
    assert r["step_logits_err"] <= 1e-5 and r["forward_logits_err"] <= 1e-5 and r["tokens_equal"], r
    assert r["qkv_proj"] == ["fsdp", None] and r["gate_up_proj"] == ["fsdp", None], r
    assert "tensor axis" in report["fused_tensor_refused"] and "'tensor': 4" in report["fused_tensor_refused"]


if __name__ == "__main__" and "--worker" in sys.argv:
    result = _worker()
    print(json.dumps(result))

