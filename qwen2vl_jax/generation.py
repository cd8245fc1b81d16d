"""Generation: bucketed shapes, a fixed-size KV cache, a jitted prefill and decode step.

The flow for one batch (B rows, left-padded or not):
  host:   compact each row's real tokens to the right of a prompt bucket Lb (a short ladder),
          3D positions, a vision layout padded to patch/segment buckets; the KV cache has
          S = Lb + round_up(max_new_tokens) slots.
  device: `encode` (vision tower, jitted per patch bucket) -> `prefill` (embeds, fills the
          cache, draws the first token; jitted per (B, Lb, S, feature bucket)) -> `step` (one
          token for every row) run either inside one `jax.lax.while_loop` (`generate`) or from
          a Python generator (`stream`), which drives the same jitted step.

A generated token in cache slot j of a row sits at M-RoPE position j + pos_offset, with
pos_offset = rope_delta - (left pads in that row), the same on all three axes. Attention is
masked by slot (`kv_valid`), so left padding needs no special case.

Sampling (HF's order): repetition penalty -> greedy argmax, or temperature -> top-k -> top-p
-> a categorical draw with a fresh key split off every step. Greedy-vs-sampling is the only
static choice; the sampling values are traced, so changing them does not recompile.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.model import Qwen2VLModule, check_placeholders, prepare_vision
from qwen2vl_jax.modules.text import LayerCache
from qwen2vl_jax.positions import get_rope_index
from qwen2vl_jax.sharding import (
    ShardingRules, check_divisible, named_sharding, param_shardings, place_params, shard, to_global,
    use_mesh,
)

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from qwen2vl_jax.model import Qwen2VL

INT32_MAX = 2**31 - 1
MAX_EOS = 8  # EOS ids are a fixed-size array (padded with -1) so their number never recompiles
CACHE_ROOM_MULTIPLE = 64  # max_new_tokens is rounded up to this for the cache's extra slots


# ---------------------------------------------------------------------------- buckets
def bucket(n: int, minimum: int = 64) -> int:
    """The smallest rung of the ladder minimum * {1, 1.25, 1.5, 1.75} * 2^k that holds n (64,
    80, 96, 112, 128, 160, ...): four rungs per octave, so at most 25% padding and a few dozen
    shapes up to a 32k context; each compiles once."""
    rung = minimum
    while True:
        for size in (rung, rung * 5 // 4, rung * 3 // 2, rung * 7 // 4):
            if size >= n:
                return size
        rung *= 2


def pow2_bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how; `from_pretrained` reads generation_config.json's defaults."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    @property
    def greedy(self) -> bool:
        """Argmax decoding: no sampling asked, temperature 0, or top_k 1 (the published
        Qwen2-VL generation_config.json samples with top_k=1, which is argmax)."""
        return (not self.do_sample) or self.temperature == 0 or self.top_k == 1

    def replace(self, **overrides) -> "GenerationConfig":
        """Overrides the fields given (None means keep); a temperature > 0 turns sampling on
        and a temperature of 0 turns it off. Asking for sampling also drops argmax-in-disguise
        defaults (Qwen2-VL-Instruct's folders ship top_k=1, top_p=0.001) unless top_k/top_p
        are given too."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        if "temperature" in overrides and "do_sample" not in overrides:
            overrides["do_sample"] = overrides["temperature"] > 0
        if overrides.get("temperature", 0) > 0:
            if "top_k" not in overrides and self.top_k == 1:
                overrides["top_k"] = 0
            if "top_p" not in overrides and self.top_p < 0.01:
                overrides["top_p"] = 1.0
        if "eos_token_ids" in overrides:
            eos = overrides["eos_token_ids"]
            overrides["eos_token_ids"] = (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
        out = dataclasses.replace(self, **overrides)
        out.validate()
        return out

    def validate(self) -> None:
        # Comparisons are written so that NaN fails them too.
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if not 0 <= self.temperature < math.inf:
            problems.append(f"temperature must be a number >= 0 (got {self.temperature})")
        if not 0 <= self.top_k <= INT32_MAX:
            problems.append(f"top_k must be between 0 and {INT32_MAX} (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 < self.repetition_penalty < math.inf:
            problems.append(f"repetition_penalty must be a number > 0 (got {self.repetition_penalty})")
        if not 0 <= self.seed < 2**32:  # JAX keys take 32 bits of the seed; wider ones would collide
            problems.append(f"seed must be between 0 and {2**32 - 1} (got {self.seed})")
        if len(self.eos_token_ids) > MAX_EOS:
            problems.append(f"at most {MAX_EOS} EOS token ids (got {len(self.eos_token_ids)})")
        if problems:
            raise InputError("; ".join(problems))

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        eos = config.eos_token_id
        return cls(eos_token_ids=tuple(eos) if isinstance(eos, tuple) else (int(eos),))

    @classmethod
    def from_pretrained(cls, folder: str | Path, config) -> "GenerationConfig":
        """The model's EOS ids plus generation_config.json's sampling defaults when present."""
        base = cls.from_model_config(config)
        path = Path(folder) / "generation_config.json"
        if not path.is_file():
            return base
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path} is not readable JSON: {e}") from None
        eos = raw.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        eos_ids = tuple(dict.fromkeys([*base.eos_token_ids, *(int(e) for e in eos)]))
        pad = raw.get("pad_token_id")
        return dataclasses.replace(
            base,
            do_sample=bool(raw.get("do_sample", False)),
            temperature=float(raw.get("temperature", 1.0) or 0.0),
            top_k=int(raw.get("top_k", 0) or 0),
            top_p=float(raw.get("top_p", 1.0) or 1.0),
            repetition_penalty=float(raw.get("repetition_penalty", 1.0) or 1.0),
            max_new_tokens=int(raw.get("max_new_tokens", base.max_new_tokens) or base.max_new_tokens),
            eos_token_ids=eos_ids,
            pad_token_id=int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
        )


@flax.struct.dataclass
class Sampling:
    """The traced sampling values (changing them does not recompile)."""

    temperature: jax.Array  # f32[]
    top_k: jax.Array  # int32[], 0 = off
    top_p: jax.Array  # f32[]
    repetition_penalty: jax.Array  # f32[]
    eos: jax.Array  # int32[MAX_EOS], -1 = unused
    pad: jax.Array  # int32[]

    @classmethod
    def of(cls, gc: GenerationConfig) -> "Sampling":
        eos = np.full((MAX_EOS,), -1, np.int32)
        eos[: len(gc.eos_token_ids)] = gc.eos_token_ids
        return cls(np.float32(gc.temperature), np.int32(gc.top_k), np.float32(gc.top_p),
                   np.float32(gc.repetition_penalty), eos, np.int32(gc.pad_token_id))


def sample_token(logits, seen, sampling: Sampling, key, greedy: bool):
    """logits f32[B, V]; seen bool[B, V] (tokens so far, for the repetition penalty) -> int32[B]."""
    p = sampling.repetition_penalty
    logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    logits = logits / jnp.maximum(sampling.temperature, 1e-6)
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, v), v)
    rank = jnp.arange(v)
    sorted_desc = jnp.where(rank < k, sorted_desc, -jnp.inf)
    # top-p over the top-k survivors: keep a token while the mass strictly before it < top_p.
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < sampling.top_p) | (rank == 0)
    n_keep = jnp.sum(keep & (rank < k), axis=-1)  # >= 1
    threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------- state
