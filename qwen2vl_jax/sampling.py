"""What to generate and how: the settings (`GenerationConfig`), their traced form (`Sampling`)
and the draw of one token (`sample_token`).

Sampling follows HF's order: repetition penalty -> greedy argmax, or temperature -> top-k ->
top-p -> a categorical draw. Greedy-vs-sampling is the only static choice (or a per-row flag);
the sampling values are traced, per row or for the whole batch, so changing them does not
recompile.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.jsonio import read_json

INT32_MAX = 2**31 - 1
MAX_EOS = 8  # EOS ids are a fixed-size array (padded with -1) so their number never recompiles


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

    def replace(self, names: Mapping[str, str] | None = None, **overrides) -> "GenerationConfig":
        """Overrides the fields given (None means keep); a temperature > 0 turns sampling on
        and a temperature of 0 turns it off. Asking for sampling also drops argmax-in-disguise
        defaults (Qwen2-VL-Instruct's folders ship top_k=1, top_p=0.001) unless top_k/top_p
        are given too. `names`: how the caller's user spells each field in messages (a CLI
        passes its flags, e.g. {"max_new_tokens": "--max-new-tokens"})."""
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
        out.validate(names)
        return out

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """Raises one InputError listing every bad setting, each named as `names` spells it."""
        name = lambda field: (names or {}).get(field, field)  # noqa: E731
        # Comparisons are written so that NaN fails them too.
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"{name('max_new_tokens')} must be at least 1 (got {self.max_new_tokens})")
        if not 0 <= self.temperature < math.inf:
            problems.append(f"{name('temperature')} must be a number >= 0 (got {self.temperature})")
        if not 0 <= self.top_k <= INT32_MAX:
            problems.append(f"{name('top_k')} must be between 0 and {INT32_MAX} (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"{name('top_p')} must be in (0, 1] (got {self.top_p})")
        if not 0 < self.repetition_penalty < math.inf:
            problems.append(f"{name('repetition_penalty')} must be a number > 0 (got {self.repetition_penalty})")
        if not 0 <= self.seed < 2**32:  # JAX keys take 32 bits of the seed; wider ones would collide
            problems.append(f"{name('seed')} must be between 0 and {2**32 - 1} (got {self.seed})")
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
        raw = read_json(path, missing_ok=True)
        if raw is None:
            return base
        try:
            return cls._from_raw(base, raw)
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: a field has a bad value ({e})") from None

    @classmethod
    def _from_raw(cls, base: "GenerationConfig", raw: dict) -> "GenerationConfig":
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
    def of(cls, generation: GenerationConfig) -> "Sampling":
        eos = np.full((MAX_EOS,), -1, np.int32)
        eos[: len(generation.eos_token_ids)] = generation.eos_token_ids
        return cls(np.float32(generation.temperature), np.int32(generation.top_k), np.float32(generation.top_p),
                   np.float32(generation.repetition_penalty), eos, np.int32(generation.pad_token_id))


def sample_token(logits, seen, sampling: Sampling, key, greedy):
    """logits f32[B, V]; seen bool[B, V] (tokens so far, for the repetition penalty) -> int32[B].

    sampling: fields scalar (every row alike) or [B] (each row its own); key: one key [2] that
    draws for the whole batch, or [B, 2], a key per row (a row then draws as it would alone);
    greedy: True or False for every row (fixed when compiled), or bool[B], each row's choice,
    with the sort that sampling needs skipped when every row is greedy."""
    column = lambda x: x[:, None] if jnp.ndim(x) == 1 else x  # noqa: E731 - a per-row value against [B, V]
    p = column(sampling.repetition_penalty)
    logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
    argmax = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    if isinstance(greedy, bool):
        return argmax() if greedy else _draw(logits, sampling, key, column)
    return jax.lax.cond(jnp.all(greedy), argmax,
                        lambda: jnp.where(greedy, argmax(), _draw(logits, sampling, key, column)))


def _draw(logits, sampling: Sampling, key, column):
    """temperature -> top-k -> top-p -> a categorical draw, as HF orders them."""
    v = logits.shape[-1]
    logits = logits / jnp.maximum(column(sampling.temperature), 1e-6)
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = column(jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, v), v))
    rank = jnp.arange(v)
    sorted_desc = jnp.where(rank < k, sorted_desc, -jnp.inf)
    # top-p over the top-k survivors: keep a token while the mass strictly before it < top_p.
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < column(sampling.top_p)) | (rank == 0)
    n_keep = jnp.sum(keep & (rank < k), axis=-1)  # >= 1
    threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    if key.ndim == 1:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
