"""What the benchmark scripts share: the model shapes they time, random weights and inputs,
FLOP counts, a best-of timer and the model folder the server benchmarks load.

A module, not a script: each script imports it with `from common import ...` (running
`python benchmarks/X.py` puts this folder on sys.path). The package itself is imported as
installed (`pip install -e .`, README).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("QWEN2VL_REFERENCE_ASSETS", REPO.parent / "shared" / "assets"))
IMAGE_TOKEN, VSTART, VEND = 151655, 151652, 151653
# Dense bf16 peak FLOP/s of common accelerators (no sparsity), for the MFU column.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


# ------------------------------------------------------------------ shapes, inputs and FLOPs
def model_config(size: str):
    """The config of "2b" or "7b", or "small": 2B's vocabulary and widths with 4 decoder layers
    and 4 vision blocks, for trying a script."""
    from qwen2vl_jax.config import QWEN2_VL_2B, QWEN2_VL_7B, Qwen2VLConfig, TextConfig, VisionConfig

    if size in ("2b", "7b"):
        return {"2b": QWEN2_VL_2B, "7b": QWEN2_VL_7B}[size]
    return Qwen2VLConfig(vision=VisionConfig(depth=4, out_hidden_size=1536),
                         text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                         num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=2),
                         tie_word_embeddings=True)


def make_inputs(image: int, prompt_words: int = 24, seed: int = 0) -> dict:
    """Token ids of a chat-shaped prompt around one image, and its random patches."""
    rng = np.random.RandomState(seed)
    g = image // 14
    grid = np.array([[1, g, g]])
    n_img = g * g // 4
    text = lambda n: rng.randint(100, 150000, n).tolist()  # noqa: E731
    ids = [151644] + text(3) + [VSTART] + [IMAGE_TOKEN] * n_img + [VEND] + text(prompt_words) + [151645] + text(3)
    return {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
            "pixel_values": rng.randn(g * g, 1176).astype(np.float32), "image_grid_thw": grid}


def vit_flops(config, n_patches: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of the vision tower and merger over one image of
    n_patches patches, attention included."""
    v, t = config.vision, config.text
    e = v.embed_dim
    vit = n_patches * (2 * v.patch_dim * e + v.depth * (2 * e * 3 * e + 2 * e * e + 2 * 2 * e * v.mlp_dim))
    vit += v.depth * 2 * 2 * n_patches * n_patches * e  # QK^T and PV (one segment)
    return float(vit + (n_patches // 4) * (2 * (4 * e) ** 2 + 2 * 4 * e * t.hidden_size))


def best_of(fn, repeat: int) -> float:
    """The shortest wall time of `repeat` calls of fn, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------ random weights
def random_params(config, dtype, quantize: str | None = None) -> dict:
    """Random parameters of the config's shapes in `dtype`, made on the default device one leaf
    at a time in their final dtype; quantize ("int8" / "int4") makes the packed tree the way
    `qwen2vl-convert --quantize` stores it (random integers, scales, int4's zero points)."""
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax.modules.qwen2vl import init_shapes
    from qwen2vl_jax.quant.format import Scheme
    from qwen2vl_jax.quant.tree import abstract

    dtype = jnp.dtype(dtype)
    shapes = init_shapes(config, dtype)
    if quantize:  # the packed tree's shapes: integers, scales (and int4's zero points)
        shapes = abstract(shapes, Scheme.of(quantize))

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def normal(key, shape, kind, leaf_dtype):  # one leaf at a time, made on the device in its final dtype
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        if kind == "ints":  # packed weights: any byte; zero points mid-range
            low, high = (-127, 128) if leaf_dtype == jnp.int8 else (0, 256)
            return jax.random.randint(key, shape, low, high).astype(leaf_dtype)
        if kind == "zero_points":
            return jnp.full(shape, 8, leaf_dtype)
        if kind == "quant_scales":  # random ints times these: weights of std near 0.02
            return jnp.full(shape, 0.02 / 64, leaf_dtype)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)

    def fill(key):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        out = []
        for i, (path, leaf) in enumerate(leaves):
            name = str(path[-1].key)
            kind = {"qweight": "ints", "zeros": "zero_points", "scales": "quant_scales"}.get(name)
            kind = kind or ("ones" if "scale" in name else "zeros" if "bias" in name else "normal")
            out.append(jax.block_until_ready(normal(jax.random.fold_in(key, i), tuple(leaf.shape), kind,
                                                    jnp.dtype(leaf.dtype))))
        return jax.tree_util.tree_unflatten(treedef, out)

    params = fill(jax.random.PRNGKey(0))
    return jax.block_until_ready(params)


# ------------------------------------------------------------------ a model folder
def model_folder(size: str, work: Path) -> Path:
    """The demo folder for "demo"; for "small" or "2b" (`model_config`'s shapes) a folder made
    under work with random weights (float32; bfloat16 for 2b) and the Qwen2-VL tokenizer files
    from the reference assets (QWEN2VL_REFERENCE_ASSETS)."""
    from qwen2vl_jax.config import DEMO_DIR

    if size == "demo":
        return DEMO_DIR
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax import checkpoint as ck
    from qwen2vl_jax.modules.qwen2vl import init_shapes

    side = ASSETS / "qwen2-vl-7b-instruct"
    if not (side / "vocab.json").is_file():
        sys.exit(f"--size {size} needs the Qwen2-VL tokenizer files in {side} (set QWEN2VL_REFERENCE_ASSETS)")
    config = model_config(size)
    folder = Path(work) / f"model-{size}"
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
                 "preprocessor_config.json", "generation_config.json"):
        if (side / name).is_file():
            shutil.copyfile(side / name, folder / name)
    (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    dtype = jnp.bfloat16 if size == "2b" else jnp.float32
    shapes = init_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    params = [np.asarray(0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
              for k, s in zip(keys, leaves)]
    ck.save_params(jax.tree_util.tree_unflatten(treedef, params), folder)
    return folder
