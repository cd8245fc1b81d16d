"""Config parsing (both HF layouts), presets, and full-size shapes via jax.eval_shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hf_utils
from qwen2vl_jax.config import PRESETS, QWEN2_VL_2B, QWEN2_VL_7B, Qwen2VLConfig
from qwen2vl_jax.errors import CheckpointError
from qwen2vl_jax.modules.qwen2vl import init_shapes
from qwen2vl_jax.params import count_params


@pytest.mark.parametrize("name,preset", [("qwen2-vl-2b", QWEN2_VL_2B), ("qwen2-vl-7b-instruct", QWEN2_VL_7B)])
def test_published_flat_config_matches_preset(name, preset):
    cfg = Qwen2VLConfig.from_hf(hf_utils.reference_folder(name) / "config.json")
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
    from qwen2vl_jax.hf_mapping import hf_to_jax_name
    from qwen2vl_jax.params import flatten

    index = hf_utils.reference_folder("qwen2-vl-7b-instruct") / "model.safetensors.index.json"
    names = json.loads(index.read_text())["weight_map"]
    mapped = {hf_to_jax_name(n)[0] for n in names}
    assert None not in mapped
    assert mapped == set(flatten(init_shapes(QWEN2_VL_7B)))


def test_eval_shape_forward_full_7b():
    """Logits shape of the real 7B config for one image + text, proven without memory."""
    import jax
    import jax.numpy as jnp
    from qwen2vl_jax.inputs import pack_vision
    from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule

    cfg = QWEN2_VL_7B
    grid = np.array([[1, 16, 16]])
    vision = pack_vision(cfg, np.zeros((256, 1176), np.float32), grid)
    ids = jnp.zeros((1, 80), jnp.int32)
    params = init_shapes(cfg, jnp.bfloat16)
    out = jax.eval_shape(
        lambda p: Qwen2VLModule(cfg, jnp.bfloat16).apply(
            {"params": p}, ids, jnp.zeros((3, 1, 80), jnp.int32), jnp.ones((1, 80), bool), vision
        ),
        params,
    )
    assert out.shape == (1, 80, 152064)


# ------------------------------------------------------------------ the registry of tiny configs
@pytest.mark.parametrize("name", list(hf_utils.TINY_CONFIGS))
def test_registry_config_roundtrips_and_counts_like_hf(name):
    """Every registered tiny config reads back from its HF form, and HF builds a model with
    exactly our parameter count from it."""
    cfg = hf_utils.TINY_CONFIGS[name]
    assert Qwen2VLConfig.from_hf(cfg.to_hf()) == cfg
    if not float(cfg.vision.mlp_ratio).is_integer():
        return  # transformers 5 types vision mlp_ratio as int: no HF model for TINY's 2.5
    assert count_params(init_shapes(cfg)) == _hf_param_count(cfg)


@pytest.mark.parametrize("name", [*hf_utils.SPECS, *(f"gptq_{n}" for n in hf_utils.GPTQ_SPECS)])
def test_registry_spec_configs_equal_what_we_read(name, tmp_path):
    """TINY_CONFIGS[name] is what Qwen2VLConfig.from_hf reads from the HF spec's saved folder."""
    pytest.importorskip("transformers")
    spec = hf_utils.SPECS[name] if name in hf_utils.SPECS else hf_utils.GPTQ_SPECS[name[len("gptq_"):]]
    hf_utils.hf_config(spec).save_pretrained(tmp_path)
    assert Qwen2VLConfig.from_hf(tmp_path) == hf_utils.TINY_CONFIGS[name]


# ------------------------------------------------------------------ reference assets
def test_reference_folder_modes(tmp_path, monkeypatch):
    """$QWEN2VL_REFERENCE_ASSETS: missing, a copy of shared/assets, or one checkpoint folder."""
    env = hf_utils.REFERENCE_ENV
    monkeypatch.setenv(env, str(tmp_path / "nowhere"))
    folder, why = hf_utils.find_reference("tokenizer")
    assert folder is None and env in why and "nowhere" in why
    with pytest.raises(pytest.skip.Exception, match=env):
        hf_utils.reference_folder("tokenizer")

    layout = tmp_path / "assets"
    for sub, names in [("qwen2-vl-7b-instruct", ["tokenizer.json", "tokenizer_config.json", "config.json"]),
                       ("qwen2-vl-2b", ["vocab.json", "merges.txt", "config.json"]), ("tokenizer-vectors", [])]:
        (layout / sub).mkdir(parents=True)
        for name in names:
            (layout / sub / name).write_text("{}")
    monkeypatch.setenv(env, str(layout))
    assert hf_utils.reference_folder("tokenizer") == layout / "qwen2-vl-7b-instruct"
    assert hf_utils.reference_folder("vocab-merges") == layout / "qwen2-vl-2b"
    assert hf_utils.reference_folder("qwen2-vl-2b") == layout / "qwen2-vl-2b"
    folder, why = hf_utils.find_reference("tokenizer-vectors")  # the folder lacks its files
    assert folder is None and "ggml-vocab-qwen2.gguf.inp" in why

    checkpoint = tmp_path / "Qwen2-VL-2B-Instruct"
    checkpoint.mkdir()
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]:
        (checkpoint / name).write_text("{}")
    monkeypatch.setenv(env, str(checkpoint))
    assert hf_utils.reference_folder("tokenizer") == checkpoint
    assert hf_utils.reference_folder("vocab-merges") == checkpoint
    for kind in ("qwen2-vl-7b-instruct", "qwen2-vl-2b", "tokenizer-vectors"):
        folder, why = hf_utils.find_reference(kind)
        assert folder is None and "checkpoint folder" in why and env in why

    monkeypatch.delenv(env)
    assert hf_utils.reference_root() == hf_utils.DEFAULT_REFERENCE_ASSETS
