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
import re
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2vl_jax.checkpoint import (check_params, is_converted, load_hf_params, load_params, read_config,
                                    read_scheme, stored_tree)
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.engine import Engine, GenerationResult, Token
from qwen2vl_jax.errors import CheckpointError, InputError
from qwen2vl_jax.inputs import ModelInputs, build_inputs, pack_vision
from qwen2vl_jax.lora.peft_format import load_adapter
from qwen2vl_jax.lora.tree import attach, merge
from qwen2vl_jax.modules.attention import BACKENDS, KERNELS, MATMULS
from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule, init_shapes
from qwen2vl_jax import params as params_lib
from qwen2vl_jax.params import (STACKED_PREFIX, device_bytes, flatten, param_bytes, stack_layers, unflatten,
                                unstack_layers)
from qwen2vl_jax.quant.cpu import cpu_layout
from qwen2vl_jax.quant.format import Scheme, is_quantized
from qwen2vl_jax.sampling import GenerationConfig
from qwen2vl_jax.sharding import ShardingRules, check_divisible, check_groups, param_shardings, place_params

ATTENTION_ENV = "QWEN2VL_ATTENTION"  # the default attention kernel when none is passed
MATMUL_ENV = "QWEN2VL_MATMUL"  # the default precision of the large products when none is passed
_LAYER = re.compile(r"^model/layers_\d+/(.+)$")


def default_backend() -> str:
    """The platform JAX runs on ("cpu", "gpu", "tpu"), read on the host when a model is built:
    the default `backend` of a model."""
    return jax.default_backend()