@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries. B rows, S cache slots, T = S - start."""

    step: jax.Array  # int32[]: tokens generated so far
    start: jax.Array  # int32[]: cache slot of the first generated token (the prompt bucket)
    max_new: jax.Array  # int32[]: stop after this many tokens (<= T)
    token: jax.Array  # int32[B]: the last generated token, fed to the next step
    tokens: jax.Array  # int32[B, T]: generated tokens; pad after a row's EOS
    done: jax.Array  # bool[B]: the row has produced an EOS
    logits: jax.Array  # f32[B, V]: the logits the last token was drawn from
    cache: tuple  # one LayerCache per layer, k/v [B, S, K, hd]
    kv_valid: jax.Array  # bool[B, S]: which slots hold a real token (prompt pads do not)
    pos_offset: jax.Array  # int32[B]: the M-RoPE position of slot j is j + pos_offset
    seen: jax.Array  # bool[B, V]: tokens in the prompt or generated (repetition penalty)
    rng: jax.Array  # the key the next step splits
    sampling: Sampling

    def constrain(self) -> "DecodeState":
        """Pins the sharding of the batch-major fields (a no-op without a mesh)."""
        cache = tuple(LayerCache(shard(c.k, "batch", None, "kv_heads", None),
                                 shard(c.v, "batch", None, "kv_heads", None)) for c in self.cache)
        return self.replace(
            cache=cache, kv_valid=shard(self.kv_valid, "batch", None), logits=shard(self.logits, "batch", "vocab"),
            seen=shard(self.seen, "batch", None), pos_offset=shard(self.pos_offset, "batch"),
            # What the host reads back stays replicated, so every process can read it.
            token=shard(self.token, None), tokens=shard(self.tokens, None, None), done=shard(self.done, None),
        )


def _advance(state: DecodeState, logits, greedy: bool) -> DecodeState:
    """Draws the next token from `logits` f32[B, V] and records it."""
    rng, key = jax.random.split(state.rng)
    tok = sample_token(logits, state.seen, state.sampling, key, greedy)
    tok = jnp.where(state.done, state.sampling.pad, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, tok[:, None], state.step, axis=1)
    is_eos = jnp.any(tok[:, None] == state.sampling.eos[None, :], axis=-1)
    seen = state.seen.at[jnp.arange(tok.shape[0]), tok].set(True)
    return state.replace(step=state.step + 1, token=tok, tokens=tokens, done=state.done | is_eos,
                         logits=logits, seen=seen, rng=rng)


def _keep_going(state: DecodeState):
    return (state.step < state.max_new) & ~jnp.all(state.done)


# ---------------------------------------------------------------------------- compile counter
@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block: `with count_compiles() as c: ...;
    c["n"]`. Used by the tests to show that a new shape within a bucket costs nothing."""
    counter = {"n": 0}

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counter["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ---------------------------------------------------------------------------- the generator
@dataclasses.dataclass
class Prepared:
    """Host-side arrays for one batch, already padded to their buckets."""

    input_ids: np.ndarray  # int32[B, Lb], real tokens right-aligned
    positions: np.ndarray  # int32[3, B, Lb]
    kv_valid: np.ndarray  # bool[B, S]
    pos_offset: np.ndarray  # int32[B]
    lengths: np.ndarray  # int[B]: real prompt tokens per row
    vision: dict | None  # patches + vision_layout arrays, padded to the patch buckets


class Generator:
    """Jitted generation for one model (and one mesh, or none).

    Compiles once per bucket: `encode` per (patches, segments, segment length) bucket,
    `prefill` per (B, prompt bucket, cache size, feature bucket), `step`/`loop` per (B, cache
    size). `traces` counts how often each function was traced.
    """

    def __init__(self, model: "Qwen2VL", mesh: "Mesh | None" = None, rules: ShardingRules | None = None,
                 *, prompt_bucket_min: int = 64, patch_bucket_min: int = 64, loop_options: dict | None = None):
        self.model = model
        self.config = model.config
        self.module: Qwen2VLModule = model.module
        self.mesh = mesh
        self.rules = rules or ShardingRules()
        self.prompt_bucket_min = prompt_bucket_min
        self.patch_bucket_min = patch_bucket_min
        self.traces: collections.Counter = collections.Counter()
        check_divisible(self.config, mesh)
        if mesh is not None:
            model.params = place_params(model.params, mesh, self.rules)
            p_sh = param_shardings(model.params, mesh, self.rules)
        else:
            p_sh = None

        # Params carry explicit shardings; the other inputs arrive already laid out by their
        # logical axes (`_put_batch`) and the state pins its own (`DecodeState.constrain`).
        def jit(fn, n_dynamic, **kw):
            shardings = {} if p_sh is None else {"in_shardings": (p_sh,) + (None,) * (n_dynamic - 1)}
            return jax.jit(fn, **shardings, **kw)

        self._encode = jit(self._encode_impl, 2)
        self._prefill = jit(self._prefill_impl, 5, static_argnums=5)
        self._step = jit(self._step_impl, 2, static_argnums=2, donate_argnums=1)
        self._loop = jit(self._loop_impl, 2, static_argnums=2, donate_argnums=1,
                         **({"compiler_options": loop_options} if loop_options else {}))

    # ------------------------------------------------------------ traced bodies
    def _mesh_ctx(self):
        return use_mesh(self.mesh, self.rules)

    def _apply(self, params, *args, method):
        return self.module.apply({"params": params}, *args, method=method)

    def _encode_impl(self, params, vision):
        self.traces["encode"] += 1
        with self._mesh_ctx(), jax.named_scope("vision_tower"):
            return self.module.apply({"params": params}, method=Qwen2VLModule.encode_vision, **vision)

    def _prefill_impl(self, params, batch, features, sampling, rng, greedy: bool):
        """batch: input_ids int32[B, Lb], positions int32[3, B, Lb], kv_valid bool[B, S],
        pos_offset int32[B]; features [F, D] or None -> DecodeState after the first token."""
        self.traces["prefill"] += 1
        cfg = self.config.text
        ids = batch["input_ids"]
        b, lb = ids.shape
        cache_len = batch["kv_valid"].shape[1]
        with self._mesh_ctx(), jax.named_scope("prefill"):
            x = self._apply(params, ids, features, method=Qwen2VLModule.embed)
            shape = (b, cache_len, cfg.num_key_value_heads, cfg.head_dim)
            cache = tuple(LayerCache(jnp.zeros(shape, self.model.dtype), jnp.zeros(shape, self.model.dtype))
                          for _ in range(cfg.num_hidden_layers))
            cache = tuple(LayerCache(shard(c.k, "batch", None, "kv_heads", None),
                                     shard(c.v, "batch", None, "kv_heads", None)) for c in cache)
            hidden, cache = self._apply(params, x, batch["positions"], batch["kv_valid"], cache, 0,
                                        method=Qwen2VLModule.decode)
            logits = self._apply(params, hidden[:, -1], method=Qwen2VLModule.lm_logits).astype(jnp.float32)
            prompt_valid = batch["kv_valid"][:, :lb]
            seen = jnp.zeros((b, cfg.vocab_size), bool).at[jnp.arange(b)[:, None], ids].max(prompt_valid)
            state = DecodeState(
                step=jnp.int32(0), start=jnp.int32(lb), max_new=batch["max_new"],
                token=jnp.zeros((b,), jnp.int32),
                tokens=jnp.full((b, cache_len - lb), sampling.pad, jnp.int32),
                done=jnp.zeros((b,), bool), logits=logits, cache=cache, kv_valid=batch["kv_valid"],
                pos_offset=batch["pos_offset"], seen=seen, rng=rng, sampling=sampling,
            )
            return _advance(state, logits, greedy).constrain()

    def _decode_one(self, params, state: DecodeState, greedy: bool) -> DecodeState:
        slot = state.start + state.step - 1  # where the last token goes
        pos = jnp.broadcast_to((slot + state.pos_offset)[None, :, None], (3, state.token.shape[0], 1))
        x = self._apply(params, state.token[:, None], None, method=Qwen2VLModule.embed)
        hidden, cache = self._apply(params, x, pos, state.kv_valid, state.cache, slot, method=Qwen2VLModule.decode)
        logits = self._apply(params, hidden[:, -1], method=Qwen2VLModule.lm_logits).astype(jnp.float32)
        return _advance(state.replace(cache=cache), logits, greedy).constrain()

    def _step_impl(self, params, state: DecodeState, greedy: bool) -> DecodeState:
        self.traces["step"] += 1
        with self._mesh_ctx(), jax.named_scope("decode_step"):
            return self._decode_one(params, state, greedy)

    def _loop_impl(self, params, state: DecodeState, greedy: bool) -> DecodeState:
        self.traces["loop"] += 1
        with self._mesh_ctx(), jax.named_scope("decode_loop"):
            return jax.lax.while_loop(_keep_going, lambda s: self._decode_one(params, s, greedy), state)

    # ------------------------------------------------------------ host side
    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, *, max_new_tokens: int) -> Prepared:
        """Checks the inputs and pads them to their buckets (see the module docstring)."""
        cfg = self.config
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.size == 0:
            raise InputError(f"input_ids must be [batch, length] with at least one token (got shape {ids.shape})")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask shape {mask.shape} differs from input_ids {ids.shape}")
        lengths = mask.sum(axis=1)
        if (lengths == 0).any():
            raise InputError(f"row {int(np.flatnonzero(lengths == 0)[0])} of the batch has no tokens")
        if ((ids < 0) | (ids >= cfg.text.vocab_size))[mask].any():
            raise InputError(f"input_ids hold token ids outside the vocabulary (0..{cfg.text.vocab_size - 1})")
        check_placeholders(cfg, ids[mask][None], image_grid_thw, video_grid_thw)
        longest = int(lengths.max())
        context = cfg.text.max_position_embeddings
        if longest + max_new_tokens > context:
            raise InputError(f"the prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) is longer "
                             f"than the model's context of {context} tokens")

        b = ids.shape[0]
        lb = bucket(longest, self.prompt_bucket_min)
        s = lb + round_up(max_new_tokens, CACHE_ROOM_MULTIPLE)
        packed = np.zeros((b, lb), np.int32)
        packed_mask = np.zeros((b, lb), bool)
        for r in range(b):  # right-align each row's real tokens (either padding side in)
            packed[r, lb - lengths[r]:] = ids[r][mask[r]]
            packed_mask[r, lb - lengths[r]:] = True
        positions, deltas = get_rope_index(
            packed, packed_mask, image_grid_thw, video_grid_thw, image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size)
        kv_valid = np.concatenate([packed_mask, np.ones((b, s - lb), bool)], axis=1)
        pos_offset = (deltas[:, 0] - (lb - lengths)).astype(np.int32)
        vision = self._prepare_vision(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        return Prepared(packed, positions.astype(np.int32), kv_valid, pos_offset, lengths, vision)

    def _prepare_vision(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        grids = [np.asarray(g, np.int64).reshape(-1, 3) for g in (image_grid_thw, video_grid_thw) if g is not None]
        if not grids:
            return None
        grid = np.concatenate(grids)
        seg_lens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
        unit = self.config.vision.merge_unit
        sizes = dict(
            num_patches=round_up(bucket(int(seg_lens.sum()), self.patch_bucket_min), unit),
            num_segments=pow2_bucket(len(seg_lens)),
            segment_len=bucket(int(seg_lens.max()), self.patch_bucket_min),
        )
        return prepare_vision(self.config, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, **sizes)

    def _put_batch(self, tree: dict, axes: dict) -> dict:
        """Host arrays -> device arrays laid out by their logical axes (data parallel on batch)."""
        if self.mesh is None:
            return tree
        return {k: to_global(v, named_sharding(self.mesh, self.rules, np.shape(v), *axes.get(k, ())))
                for k, v in tree.items()}

    def start(self, prepared: Prepared, gc: GenerationConfig) -> DecodeState:
        """Vision tower + prefill: the state after the first generated token."""
        params = self.model.params
        features = None
        self.last_vision_s = 0.0  # wall time of the vision tower alone, for reports
        if prepared.vision is not None:
            t0 = time.perf_counter()
            vision = self._put_batch(prepared.vision, {})
            features = jax.block_until_ready(self._encode(params, vision))
            self.last_vision_s = time.perf_counter() - t0
        batch = {"input_ids": prepared.input_ids, "positions": prepared.positions,
                 "kv_valid": prepared.kv_valid, "pos_offset": prepared.pos_offset,
                 "max_new": np.int32(gc.max_new_tokens)}
        batch = self._put_batch(batch, {"input_ids": ("batch",), "positions": (None, "batch"),
                                        "kv_valid": ("batch",), "pos_offset": ("batch",)})
        rng = jax.random.PRNGKey(gc.seed)
        return self._prefill(params, batch, features, Sampling.of(gc), rng, gc.greedy)

    def generate(self, inputs: dict, gc: GenerationConfig) -> np.ndarray:
        """-> int32[B, n]: the generated tokens (n <= max_new_tokens; each row stops at its
        EOS, which is included, and holds pad_token_id after it)."""
        prepared = self.prepare(**_vision_keys(inputs), max_new_tokens=gc.max_new_tokens)
        state = self.start(prepared, gc)
        state = self._loop(self.model.params, state, gc.greedy)
        n = int(state.step)
        return np.asarray(state.tokens)[:, :n]

    def stream(self, inputs: dict, gc: GenerationConfig) -> Iterator[np.ndarray]:
        """Yields int32[B] per step (pad for finished rows) as soon as each is drawn."""
        prepared = self.prepare(**_vision_keys(inputs), max_new_tokens=gc.max_new_tokens)
        state = self.start(prepared, gc)
        while True:
            token, done, step = jax.device_get((state.token, state.done, state.step))
            yield token
            if step >= gc.max_new_tokens or done.all():
                return
            state = self._step(self.model.params, state, gc.greedy)


_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
               "video_grid_thw")


def _vision_keys(inputs: dict) -> dict:
    """The processor's keys we use (others, such as mm_token_type_ids, are ignored)."""
    if "input_ids" not in inputs:
        raise InputError("the inputs have no input_ids")
    return {k: inputs[k] for k in _INPUT_KEYS if inputs.get(k) is not None}


def generator_for(model: "Qwen2VL") -> Generator:
    """The model's cached Generator (built for its mesh on first use)."""
    gen = getattr(model, "_generator", None)
    if gen is None or gen.mesh is not getattr(model, "mesh", None):
        gen = Generator(model, getattr(model, "mesh", None), getattr(model, "rules", None))
        model._generator = gen
    return gen
