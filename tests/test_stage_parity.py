"""Per-stage parity with HF transformers in float32, so a failure names the stage that broke.

Each test feeds one of our Flax modules and the matching torch module of a tiny random HF
Qwen2-VL the same inputs and weights (ours come from the converter, via the `tiny_ours`
fixture): patch embedding, one vision block (2D rotary, several attention segments), the
merger, the rotary tables, one decoder layer (3D positions, causal + padding mask) and a
KV-cache prefill + decode. Where a stage takes rotary tables, both sides get HF's, so only the
rotary tests can blame the tables. Tolerance: max |ours - ref| <= 1e-5 * max |ref|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_utils
from qwen2vl_jax.modules.rope import mrope_cos_sin, vision_cos_sin
from qwen2vl_jax.modules.text import DecoderLayer, LayerCache, TextModel
from qwen2vl_jax.modules.vision import PatchEmbed, PatchMerger, VisionBlock

torch = pytest.importorskip("torch")

# Jitted, here and below: one compile per shape rather than one per primitive, several times
# faster than running op by op.
vision_tables = jax.jit(vision_cos_sin, static_argnums=(1, 2))
mrope_tables = jax.jit(mrope_cos_sin, static_argnums=(1, 2, 3))

MODELS = list(hf_utils.SPECS)
SEEDS = (0, 1, 2)
RTOL = 1e-5


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _check(ours, ref, what: str) -> float:
    err = _rel_err(ours, ref)
    assert err <= RTOL, f"{what}: max |ours - HF| / max |HF| = {err:.3g} > {RTOL}"
    return err


def _t(x) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x))


def _randn(rng: np.random.RandomState, *shape) -> np.ndarray:
    return rng.randn(*shape).astype(np.float32)


# ------------------------------------------------------------------ hand-built inputs
def _vision_segments(grids, merge: int, *, pad_patches: int = 0, pad_segments: int = 0, pad_len: int = 0):
    """The vision segment layout, built here by loops (the library's helper is not used).

    Patches arrive in merge order: within each frame, each merge x merge block is contiguous.
    One segment per frame (t of them per grid). Optional padding: extra patches that belong to
    no segment, extra empty segments, and a longer segment length.

    Returns pos_hw int32[N, 2], gather int32[S, Lmax], valid bool[S, Lmax], scatter int32[N],
    cu_seqlens int32[n_segments + 1] (HF's form of the same segmentation), n_real.
    """
    pos, seg_lens = [], []
    for t, h, w in grids:
        frame = [(bh * merge + i, bw * merge + j)
                 for bh in range(h // merge) for bw in range(w // merge)
                 for i in range(merge) for j in range(merge)]
        for _ in range(t):
            pos += frame
            seg_lens.append(h * w)
    n_real = len(pos)
    n, s, lmax = n_real + pad_patches, len(seg_lens) + pad_segments, max(seg_lens) + pad_len
    pos_hw = np.zeros((n, 2), np.int32)
    pos_hw[:n_real] = pos
    gather = np.zeros((s, lmax), np.int32)
    valid = np.zeros((s, lmax), bool)
    scatter = np.zeros((n,), np.int32)
    start = 0
    for seg, length in enumerate(seg_lens):
        gather[seg, :length] = np.arange(start, start + length)
        valid[seg, :length] = True
        scatter[start:start + length] = seg * lmax + np.arange(length)
        start += length
    cu_seqlens = np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int32)
    return pos_hw, gather, valid, scatter, cu_seqlens, n_real


def _mm_row(pads: int, n_before: int, grid_hw: tuple[int, int], n_after: int) -> np.ndarray:
    """3D positions int[3, L] of one left-padded row: text, one image of grid_hw merged tokens,
    text, laid out as HF's get_rope_index does (pads get position 1; they are masked anyway)."""
    rows = [[1, 1, 1]] * pads + [[p, p, p] for p in range(n_before)]
    gh, gw = grid_hw
    rows += [[n_before, n_before + i, n_before + j] for i in range(gh) for j in range(gw)]
    start = n_before + max(gh, gw)
    rows += [[start + k] * 3 for k in range(n_after)]
    return np.array(rows, np.int64).T


def _text_batch():
    """Two rows of 13 tokens, the second left-padded by 4: positions int64[3, 2, 13], mask bool[2, 13]."""
    positions = np.stack([_mm_row(0, 3, (2, 3), 4), _mm_row(4, 2, (1, 3), 4)], axis=1)
    mask = np.ones((2, 13), bool)
    mask[1, :4] = False
    return positions, mask


def _hf_text_rope(hf, x: np.ndarray, positions: np.ndarray):
    cos, sin = hf.model.language_model.rotary_emb(_t(x), _t(positions))
    return cos.numpy(), sin.numpy()


# ------------------------------------------------------------------ 1. patch embedding
@pytest.mark.parametrize("model_name", MODELS)
def test_patch_embed(tiny_hf, tiny_ours, model_name):
    hf, _ = tiny_hf[model_name]
    ours = tiny_ours[model_name]
    cfg = ours.config.vision
    apply = jax.jit(PatchEmbed(cfg, jnp.float32).apply)
    for seed in SEEDS:
        patches = _randn(np.random.RandomState(seed), 37, cfg.patch_dim)  # any N: one row per patch
        with torch.no_grad():
            ref = hf.model.visual.patch_embed(_t(patches)).numpy()
        mine = apply({"params": ours.params["visual"]["patch_embed"]}, jnp.asarray(patches))
        _check(mine, ref, f"patch_embed seed {seed}")


# ------------------------------------------------------------------ 2. one vision block
@pytest.mark.parametrize("model_name", MODELS)
def test_vision_block(tiny_hf, tiny_ours, model_name):
    """Every block on its own. Two inputs of different grids, the second a 2-frame video: three
    attention segments (24, 8, 8 patches) in slots of 27. The layout also carries padding patches
    and an empty segment, as a bucketed batch does; they hold junk and must not leak."""
    hf, _ = tiny_hf[model_name]
    ours = tiny_ours[model_name]
    cfg = ours.config.vision
    grids = [(1, 4, 6), (2, 2, 4)]
    pos_hw, gather, valid, scatter, cu_seqlens, n = _vision_segments(
        grids, cfg.spatial_merge_size, pad_patches=5, pad_segments=1, pad_len=3)
    with torch.no_grad():
        cos, sin = (c.numpy() for c in hf.model.visual.rotary_pos_emb(_t(pos_hw), _t(pos_hw[:n].astype(np.int64))))
    apply = jax.jit(VisionBlock(cfg, jnp.float32).apply)  # one compile serves every block and seed
    for seed in SEEDS[:2]:
        rng = np.random.RandomState(seed)
        x = _randn(rng, len(pos_hw), cfg.embed_dim)
        # Padding rows get junk, not zeros, so a leak would show.
        cos_in = np.concatenate([cos, _randn(rng, len(pos_hw) - n, cos.shape[1])])
        sin_in = np.concatenate([sin, _randn(rng, len(pos_hw) - n, sin.shape[1])])
        for i, block in enumerate(hf.model.visual.blocks):
            with torch.no_grad():
                ref = block(_t(x[:n]), cu_seqlens=_t(cu_seqlens), position_embeddings=(_t(cos), _t(sin))).numpy()
            mine = apply(
                {"params": ours.params["visual"][f"blocks_{i}"]},
                jnp.asarray(x), jnp.asarray(cos_in), jnp.asarray(sin_in),
                jnp.asarray(gather), jnp.asarray(valid), jnp.asarray(scatter),
            )
            _check(np.asarray(mine)[:n], ref, f"vision block {i} seed {seed}")


def test_vision_block_segments_are_separate(tiny_hf, tiny_ours):
    """The segmentation matters: HF with one segment over both inputs gives a different answer,
    so the parity above is not passing by attending everywhere."""
    hf, _ = tiny_hf["untied"]
    cfg = tiny_ours["untied"].config.vision
    pos_hw, _, _, _, cu_seqlens, n = _vision_segments([(1, 4, 6), (2, 2, 4)], cfg.spatial_merge_size)
    x = _t(_randn(np.random.RandomState(0), n, cfg.embed_dim))
    with torch.no_grad():
        pe = hf.model.visual.rotary_pos_emb(x, _t(pos_hw.astype(np.int64)))
        split = hf.model.visual.blocks[0](x, cu_seqlens=_t(cu_seqlens), position_embeddings=pe).numpy()
        whole = hf.model.visual.blocks[0](x, cu_seqlens=_t(np.array([0, n], np.int32)), position_embeddings=pe).numpy()
    assert _rel_err(whole, split) > 1e-3


# ------------------------------------------------------------------ 3. merger
@pytest.mark.parametrize("model_name", MODELS)
def test_patch_merger(tiny_hf, tiny_ours, model_name):
    hf, _ = tiny_hf[model_name]
    ours = tiny_ours[model_name]
    cfg = ours.config.vision
    apply = jax.jit(PatchMerger(cfg, jnp.float32).apply)
    for seed in SEEDS:
        x = _randn(np.random.RandomState(seed), 7 * cfg.merge_unit, cfg.embed_dim)  # 7 merged tokens
        with torch.no_grad():
            ref = hf.model.visual.merger(_t(x)).numpy()
        mine = apply({"params": ours.params["visual"]["merger"]}, jnp.asarray(x))
        _check(mine, ref, f"merger seed {seed}")


# ------------------------------------------------------------------ 4. rotary tables
@pytest.mark.parametrize("model_name", MODELS)
def test_vision_rotary_tables(tiny_hf, tiny_ours, model_name):
    """Patch rows/columns up to 79 (a 1120-pixel-wide image), with a video among the grids."""
    from transformers.vision_utils import get_vision_position_ids

    hf, _ = tiny_hf[model_name]
    cfg = tiny_ours[model_name].config.vision
    grids = [(1, 4, 6), (3, 6, 2), (1, 58, 80)]
    pos_hw = _vision_segments(grids, cfg.spatial_merge_size)[0]
    ref_pos = get_vision_position_ids(_t(np.array(grids, np.int64)), cfg.spatial_merge_size)
    np.testing.assert_array_equal(pos_hw, ref_pos.numpy())  # our hand-built layout is HF's
    with torch.no_grad():
        ref_cos, ref_sin = hf.model.visual.rotary_pos_emb(ref_pos, ref_pos)
    cos, sin = vision_tables(jnp.asarray(pos_hw), cfg.head_dim, cfg.rope_theta)
    _check(cos, ref_cos.numpy(), "vision rotary cos")
    _check(sin, ref_sin.numpy(), "vision rotary sin")


@pytest.mark.parametrize("model_name", MODELS)
def test_mrope_tables(tiny_hf, tiny_ours, model_name):
    """Chunked M-RoPE with three different position streams (so any swap of sections or of
    the t/h/w axes shows). Positions below 128: beyond, the inv_freq rounding below shows."""
    hf, _ = tiny_hf[model_name]
    cfg = tiny_ours[model_name].config.text
    for seed in SEEDS:
        positions = np.random.RandomState(seed).randint(0, 128, size=(3, 2, 29))
        with torch.no_grad():
            ref_cos, ref_sin = _hf_text_rope(hf, np.zeros(1, np.float32), positions)
        cos, sin = mrope_tables(jnp.asarray(positions), cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        _check(cos, ref_cos, f"mrope cos seed {seed}")
        _check(sin, ref_sin, f"mrope sin seed {seed}")


@pytest.mark.parametrize("model_name", MODELS)
def test_mrope_tables_long_context(tiny_hf, tiny_ours, model_name):
    hf, _ = tiny_hf[model_name]
    cfg = tiny_ours[model_name].config.text
    positions = np.random.RandomState(0).randint(0, 32768, size=(3, 1, 64))  # the released models' context
    with torch.no_grad():
        ref_cos, ref_sin = _hf_text_rope(hf, np.zeros(1, np.float32), positions)
    cos, sin = mrope_tables(jnp.asarray(positions), cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    _check(cos, ref_cos, "mrope cos, long context")
    _check(sin, ref_sin, "mrope sin, long context")


def test_inverse_frequencies_match_hf():
    """The rotary frequencies are rounded as HF's float32 torch code rounds them: the released
    vision head's table exactly, the 2B/7B decoder's but one entry (torch's float32 pow is not
    correctly rounded there), and over all widths at most 2% of entries, by at most 2 ulp."""
    from qwen2vl_jax.modules.rope import inv_freq

    def hf_inv_freq(dim, theta):
        return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).numpy()

    np.testing.assert_array_equal(inv_freq(40, 10000.0), hf_inv_freq(40, 10000.0))  # vision: head 80, halves
    text = inv_freq(128, 1e6)
    assert (text != hf_inv_freq(128, 1e6)).sum() <= 1
    differ, total, worst = 0, 0, 0
    for dim in range(4, 258, 2):
        for theta in (1e4, 1e6):
            ours, ref = inv_freq(dim, theta), hf_inv_freq(dim, theta)
            differ += int((ours != ref).sum())
            total += ours.size
            worst = max(worst, int(np.abs(ours.view(np.int32).astype(np.int64) - ref.view(np.int32)).max()))
    assert differ <= 0.02 * total and worst <= 2, (differ, total, worst)


# ------------------------------------------------------------------ 5. one decoder layer
@pytest.mark.parametrize("model_name", MODELS)
def test_decoder_layer(tiny_hf, tiny_ours, model_name):
    """Every layer on its own, 3D positions around an image, one left-padded row."""
    from transformers.masking_utils import create_causal_mask

    hf, _ = tiny_hf[model_name]
    ours = tiny_ours[model_name]
    cfg = ours.config.text
    lm = hf.model.language_model
    positions, key_valid = _text_batch()
    b, length = key_valid.shape
    mask = np.tril(np.ones((length, length), bool))[None] & key_valid[:, None, :]  # [B, L, S]
    layer_mod = DecoderLayer(cfg, jnp.float32)
    apply = jax.jit(lambda p, *a: layer_mod.apply(p, *a, None, 0))  # no cache, prefill from slot 0
    for seed in SEEDS[:2]:
        x = _randn(np.random.RandomState(seed), b, length, cfg.hidden_size)
        with torch.no_grad():
            cos, sin = _hf_text_rope(hf, x, positions)
            hf_mask = create_causal_mask(config=lm.config, inputs_embeds=_t(x), attention_mask=_t(key_valid),
                                         cache=None)
        assert hf_mask.dtype == torch.bool  # sdpa's boolean form: True = attend
        np.testing.assert_array_equal(hf_mask[:, 0].numpy()[key_valid], mask[key_valid])
        for i, layer in enumerate(lm.layers):
            with torch.no_grad():
                ref = layer(_t(x), attention_mask=hf_mask, position_embeddings=(_t(cos), _t(sin))).numpy()
            mine, cache = apply({"params": ours.params["model"][f"layers_{i}"]},
                                jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin), jnp.asarray(mask))
            assert cache is None
            # Padding queries attend to nothing; only real tokens are compared.
            _check(np.asarray(mine)[key_valid], ref[key_valid], f"decoder layer {i} seed {seed}")


# ------------------------------------------------------------------ 6. KV cache
@pytest.mark.parametrize("model_name", ["untied", "seed2"])  # 2 and 1 kv heads; two compiles each
def test_kv_cache_prefill_then_decode(tiny_hf, tiny_ours, model_name):
    """Our TextModel: prefill 11 tokens into a 17-slot cache, then decode tokens 12 and 13 one
    at a time at the next slot; HF runs all 13 at once. Compares every real hidden state (after
    the final norm) and every layer's cached k/v at the real slots."""
    hf, _ = tiny_hf[model_name]
    ours = tiny_ours[model_name]
    cfg = ours.config.text
    positions, key_valid = _text_batch()
    b, length = key_valid.shape
    prompt, slots = 11, 17
    embeds = _randn(np.random.RandomState(7), b, length, cfg.hidden_size)
    with torch.no_grad():
        out = hf.model.language_model(inputs_embeds=_t(embeds), attention_mask=_t(key_valid.astype(np.int64)),
                                      position_ids=_t(positions), use_cache=True)
    ref_hidden = out.last_hidden_state.numpy()
    ref_k = [layer.keys.numpy().transpose(0, 2, 1, 3) for layer in out.cache.layers]  # [B, L, K, hd]
    ref_v = [layer.values.numpy().transpose(0, 2, 1, 3) for layer in out.cache.layers]

    module = TextModel(cfg, jnp.float32)
    prefill = jax.jit(lambda p, *a: module.apply(p, *a, 0))  # from slot 0, as generation's prefill
    decode = jax.jit(module.apply)  # slot traced: one compile for every step
    params = {"params": ours.params["model"]}
    kv_valid = np.concatenate([key_valid[:, :prompt], np.ones((b, slots - prompt), bool)], axis=1)
    shape = (b, slots, cfg.num_key_value_heads, cfg.head_dim)
    cache = tuple(LayerCache(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_hidden_layers))
    pos = jnp.asarray(positions, jnp.int32)

    hidden, cache = prefill(params, jnp.asarray(embeds[:, :prompt]), pos[:, :, :prompt], jnp.asarray(kv_valid), cache)
    real = key_valid[:, :prompt]
    _check(np.asarray(hidden)[real], ref_hidden[:, :prompt][real], "prefill hidden")
    for slot in range(prompt, length):
        step, cache = decode(params, jnp.asarray(embeds[:, slot:slot + 1]), pos[:, :, slot:slot + 1],
                             jnp.asarray(kv_valid), cache, jnp.int32(slot))
        _check(np.asarray(step)[:, 0], ref_hidden[:, slot], f"decoded hidden at slot {slot}")

    real = key_valid  # all tokens so far, padding excluded
    for i, layer_cache in enumerate(cache):
        k, v = np.asarray(layer_cache.k), np.asarray(layer_cache.v)
        _check(k[:, :length][real], ref_k[i][real], f"layer {i} cached k")
        _check(v[:, :length][real], ref_v[i][real], f"layer {i} cached v")
        assert not k[:, length:].any() and not v[:, length:].any(), f"layer {i}: slots past {length} were written"