def default_dtype(backend: str | None = None):
    """float32 for a model built for the CPU (XLA's CPU bf16 matvec is slow), bfloat16 for an
    accelerator; backend: the model's (default: `default_backend()`)."""
    return jnp.float32 if (backend or default_backend()) == "cpu" else jnp.bfloat16


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

    dtype: the compute dtype (default: float32 for the CPU, bfloat16 elsewhere); attention: the
    attention kernel, "auto", "xla" or "cudnn" (default: $QWEN2VL_ATTENTION, else "auto");
    matmul: "f32" or "bf16" (default: $QWEN2VL_MATMUL, else "f32"), the precision of products of 64 rows or more (the vision
    tower, prefill: inputs rounded to bf16, f32 accumulation; modules/attention.py);
    backend: the platform the model's programs are built for, "cpu", "gpu" or "tpu" (default:
    the one JAX runs on, read here on the host): "cpu" re-lays packed quantized kernels for the
    CPU's matmul (without a mesh) and picks the CPU kernels, "gpu" lets "auto" attention take
    cuDNN; a model built for "tpu" on a CPU host lowers what a TPU runs (benchmarks/scale.py);
    scan_layers: run the decoder's layers as one scanned layer, so compile time does not grow
    with depth (the params are then held stacked, `model/layers/...` with a leading layer
    axis; `params.unstack_layers` gives HF paths back); fuse_projections: hold each decoder
    layer's q/k/v and gate/up weights concatenated (`params.fuse_projections`), so a step runs
    one matmul for each set; refused on a mesh with a tensor axis, which would then hold them
    whole on every device; the unfused weights stay alive until the model is built, so fusing
    needs room for those weights twice at load). All are fixed for the
    model's life: a model with another choice compiles its own functions.

    The params pass through `_arrange` once, in one order (fuse, CPU layout, stack, place);
    the settings and the mesh are checked once (`_configure`, `_layout`)."""

    def __init__(self, config: Qwen2VLConfig, params: dict, dtype=None, mesh: Mesh | None = None,
                 rules: ShardingRules | None = None, *, attention: str | None = None, matmul: str | None = None,
                 generation_config: GenerationConfig | None = None, quantization: Scheme | None = None,
                 scan_layers: bool = False, fuse_projections: bool = False, backend: str | None = None):
        self._configure(config, dtype, mesh, rules, attention=attention, matmul=matmul,
                        generation_config=generation_config, quantization=quantization, scan_layers=scan_layers,
                        fuse_projections=fuse_projections, backend=backend)
        params = unstack_layers(params)  # HF paths: what fusing, the CPU layout and the rules read
        layout = self._layout(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params))
        self.params = self._arrange(params, layout)

    def _configure(self, config: Qwen2VLConfig, dtype, mesh: Mesh | None, rules: ShardingRules | None, *,
                   attention: str | None, matmul: str | None, generation_config: GenerationConfig | None,
                   quantization: Scheme | None, scan_layers: bool, fuse_projections: bool, backend: str | None):
        """The model's settings, each checked once (a bad one is one InputError line), and its module."""
        check_divisible(config, mesh)
        self.config = config
        self.quantization = quantization  # how the params are packed (quant/format.py), None for float
        self.backend = default_backend() if backend is None else str(backend).strip().lower()
        if backend is not None and self.backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        self.dtype = jnp.dtype(dtype or default_dtype(self.backend))
        self.attention = default_attention() if attention is None else attention
        if self.attention not in KERNELS:
            raise InputError(f"attention must be one of {', '.join(KERNELS)} (got {self.attention!r})")
        self.matmul = default_matmul() if matmul is None else matmul
        if self.matmul not in MATMULS:
            raise InputError(f"matmul must be one of {', '.join(MATMULS)} (got {self.matmul!r})")
        self.mesh, self.rules = mesh, rules or ShardingRules()
        self.scan_layers = bool(scan_layers)
        self.fuse_projections = bool(fuse_projections)
        if self.fuse_projections and mesh is not None and mesh.shape.get("tensor", 1) > 1:
            raise InputError("fuse_projections keeps q/k/v and gate/up whole, so a tensor axis would hold them "
                             f"on every device (mesh {dict(mesh.shape)}): fuse on meshes without one")
        self.module = Qwen2VLModule(config, self.dtype, attention=self.attention, matmul=self.matmul,
                                    scan_layers=self.scan_layers, backend=self.backend)
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)

    def _layout(self, tree: dict):
        """The NamedSharding of every parameter as `_arrange` leaves it (fused, stacked), for a
        tree of shapes with HF paths (as stored); None without a mesh. A layout that would cut
        the quantization groups of a packed weight is refused here (`check_groups`)."""
        if self.mesh is None:
            return None
        if self.fuse_projections:
            tree = params_lib.fuse_projections(tree)
        if self.scan_layers:
            tree = stack_layers(tree)
        layout = param_shardings(tree, self.mesh, self.rules)
        check_groups(tree, layout)
        return layout

    def _restore_layout(self, tree: dict, layout):
        """The sharding each stored leaf (HF paths, `tree`) is restored into, from the final
        `layout`: a leaf that `_arrange` keeps takes its own; a member of a fused set the fused
        weight's (its rule splits the rows, which the members share, and not the outputs they
        are joined along); a layer of a stacked leaf the stacked one's without the layer axis."""
        if layout is None:
            return None
        final = flatten(layout)
        out = {}
        for path in flatten(tree):
            target = path
            if self.fuse_projections:
                for fused, members in params_lib.FUSED.items():
                    for member in members:
                        if target.startswith("model/layers_") and f"/{member}/" in target:
                            target = target.replace(f"/{member}/", f"/{fused}/")
            layer = _LAYER.match(target) if self.scan_layers else None
            sharding = final[STACKED_PREFIX + layer.group(1) if layer else target]
            out[path] = NamedSharding(sharding.mesh, P(*sharding.spec[1:])) if layer else sharding
        return unflatten(out)

    def _arrange(self, params: dict, layout, shapes: dict | None = None) -> dict:
        """Params with HF paths (as stored or converted) -> the form the model runs on, in this
        order, each step once:
          1. fuse_projections (when asked): each layer's q/k/v and gate/up joined;
          2. the CPU layout of packed kernels (`quant.cpu.cpu_layout`), for a model built for
             "cpu" without a mesh;
          3. stack_layers (scan_layers): the decoder's layers along a leading axis;
          4. placement on the mesh by `layout` (`_layout`); leaves already restored into their
             sharding stay where they are; nothing without a mesh.
        shapes: `init_shapes(config)` when the caller has built it (step 2 reads input counts)."""
        if self.fuse_projections:
            params = params_lib.fuse_projections(params)
        if self.mesh is None and self.backend == "cpu" and is_quantized(params):
            shapes = init_shapes(self.config) if shapes is None else shapes
            params = cpu_layout(params, params_lib.fuse_projections(shapes) if self.fuse_projections else shapes)
        if self.scan_layers:  # one copy of the decoder's weights, once, at load
            params = stack_layers(params)
        return place_params(params, self.mesh, self.rules, shardings=layout)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, mesh: Mesh | None = None,
                        rules: ShardingRules | None = None, *, attention: str | None = None,
                        matmul: str | None = None, scan_layers: bool = False,
                        fuse_projections: bool = False, backend: str | None = None,
                        adapter: str | Path | None = None, merge_adapter: bool = False) -> "Qwen2VL":
        """Loads a converted folder (from qwen2vl-convert or training) or an HF-layout folder
        (config.json + safetensors); with a `mesh` the params are placed by the sharding rules
        as they load. generation_config.json gives the generation defaults.

        One pass: the config, the marker and the stored tree's metadata are read once, the
        parameter shapes built once, the settings and the mesh checked once, the params restored
        straight into their final shardings and arranged once (`_arrange`). XLA flags are not
        touched here: a program that loads a quantized folder on CPU sets them before JAX starts
        (`xla_flags.for_model`, which the command-line tools call).

        adapter: a PEFT LoRA adapter folder (written by qwen2vl-train or by peft). Unmerged (the
        default) its low-rank leaves sit beside the base weights, which stay as stored, packed or
        not, and each adapted projection adds x @ A @ B * scale; merge_adapter=True adds
        scale * A @ B into the float kernels once at load (refused for packed weights)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model folder {path} does not exist")
        config = read_config(path)
        converted = is_converted(path)
        model = cls.__new__(cls)
        model._configure(config, dtype, mesh, rules, attention=attention, matmul=matmul,
                         generation_config=GenerationConfig.from_pretrained(path, config),
                         quantization=read_scheme(path) if converted else None, scan_layers=scan_layers,
                         fuse_projections=fuse_projections, backend=backend)
        shapes = init_shapes(config)
        lora = None if adapter is None else load_adapter(adapter, shapes)
        if lora is not None and not merge_adapter and fuse_projections:
            raise InputError("fuse_projections joins q/k/v and gate/up, whose adapters differ: load the adapter "
                             "merged (merge_adapter=True) or without fusing")
        unmerged = {} if lora is None or merge_adapter else lora  # its leaves are laid out with the rest
        if converted:  # Orbax params, restored straight into their shardings
            stored = check_params(path, config, shapes)
            tree = stored_tree(stored)  # a quantized folder's tree is not the config's: lay out what is stored
            layout = model._layout(with_adapter(tree, unmerged))
            params = load_params(path, config, model.dtype, model._restore_layout(tree, layout), stored=stored)
        else:
            layout = model._layout(with_adapter(shapes, unmerged))
            params = load_hf_params(path, config, model.dtype, host=mesh is not None, shapes=shapes)
        if lora is not None:
            params = merge(params, lora) if merge_adapter else attach(params, lora)
        model.params = model._arrange(params, layout, shapes)
        return model

    @property
    def param_bytes(self) -> int:
        """Bytes the params take on device, summed over devices (a replicated array counts once
        per device that holds it); with no device arrays, their logical size."""
        per_device = device_bytes(self.params)
        return sum(per_device.values()) if per_device else param_bytes(self.params)

    def param_bytes_per_device(self) -> dict:
        """{device: bytes of parameter data it holds}."""
        return device_bytes(self.params)

    @functools.cached_property
    def engine(self) -> Engine:
        """The jitted functions of this model (built on first use, for its mesh and the layout
        its params already have)."""
        placed = None if self.mesh is None else jax.tree_util.tree_map(lambda p: p.sharding, self.params)
        return Engine(self.module, self.mesh, self.rules, params_sharding=placed)

    # ---------------------------------------------------------------- inputs
    def inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, *, max_new_tokens: int = 0, **ignored) -> ModelInputs:
        """The processor's keys -> checked, bucketed `ModelInputs` (extra keys such as
        mm_token_type_ids are ignored: placeholders are found from input_ids)."""
        return build_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                            pixel_values_videos, video_grid_thw, max_new_tokens=max_new_tokens)

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
        model_inputs = self.inputs(**_input_keys(inputs), max_new_tokens=config.max_new_tokens)
        return self.engine.generate(self.params, model_inputs, config)

    def stream(self, inputs: dict, config: GenerationConfig) -> Iterator[Token]:
        """One batch decoded step by step: a `engine.Token` per step."""
        model_inputs = self.inputs(**_input_keys(inputs), max_new_tokens=config.max_new_tokens)
        return self.engine.stream(self.params, model_inputs, config)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, *, stream: bool = False,
                 config: GenerationConfig | None = None, **settings):
        """Token ids int32[B, n] generated after the prompt (each row up to and including its
        EOS, pad_token_id after it). `settings` override `config` or the model's
        generation_config. With stream=True, an iterator of int32[B] per step."""
        settings.pop("mm_token_type_ids", None)
        generation = self.generation_settings(config, **settings)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "image_grid_thw": image_grid_thw, "pixel_values_videos": pixel_values_videos,
                  "video_grid_thw": video_grid_thw}
        if stream:
            return (t.ids for t in self.stream(inputs, generation))
        return self.generate_result(inputs, generation).tokens


def with_adapter(tree: dict, adapter: dict) -> dict:
    """A tree of parameter shapes with an adapter's leaves attached (as ShapeDtypeStructs)."""
    if not adapter:
        return tree
    return attach(tree, {p: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for p, v in adapter.items()})


def _input_keys(inputs: dict) -> dict:
    """The processor's keys we use (others, such as mm_token_type_ids, are ignored)."""
    if inputs.get("input_ids") is None:
        raise InputError("the inputs have no input_ids")
    return {k: inputs[k] for k in _INPUT_KEYS if inputs.get(k) is not None}
