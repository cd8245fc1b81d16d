"""The whole network: vision tower + merger, the embedding merge, the decoder and the output head.

`Qwen2VLModule` is a Flax Linen module used functionally: its parameter tree is {visual, model,
lm_head} with paths that mirror HF names. Its methods are the pieces every caller assembles
the same way: `encode_vision` (patches + layout -> merged features), `embed` (token embeddings
with the features in the placeholder slots), `decode` (the decoder, with or without a KV
cache), `lm_logits`; `hidden_states` and `__call__` chain them for a plain forward pass.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.modules.attention import KERNELS, backend_field, check_matmul
from qwen2vl_jax.modules.text import Linear, TextModel
from qwen2vl_jax.modules.vision import VisionTransformer


def merge_vision(embeds, input_ids, features, image_token_id: int, video_token_id: int):
    """Puts vision features into the placeholder positions.

    embeds [B, L, D]; input_ids int[B, L]; features [F, D] with all image features first, then
    all video features, each in the order their placeholders appear (row-major over the batch,
    as HF's masked_scatter fills them). Padded feature rows past the placeholders are unused.
    """
    b, l, d = embeds.shape
    ids = input_ids.reshape(-1)
    is_img, is_vid = ids == image_token_id, ids == video_token_id
    img_idx = jnp.cumsum(is_img) - 1
    vid_idx = jnp.cumsum(is_vid) - 1 + jnp.sum(is_img)
    idx = jnp.clip(jnp.where(is_img, img_idx, vid_idx), 0, features.shape[0] - 1)
    taken = features[idx].astype(embeds.dtype).reshape(b, l, d)
    return jnp.where((is_img | is_vid).reshape(b, l, 1), taken, embeds)


class Qwen2VLModule(nn.Module):
    config: Qwen2VLConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"  # the attention kernel (modules/attention.py); static, part of the module
    matmul: str = "f32"  # the large products' precision, f32 or bf16 (modules/attention.py); static too
    scan_layers: bool = False  # the decoder's layers scanned: params under model/layers/ stacked
    backend: str = backend_field()  # the platform the programs are built for (modules/attention.py); static

    def setup(self):
        cfg = self.config
        if self.attention not in KERNELS:
            raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)} (got {self.attention!r})")
        check_matmul(self.matmul)
        self.visual = VisionTransformer(cfg.vision, self.dtype, self.remat, self.attention, self.matmul, self.backend)
        self.model = TextModel(cfg.text, self.dtype, self.remat, self.attention, self.matmul, self.scan_layers,
                               self.backend)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.vocab_size, use_bias=False, dtype=self.dtype, backend=self.backend)

    def encode_vision(self, patches, pos_hw, gather, valid, scatter):
        """patches f32[N, C*T*P*P] and their layout (`inputs.vision_layout`) -> merged features
        [N / merge_unit, D_text]."""
        return self.visual(patches, pos_hw, gather, valid, scatter)

    def embed(self, input_ids, features=None):
        """input_ids int[B, L] -> [B, L, D], vision features [F, D] in the placeholder slots."""
        x = self.model.embed(input_ids)
        if features is None:
            return x
        return merge_vision(x, input_ids, features, self.config.image_token_id, self.config.video_token_id)

    def decode(self, embeds, positions, kv_valid, cache=None, cache_index=0):
        """The decoder: embeds [B, L, D], positions int[3, B, L], kv_valid bool[B, C] (C <= S
        cache slots attended; see TextModel) ->
        (hidden [B, L, D], the updated cache or None)."""
        return self.model(embeds, positions, kv_valid, cache, cache_index)

    def lm_logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def hidden_states(self, input_ids, positions, attention_mask, vision: dict | None = None):
        """Plain forward to the final hidden states [B, L, D]: input_ids int[B, L], positions
        int[3, B, L], attention_mask bool[B, L] or int segment ids [B, L] (packed rows, see
        TextModel); vision: 'patches' plus the layout arrays."""
        features = self.encode_vision(**vision) if vision is not None else None
        hidden, _ = self.decode(self.embed(input_ids, features), positions, attention_mask)
        return hidden

    def __call__(self, input_ids, positions, attention_mask, vision: dict | None = None):
        """-> logits [B, L, V] (see `hidden_states`)."""
        return self.lm_logits(self.hidden_states(input_ids, positions, attention_mask, vision))


def _init_args(config: Qwen2VLConfig):
    """The smallest inputs that touch every parameter: 4 tokens and one image of one merge
    block."""
    m = config.vision.spatial_merge_size
    n = m * m
    vision = {
        "patches": jnp.zeros((n, config.vision.patch_dim), jnp.float32),
        "pos_hw": jnp.zeros((n, 2), jnp.int32),
        "gather": jnp.arange(n, dtype=jnp.int32)[None],
        "valid": jnp.ones((1, n), bool),
        "scatter": jnp.arange(n, dtype=jnp.int32),
    }
    return jnp.zeros((1, 4), jnp.int32), jnp.zeros((3, 1, 4), jnp.int32), jnp.ones((1, 4), bool), vision


def init_params(config: Qwen2VLConfig, rng: jax.Array) -> dict:
    """Freshly initialised float32 parameters (Flax's default initialisers), HF paths."""
    module = Qwen2VLModule(config)
    return jax.jit(module.init)(rng, *_init_args(config))["params"]


def init_shapes(config: Qwen2VLConfig, dtype=jnp.float32, scan_layers: bool = False) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating anything (scan_layers: with
    the decoder's layers stacked, as a scanned module takes them)."""
    module = Qwen2VLModule(config, dtype, scan_layers=scan_layers)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *_init_args(config)))["params"]
