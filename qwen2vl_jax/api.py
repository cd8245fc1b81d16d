"""The Python API: `Qwen2VL`, a loaded model that takes the HF processor's keys.

    model = Qwen2VL.from_pretrained(folder)          # converted or HF folder
    logits = model.logits(**inputs)                  # f32[B, L, V]
    new_ids = model.generate(**inputs, max_new_tokens=64)

Every entry point turns its arguments into `inputs.ModelInputs` with `build_inputs` (the same
checks and buckets everywhere) and runs them on the model's `Engine`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qwen2vl_jax import quant
from qwen2vl_jax.checkpoint import (is_converted, load_hf_params, load_params, read_config, read_scheme,
                                    stored_tree)
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.engine import Engine, GenerationResult, Token
from qwen2vl_jax.errors import CheckpointError, InputError
from qwen2vl_jax.inputs import ModelInputs, build_inputs, pack_vision
from qwen2vl_jax.modules.attention import KERNELS, MATMULS
from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule, init_shapes
from qwen2vl_jax import params as params_lib
from qwen2vl_jax.params import stack_layers, unstack_layers
from qwen2vl_jax.sampling import GenerationConfig
from qwen2vl_jax.sharding import ShardingRules, check_divisible, param_shardings, place_params

ATTENTION_ENV = "QWEN2VL_ATTENTION"  # the default attention kernel when none is passed
MATMUL_ENV = "QWEN2VL_MATMUL"  # the default precision of the large products when none is passed


def default_dtype():
    """float32 on CPU (XLA's CPU bf16 matvec is slow), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _env_choice(env: str, default: str, choices: tuple[str, ...], what: str) -> str:
    """$env lower-cased (`default` when unset or empty), one of `choices`, else one InputError line."""
    choice = os.environ.get(env, default).strip().lower() or default
    if choice not in choices:
        raise InputError(f"{env}={choice!r}: {what} must be one of {', '.join(choices)}")
    return choice


def default_attention() -> str:
    """$QWEN2VL_ATTENTION (auto, xla or cudnn), read when a model is built; "auto" when unset."""
    return _env_choice(ATTENTION_ENV, "auto", KERNELS, "the attention kernel")


def default_matmul() -> str:
    """$QWEN2VL_MATMUL (f32 or bf16), read when a model is built; "f32" when unset."""
    return _env_choice(MATMUL_ENV, "f32", MATMULS, "the matmul precision")


_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
               "video_grid_thw")


