"""The whole model: vision tower + merger, embedding merge, decoder, logits; and the Python API.

`Qwen2VLModule` is a Flax Linen module used functionally: its parameter tree is
{visual, model, lm_head} with paths that mirror HF names. `Qwen2VL` wraps a config and params
and takes the HF processor's keys as numpy arrays.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.checkpoint import is_converted, read_config
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.errors import CheckpointError, InputError
from qwen2vl_jax.modules.text import TextModel
from qwen2vl_jax.modules.vision import VisionTransformer, vision_layout
from qwen2vl_jax.positions import get_rope_index


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

    def setup(self):
        cfg = self.config
        self.visual = VisionTransformer(cfg.vision, self.dtype, self.remat)
        self.model = TextModel(cfg.text, self.dtype, self.remat)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.text.vocab_size, use_bias=False, dtype=self.dtype)

    def encode_vision(self, patches, pos_hw, gather, valid, scatter):
        """-> merged features [N / 4, D_text]."""
        return self.visual(patches, pos_hw, gather, valid, scatter)

    def embed(self, input_ids, features=None):
        x = self.model.embed(input_ids)
        if features is None:
            return x
        return merge_vision(x, input_ids, features, self.config.image_token_id, self.config.video_token_id)

    def decode(self, embeds, positions, kv_valid, cache=None, cache_index=0):
        return self.model(embeds, positions, kv_valid, cache, cache_index)

    def lm_logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, input_ids, positions, attention_mask, vision: dict | None = None):
        """Full forward: input_ids int[B, L], positions int[3, B, L], attention_mask bool[B, L],
        vision: the `vision_layout` arrays plus 'patches' -> logits [B, L, V]."""
        features = self.encode_vision(**vision) if vision is not None else None
        x = self.embed(input_ids, features)
        hidden, _ = self.decode(x, positions, attention_mask)
        return self.lm_logits(hidden)


def default_dtype():
    """float32 on CPU (XLA's CPU bf16 matvec is slow), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def init_shapes(config: Qwen2VLConfig, dtype=jnp.float32) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    module = Qwen2VLModule(config, dtype)
    ids = jnp.zeros((1, 4), jnp.int32)
    vision = _dummy_vision(config)
    variables = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), ids, jnp.zeros((3, 1, 4), jnp.int32), jnp.ones((1, 4), bool), vision)
    )
    return variables["params"]


def _dummy_vision(config: Qwen2VLConfig) -> dict:
    m = config.vision.spatial_merge_size
    layout = vision_layout(np.array([[1, m, m]]), m)
    return {"patches": jnp.zeros((m * m, config.vision.patch_dim), jnp.float32), **layout}


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def prepare_vision(
    config: Qwen2VLConfig,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    **layout_sizes,
) -> dict | None:
    """Host-side: concatenates image then video patches and builds their segment layout.

    Checks that each pixel array has the rows its grids promise. `layout_sizes` (num_patches,
    num_segments, segment_len) pad to fixed shapes; padding patches are zeros.
    """
    patches, grids = [], []
    for name, pixels, grid in (
        ("pixel_values", pixel_values, image_grid_thw),
        ("pixel_values_videos", pixel_values_videos, video_grid_thw),
    ):
        if pixels is None and grid is None:
            continue
        if pixels is None or grid is None:
            raise InputError(f"{name} and its grid_thw must be given together")
        pixels = np.asarray(pixels, np.float32)
        grid = np.asarray(grid, np.int64).reshape(-1, 3)
        want = int(np.prod(grid, axis=1).sum())
        if pixels.ndim != 2 or pixels.shape[0] != want or pixels.shape[1] != config.vision.patch_dim:
            raise InputError(
                f"{name} has shape {tuple(pixels.shape)} but its grids {grid.tolist()} need "
                f"({want}, {config.vision.patch_dim})"
            )
        patches.append(pixels)
        grids.append(grid)
    if not patches:
        return None
    grid_all = np.concatenate(grids)
    layout = vision_layout(grid_all, config.vision.spatial_merge_size, **layout_sizes)
    n = layout["scatter"].shape[0]
    flat = np.zeros((n, config.vision.patch_dim), np.float32)
    real = np.concatenate(patches)
    flat[: real.shape[0]] = real
    return {"patches": flat, **layout}


def check_placeholders(config: Qwen2VLConfig, input_ids, image_grid_thw, video_grid_thw) -> None:
    """The number of placeholder tokens must equal the features the grids produce."""
    unit = config.vision.merge_unit
    for name, token, grid in (
        ("image", config.image_token_id, image_grid_thw),
        ("video", config.video_token_id, video_grid_thw),
    ):
        have = int((np.asarray(input_ids) == token).sum())
        want = 0 if grid is None else int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum()) // unit
        if have != want:
            raise InputError(
                f"the text has {have} {name} placeholder tokens but the {name} grids give {want} features"
            )


