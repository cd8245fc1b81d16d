"""GPU only (skipped elsewhere): the cuDNN fused attention that bf16 prefill and the vision tower
use on NVIDIA GPUs is as accurate as our own bf16 attention, both measured against an f32 run,
with left padding, several images, a video and padding segments in the vision layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_utils

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN attention)")

from qwen2vl_jax.api import Qwen2VL  # noqa: E402
from qwen2vl_jax.inputs import pack_vision  # noqa: E402
from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule, init_params  # noqa: E402
from qwen2vl_jax.positions import get_rope_index  # noqa: E402
from qwen2vl_jax.sampling import GenerationConfig  # noqa: E402

CONFIG = hf_utils.TINY_CONFIGS["gpu"]  # head width 64, which cuDNN takes
G1, G2, V1 = (1, 8, 12), (1, 6, 4), (2, 8, 8)
CASE = hf_utils.make_case(
    "gpu_batch", [[5, ("img", G1), 7, 8, 9, 10, 11, 12], [3, 4, ("vid", V1), 6, ("img", G2), 2]], [G1, G2], [V1],
    seed=7,
)


def case_inputs():
    """The batch's 3D positions and exact-size vision layout."""
    pos, _ = get_rope_index(CASE.input_ids, CASE.attention_mask, CASE.image_grid_thw, CASE.video_grid_thw,
                            image_token_id=CONFIG.image_token_id, video_token_id=CONFIG.video_token_id,
                            spatial_merge_size=2)
    vision = pack_vision(CONFIG, CASE.pixel_values, CASE.image_grid_thw, CASE.pixel_values_videos,
                         CASE.video_grid_thw, bucketed=False)
    return jnp.asarray(pos), vision


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


def run(params, dtype, kernel, fn):
    """fn(module, params) with the module's attention kernel set to `kernel` -> (f32 numpy, HLO text)."""
    module = Qwen2VLModule(CONFIG, dtype, attention=kernel)
    p = jax.tree.map(lambda x: x.astype(dtype), params)
    compiled = jax.jit(lambda p: fn(module, p)).lower(p).compile()
    return np.asarray(compiled(p).astype(jnp.float32)), compiled.as_text()


def errors(params, fn, mask=None):
    ref, _ = run(params, jnp.float32, "xla", fn)
    ours, hlo_xla = run(params, jnp.bfloat16, "xla", fn)
    fused, hlo_cudnn = run(params, jnp.bfloat16, "cudnn", fn)
    assert "cudnn$fmha" not in hlo_xla and "cudnn$fmha" in hlo_cudnn  # the kernels really differ
    keep = np.ones(ref.shape, bool) if mask is None else np.broadcast_to(mask, ref.shape)
    scale = np.abs(ref[keep]).max()
    assert np.isfinite(fused[keep]).all()
    return np.abs(ours - ref)[keep].max() / scale, np.abs(fused - ref)[keep].max() / scale


def test_vision_tower_with_padding_segments(params):
    # 4 segments (2 images, 2 video frames) padded to 8 segments of 128 slots and 512 patches.
    vision = pack_vision(CONFIG, CASE.pixel_values, CASE.image_grid_thw, CASE.pixel_values_videos,
                         CASE.video_grid_thw, sizes=(512, 8, 128))
    n_real = (96 + 24 + 128) // 4
    fn = lambda m, p: m.apply({"params": p}, method=Qwen2VLModule.encode_vision, **vision)[:n_real]  # noqa: E731
    err_xla, err_cudnn = errors(params, fn)
    print(f"vision tower, max error relative to f32: xla bf16 {err_xla:.2e}, cudnn bf16 {err_cudnn:.2e}")
    assert err_cudnn <= 2 * err_xla + 1e-3


def test_logits_left_padded_batch(params):
    pos, vision = case_inputs()
    ids, mask = jnp.asarray(CASE.input_ids, jnp.int32), jnp.asarray(CASE.attention_mask, bool)
    fn = lambda m, p: m.apply({"params": p}, ids, pos, mask, vision)  # noqa: E731
    err_xla, err_cudnn = errors(params, fn, mask=CASE.attention_mask.astype(bool)[..., None])
    print(f"logits, max error relative to f32: xla bf16 {err_xla:.2e}, cudnn bf16 {err_cudnn:.2e}")
    assert err_cudnn <= 2 * err_xla + 1e-3


def test_engine_prefill(params):
    """The bucketed prefill (cache longer than the prompt, left padding) through cuDNN: its
    first-token logits are as close to f32 as the XLA kernel's."""
    def first_logits(dtype, kernel):
        model = Qwen2VL(CONFIG, jax.tree.map(lambda x: x.astype(dtype), params), dtype, attention=kernel)
        generation = GenerationConfig(max_new_tokens=1, eos_token_ids=())
        engine = model.engine
        _, state, _ = engine.start(model.params, model.inputs(**CASE.inputs(), max_new_tokens=1), generation)
        return np.asarray(state.logits, np.float32)

    ref = first_logits(jnp.float32, "xla")
    scale = np.abs(ref).max()
    err_xla = np.abs(first_logits(jnp.bfloat16, "xla") - ref).max() / scale
    err_cudnn = np.abs(first_logits(jnp.bfloat16, "cudnn") - ref).max() / scale
    print(f"prefill first-token logits vs f32: xla bf16 {err_xla:.2e}, cudnn bf16 {err_cudnn:.2e}")
    assert err_cudnn <= 2 * err_xla + 1e-3