class Qwen2VL:
    """A loaded model: config + params (placed on `mesh` when one is given), with
    HF-processor-shaped entry points.

    dtype: the compute dtype (default: float32 on CPU, bfloat16 elsewhere); attention: the
    attention kernel, "auto", "xla" or "cudnn" (default: $QWEN2VL_ATTENTION, else "auto");
    matmul: "f32" or "bf16" (default: $QWEN2VL_MATMUL, else "f32"), the precision of products of 64 rows or more (the vision
    tower, prefill: inputs rounded to bf16, f32 accumulation; modules/attention.py);
    scan_layers: run the decoder's layers as one scanned layer, so compile time does not grow
    with depth (the params are then held stacked, `model/layers/...` with a leading layer
    axis; `params.unstack_layers` gives HF paths back); fuse_projections: hold each decoder
    layer's q/k/v and gate/up weights concatenated (`params.fuse_projections`), so a step runs
    one matmul for each set; refused on a mesh with a tensor axis, which would then hold them
    whole on every device; the unfused weights stay alive until the model is built, so fusing
    needs room for those weights twice at load). All are fixed for the
    model's life: a model with another choice compiles its own functions."""

    def __init__(self, config: Qwen2VLConfig, params: dict, dtype=None, mesh: Mesh | None = None,
                 rules: ShardingRules | None = None, *, attention: str | None = None, matmul: str | None = None,
                 generation_config: GenerationConfig | None = None, quantization: quant.Scheme | None = None,
                 scan_layers: bool = False, fuse_projections: bool = False):
        check_divisible(config, mesh)
        self.config = config
        self.quantization = quantization  # how the params are packed (quant.py), None for float
        self.dtype = jnp.dtype(dtype or default_dtype())
        self.attention = default_attention() if attention is None else attention
        if self.attention not in KERNELS:
            raise InputError(f"attention must be one of {', '.join(KERNELS)} (got {self.attention!r})")
        self.matmul = default_matmul() if matmul is None else matmul
        if self.matmul not in MATMULS:
            raise InputError(f"matmul must be one of {', '.join(MATMULS)} (got {self.matmul!r})")
        self.mesh, self.rules = mesh, rules or ShardingRules()
        self.scan_layers = bool(scan_layers)
        params = unstack_layers(params)  # HF paths for the checks and the CPU layout
        if mesh is not None:
            quant.check_mesh(params, param_shardings(params, mesh, self.rules))
        self.fuse_projections = bool(fuse_projections)
        if self.fuse_projections:
            if mesh is not None and mesh.shape.get("tensor", 1) > 1:
                raise InputError("fuse_projections keeps q/k/v and gate/up whole, so a tensor axis would hold them "
                                 f"on every device (mesh {dict(mesh.shape)}): fuse on meshes without one")
            params = params_lib.fuse_projections(params)
        if mesh is None and jax.default_backend() == "cpu" and quant.is_quantized(params):
            # packed kernels re-laid once for the CPU's matmuls (quant.cpu_layout)
            shapes = init_shapes(config)
            params = quant.cpu_layout(params, params_lib.fuse_projections(shapes) if self.fuse_projections else shapes)
        if self.scan_layers:  # one copy of the decoder's weights, once, at load
            params = stack_layers(params)
        self.params = place_params(params, mesh, self.rules)  # a no-op without a mesh
        self.module = Qwen2VLModule(config, self.dtype, attention=self.attention, matmul=self.matmul,
                                    scan_layers=self.scan_layers)
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, mesh: Mesh | None = None,
                        rules: ShardingRules | None = None, *, attention: str | None = None,
                        matmul: str | None = None, scan_layers: bool = False,
                        fuse_projections: bool = False) -> "Qwen2VL":
        """Loads a converted folder (from qwen2vl-convert or training) or an HF-layout folder
        (config.json + safetensors); with a `mesh` the params are placed by the sharding rules
        as they load. generation_config.json gives the generation defaults."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model folder {path} does not exist")
        config = read_config(path)
        converted = is_converted(path)
        scheme = read_scheme(path) if converted else None
        if scheme is not None:  # before JAX makes its backends: XLA reads its flags once
            quant.sequential_cpu_schedule()
        check_divisible(config, mesh)
        dtype = jnp.dtype(dtype or default_dtype())
        if converted:  # Orbax params, restored straight into their shardings
            shardings = None
            if mesh is not None:  # a quantized folder's tree is not the config's: shard what is stored
                tree = init_shapes(config) if scheme is None else stored_tree(path)
                if scheme is not None:
                    quant.check_mesh(tree, param_shardings(tree, mesh, rules))
                shardings = param_shardings(tree, mesh, rules)
            params = load_params(path, config, dtype, shardings)
        else:
            params = load_hf_params(path, config, dtype, host=mesh is not None)
        return cls(config, params, dtype, mesh=mesh, rules=rules, attention=attention, matmul=matmul,
                   generation_config=GenerationConfig.from_pretrained(path, config), quantization=scheme,
                   scan_layers=scan_layers, fuse_projections=fuse_projections)

    @property
    def param_bytes(self) -> int:
        """Bytes the params take on device, summed over devices (a replicated array counts once
        per device that holds it); with no device arrays, their logical size."""
        per_device = quant.device_bytes(self.params)
        return sum(per_device.values()) if per_device else quant.param_bytes(self.params)

    def param_bytes_per_device(self) -> dict:
        """{device: bytes of parameter data it holds}."""
        return quant.device_bytes(self.params)

    @functools.cached_property
    def engine(self) -> Engine:
        """The jitted functions of this model (built on first use, for its mesh and the layout
        its params already have)."""
        placed = None if self.mesh is None else jax.tree_util.tree_map(lambda p: p.sharding, self.params)
        return Engine(self.module, self.mesh, self.rules, params_sharding=placed)

    # ---------------------------------------------------------------- inputs
    def inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, *, room: int = 0, **ignored) -> ModelInputs:
        """The processor's keys -> checked, bucketed `ModelInputs` (extra keys such as
        mm_token_type_ids are ignored: placeholders are found from input_ids)."""
        return build_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                            pixel_values_videos, video_grid_thw, room=room)

    # ---------------------------------------------------------------- forward
    def logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, **ignored) -> np.ndarray:
        """Logits f32[B, L, V] for the HF processor's outputs, in their layout (zeros at
        padding). Compiles once per bucket of prompt length and patch count."""
        inputs = self.inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                             video_grid_thw)
        return inputs.unpack(np.asarray(self.engine.forward(self.params, inputs)))

    def vision_features(self, pixel_values, grid_thw) -> np.ndarray:
        """Merged vision features f32[N/4, D] for patches with their grids."""
        vision = pack_vision(self.config, pixel_values, grid_thw)
        n = int(np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1).sum()) // self.config.vision.merge_unit
        out = self.engine.encode(self.params, vision)
        return np.asarray(out.astype(jnp.float32))[:n]

    # ---------------------------------------------------------------- generation
    def generation_settings(self, config: GenerationConfig | None = None, **settings) -> GenerationConfig:
        """`config` (default: the model's generation_config) with `settings` overriding it
        (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed,
        eos_token_ids, pad_token_id)."""
        return (config or self.generation_config).replace(**settings)

    def generate_result(self, inputs: dict, config: GenerationConfig) -> GenerationResult:
        """One batch through the decode loop: tokens and timings (see `engine.GenerationResult`)."""
        model_inputs = self.inputs(**_input_keys(inputs), room=config.max_new_tokens)
        return self.engine.generate(self.params, model_inputs, config)

    def stream(self, inputs: dict, config: GenerationConfig) -> Iterator[Token]:
        """One batch decoded step by step: a `engine.Token` per step."""
        model_inputs = self.inputs(**_input_keys(inputs), room=config.max_new_tokens)
        return self.engine.stream(self.params, model_inputs, config)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, *, stream: bool = False,
                 config: GenerationConfig | None = None, **settings):
        """Token ids int32[B, n] generated after the prompt (each row up to and including its
        EOS, pad_token_id after it). `settings` override `config` or the model's
        generation_config. With stream=True, an iterator of int32[B] per step."""
        settings.pop("mm_token_type_ids", None)
        gc = self.generation_settings(config, **settings)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "image_grid_thw": image_grid_thw, "pixel_values_videos": pixel_values_videos,
                  "video_grid_thw": video_grid_thw}
        if stream:
            return (t.ids for t in self.stream(inputs, gc))
        return self.generate_result(inputs, gc).tokens


def _input_keys(inputs: dict) -> dict:
    """The processor's keys we use (others, such as mm_token_type_ids, are ignored)."""
    if inputs.get("input_ids") is None:
        raise InputError("the inputs have no input_ids")
    return {k: inputs[k] for k in _INPUT_KEYS if inputs.get(k) is not None}