class Qwen2VL:
    """A loaded model: config + params, with HF-processor-shaped entry points."""

    def __init__(self, config: Qwen2VLConfig, params: dict, dtype=None, mesh=None, rules=None):
        from qwen2vl_jax.generation import GenerationConfig
        from qwen2vl_jax.sharding import check_divisible, place_params

        self.config = config
        self.dtype = jnp.dtype(dtype or default_dtype())
        check_divisible(config, mesh)
        self.mesh, self.rules = mesh, rules
        self.params = place_params(params, mesh, rules)  # a no-op without a mesh
        self.module = Qwen2VLModule(config, self.dtype)
        self.generation_config = GenerationConfig.from_model_config(config)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, mesh=None, rules=None) -> "Qwen2VL":
        """Loads a converted folder (from qwen2vl-convert) or an HF-layout folder (config.json +
        safetensors); with a `mesh` the params are placed by the sharding rules as they load.
        generation_config.json gives the defaults."""
        from qwen2vl_jax.generation import GenerationConfig
        from qwen2vl_jax.sharding import check_divisible

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model folder {path} does not exist")
        config = read_config(path)
        check_divisible(config, mesh)
        dtype = jnp.dtype(dtype or default_dtype())
        if is_converted(path):  # qwen2vl-convert or training output: Orbax params, restored in place
            from qwen2vl_jax.checkpoint import load_params
            from qwen2vl_jax.sharding import param_shardings

            shardings = None if mesh is None else param_shardings(init_shapes(config), mesh, rules)
            params = load_params(path, config, dtype, shardings)
        else:
            params = load_hf_params(path, config, dtype, host=mesh is not None)
        model = cls(config, params, dtype, mesh=mesh, rules=rules)
        model.generation_config = GenerationConfig.from_pretrained(path, config)
        return model

    # ---------------------------------------------------------------- forward
    @functools.cached_property
    def _forward(self):
        from qwen2vl_jax.sharding import use_mesh

        def forward(params, *args):
            with use_mesh(self.mesh, self.rules):  # activation constraints, traced in
                return self.module.apply({"params": params}, *args)

        return jax.jit(forward)

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, **ignored) -> dict:
        """Host-side checks and index arrays for one forward (positions, vision layout)."""
        input_ids = np.asarray(input_ids, np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {mask.shape} differs from input_ids {input_ids.shape}")
        check_placeholders(self.config, input_ids, image_grid_thw, video_grid_thw)
        positions, deltas = get_rope_index(
            input_ids, mask, image_grid_thw, video_grid_thw,
            image_token_id=self.config.image_token_id, video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )
        vision = prepare_vision(self.config, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        return {"input_ids": input_ids, "attention_mask": mask.astype(bool), "positions": positions,
                "rope_deltas": deltas, "vision": vision}

    def logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, **ignored) -> np.ndarray:
        """Logits f32[B, L, V] for the HF processor's outputs (extra keys such as
        mm_token_type_ids are accepted and ignored: placeholders are found from input_ids)."""
        p = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw,
                         pixel_values_videos, video_grid_thw)
        out = self._forward(self.params, p["input_ids"].astype(np.int32), p["positions"].astype(np.int32),
                            p["attention_mask"], p["vision"])
        return np.asarray(out.astype(jnp.float32))

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, *, stream: bool = False, **settings):
        """Token ids int32[B, n] generated after the prompt (each row up to and including its
        EOS, pad_token_id after it). `settings` override `self.generation_config`
        (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed,
        eos_token_ids, pad_token_id). With stream=True, an iterator of int32[B] per step."""
        from qwen2vl_jax.generation import generator_for

        settings.pop("mm_token_type_ids", None)
        gc = self.generation_config.replace(**settings)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "image_grid_thw": image_grid_thw, "pixel_values_videos": pixel_values_videos,
                  "video_grid_thw": video_grid_thw}
        gen = generator_for(self)
        return gen.stream(inputs, gc) if stream else gen.generate(inputs, gc)

    def vision_features(self, pixel_values, grid_thw) -> np.ndarray:
        """Merged vision features f32[N/4, D] for patches with their grids."""
        vision = prepare_vision(self.config, pixel_values, grid_thw)
        out = _encode_jit(self.module, self.params, vision)
        return np.asarray(out.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(module, params, vision):
    return module.apply({"params": params}, method=Qwen2VLModule.encode_vision, **vision)


def load_hf_params(path: Path, config: Qwen2VLConfig, dtype, host: bool = False) -> dict:
    """HF safetensors in `path` -> nested JAX param dict (shape-checked against `config`);
    host=True keeps numpy arrays (for placing on a mesh without a one-device copy)."""
    from qwen2vl_jax.convert.mapping import convert_tensors, flatten, unflatten
    from qwen2vl_jax.convert.safetensors_io import list_tensors

    expected = {k: v.shape for k, v in flatten(init_shapes(config)).items()}
    flat = convert_tensors(
        list_tensors(path), expected, tie_word_embeddings=config.tie_word_embeddings,
        cast=(lambda a: np.asarray(a, dtype)) if host else (lambda a: jnp.asarray(a, dtype)),
    )
    return unflatten(flat)

