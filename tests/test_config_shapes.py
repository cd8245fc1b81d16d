"""Config parsing (both HF layouts), presets, and full-size shapes via jax.eval_shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hf_utils
from qwen2vl_jax.config import PRESETS, QWEN2_VL_2B, QWEN2_VL_7B, QWEN2_VL_72B, Qwen2VLConfig
from qwen2vl_jax.errors import CheckpointError
from qwen2vl_jax.model import count_params, init_shapes

ASSETS = hf_utils.SHARED_ASSETS


def _needs_assets():
    if not ASSETS.exists():
        pytest.skip(f"reference assets not found at {ASSETS}")


@pytest.mark.parametrize("name,preset", [("qwen2-vl-2b", QWEN2_VL_2B), ("qwen2-vl-7b-instruct", QWEN2_VL_7B)])
def test_published_flat_config_matches_preset(name, preset):
    _needs_assets()
    cfg = Qwen2VLConfig.from_hf(ASSETS / name / "config.json")
    assert cfg.text == preset.text
    assert cfg.vision == preset.vision
    assert cfg.tie_word_embeddings == preset.tie_word_embeddings


def test_nested_transformers5_config_roundtrip(tmp_path):
    pytest.importorskip("transformers")
    spec = hf_utils.SPECS["tied"]
    hf_cfg = hf_utils.hf_config(spec)
    hf_cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in raw  # really the nested layout
    cfg = Qwen2VLConfig.from_hf(tmp_path)
    assert cfg.text.hidden_size == spec.hidden
    assert cfg.text.num_key_value_heads == spec.kv_heads
    assert cfg.text.mrope_section == spec.mrope_section
    assert cfg.text.rope_theta == 10000.0
    assert cfg.vision.embed_dim == spec.v_embed and cfg.vision.depth == spec.v_depth
    assert cfg.tie_word_embeddings is True
    # Our flat output reads back to the same config.
    assert Qwen2VLConfig.from_hf(cfg.to_hf()) == cfg


def test_config_rejects_inconsistent_fields():
    raw = QWEN2_VL_7B.to_hf()
    raw["rope_scaling"]["mrope_section"] = [16, 24, 20]
    with pytest.raises(CheckpointError, match="mrope_section"):
        Qwen2VLConfig.from_hf(raw)
    raw = QWEN2_VL_7B.to_hf()
    del raw["hidden_size"]
    with pytest.raises(CheckpointError, match="hidden_size"):
        Qwen2VLConfig.from_hf(raw)


def _hf_param_count(cfg: Qwen2VLConfig) -> int:
    torch = pytest.importorskip("torch")
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(HFConfig(**cfg.to_hf()))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["2b", "7b", "72b"])
def test_full_size_param_counts_equal_hf(name):
    cfg = PRESETS[name]
    ours = count_params(init_shapes(cfg))
    assert ours == _hf_param_count(cfg)
    # Figures from the published checkpoints' sizes, as a sanity check on the presets.
    approx = {"2b": 2.21e9, "7b": 8.29e9, "72b": 73.4e9}[name]
    assert abs(ours - approx) / approx < 0.01


def test_published_index_names_every_parameter():
    """The 7B index (published naming) maps onto exactly our parameter tree."""
    _needs_assets()
    from qwen2vl_jax.convert.mapping import flatten, hf_to_jax_name

    names = json.loads((ASSETS / "qwen2-vl-7b-instruct" / "model.safetensors.index.json").read_text())["weight_map"]
    mapped = {hf_to_jax_name(n)[0] for n in names}
    assert None not in mapped
    assert mapped == set(flatten(init_shapes(QWEN2_VL_7B)))


def test_eval_shape_forward_full_7b():
    """Logits shape of the real 7B config for one image + text, proven without memory."""
    import jax
    import jax.numpy as jnp
    from qwen2vl_jax.model import Qwen2VLModule, prepare_vision

    cfg = QWEN2_VL_7B
    grid = np.array([[1, 16, 16]])
    vision = prepare_vision(cfg, np.zeros((256, 1176), np.float32), grid)
    ids = jnp.zeros((1, 80), jnp.int32)
    params = init_shapes(cfg, jnp.bfloat16)
    out = jax.eval_shape(
        lambda p: Qwen2VLModule(cfg, jnp.bfloat16).apply(
            {"params": p}, ids, jnp.zeros((3, 1, 80), jnp.int32), jnp.ones((1, 80), bool), vision
        ),
        params,
    )
    assert out.shape == (1, 80, 152064)
