"""The HF <-> JAX parameter table.

JAX parameter paths mirror the HF names (`visual.blocks.3.attn.qkv.weight` <->
`visual/blocks_3/attn/qkv/kernel`), so the whole mapping is the table below: one row per
parameter kind, read left to right for HF -> JAX and right to left for JAX -> HF. Every key that
no row maps, every parameter left unfilled and every shape that disagrees is collected and
reported in one error line (each kind counted, its first few named).

HF names come in two schemes, both accepted: the published one (`visual.*`, `model.layers.*`,
`lm_head.*`) and transformers 5's (`model.visual.*`, `model.language_model.*`).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from qwen2vl_jax.errors import CheckpointError, listing

# Transforms: how an HF tensor becomes the JAX array (and back).
#   copy    same layout (norms, biases, embeddings)
#   linear  torch Linear [out, in] <-> Dense kernel [in, out]
#   conv    Conv3d [out, C, T, P, P] <-> Dense kernel [C*T*P*P, out]
# (HF template, JAX template, transform); {i} is a layer index.
TABLE: list[tuple[str, str, str]] = [
    ("visual.patch_embed.proj.weight", "visual/patch_embed/proj/kernel", "conv"),
    ("visual.blocks.{i}.norm1.weight", "visual/blocks_{i}/norm1/scale", "copy"),
    ("visual.blocks.{i}.norm1.bias", "visual/blocks_{i}/norm1/bias", "copy"),
    ("visual.blocks.{i}.norm2.weight", "visual/blocks_{i}/norm2/scale", "copy"),
    ("visual.blocks.{i}.norm2.bias", "visual/blocks_{i}/norm2/bias", "copy"),
    ("visual.blocks.{i}.attn.qkv.weight", "visual/blocks_{i}/attn/qkv/kernel", "linear"),
    ("visual.blocks.{i}.attn.qkv.bias", "visual/blocks_{i}/attn/qkv/bias", "copy"),
    ("visual.blocks.{i}.attn.proj.weight", "visual/blocks_{i}/attn/proj/kernel", "linear"),
    ("visual.blocks.{i}.attn.proj.bias", "visual/blocks_{i}/attn/proj/bias", "copy"),
    ("visual.blocks.{i}.mlp.fc1.weight", "visual/blocks_{i}/mlp/fc1/kernel", "linear"),
    ("visual.blocks.{i}.mlp.fc1.bias", "visual/blocks_{i}/mlp/fc1/bias", "copy"),
    ("visual.blocks.{i}.mlp.fc2.weight", "visual/blocks_{i}/mlp/fc2/kernel", "linear"),
    ("visual.blocks.{i}.mlp.fc2.bias", "visual/blocks_{i}/mlp/fc2/bias", "copy"),
    ("visual.merger.ln_q.weight", "visual/merger/ln_q/scale", "copy"),
    ("visual.merger.ln_q.bias", "visual/merger/ln_q/bias", "copy"),
    ("visual.merger.mlp.0.weight", "visual/merger/mlp_0/kernel", "linear"),
    ("visual.merger.mlp.0.bias", "visual/merger/mlp_0/bias", "copy"),
    ("visual.merger.mlp.2.weight", "visual/merger/mlp_2/kernel", "linear"),
    ("visual.merger.mlp.2.bias", "visual/merger/mlp_2/bias", "copy"),
    ("model.embed_tokens.weight", "model/embed_tokens/embedding", "copy"),
    ("model.layers.{i}.input_layernorm.weight", "model/layers_{i}/input_layernorm/scale", "copy"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model/layers_{i}/post_attention_layernorm/scale", "copy"),
    ("model.layers.{i}.self_attn.q_proj.weight", "model/layers_{i}/self_attn/q_proj/kernel", "linear"),
    ("model.layers.{i}.self_attn.q_proj.bias", "model/layers_{i}/self_attn/q_proj/bias", "copy"),
    ("model.layers.{i}.self_attn.k_proj.weight", "model/layers_{i}/self_attn/k_proj/kernel", "linear"),
    ("model.layers.{i}.self_attn.k_proj.bias", "model/layers_{i}/self_attn/k_proj/bias", "copy"),
    ("model.layers.{i}.self_attn.v_proj.weight", "model/layers_{i}/self_attn/v_proj/kernel", "linear"),
    ("model.layers.{i}.self_attn.v_proj.bias", "model/layers_{i}/self_attn/v_proj/bias", "copy"),
    ("model.layers.{i}.self_attn.o_proj.weight", "model/layers_{i}/self_attn/o_proj/kernel", "linear"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model/layers_{i}/mlp/gate_proj/kernel", "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", "model/layers_{i}/mlp/up_proj/kernel", "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", "model/layers_{i}/mlp/down_proj/kernel", "linear"),
    ("model.norm.weight", "model/norm/scale", "copy"),
    ("lm_head.weight", "lm_head/kernel", "linear"),
]

# transformers 5 prefixes -> the published ones.
_SCHEME_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))

# Weights HF keeps but that carry no information (rotary tables and the like).
_IGNORED_HF = re.compile(r".*(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq)$")


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_HF_RULES = [(_compile(hf), jx, tf) for hf, jx, tf in TABLE]
_JAX_RULES = [(_compile(jx), hf, tf) for hf, jx, tf in TABLE]


def normalize_hf_name(name: str) -> str:
    """Either HF naming scheme -> the published one."""
    for new, old in _SCHEME_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def hf_to_jax_name(name: str) -> tuple[str, str] | None:
    """HF tensor name -> (JAX path, transform), or None if no row maps it."""
    name = normalize_hf_name(name)
    for pattern, template, transform in _HF_RULES:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict()), transform
    return None


def jax_to_hf_name(path: str) -> tuple[str, str]:
    """JAX path -> (published HF name, transform)."""
    for pattern, template, transform in _JAX_RULES:
        m = pattern.match(path)
        if m:
            return template.format(**m.groupdict()), transform
    raise CheckpointError(f"no HF name for parameter {path}")


def to_jax(array: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """Applies an HF -> JAX transform; `shape` is the JAX shape (needed to flatten convs)."""
    if transform == "linear":
        return array.T if array.ndim == 2 else array
    if transform == "conv":
        return array.reshape(array.shape[0], -1).T
    return array


def to_hf(array: np.ndarray, transform: str, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Applies a JAX -> HF transform; convs need the HF shape (out, C, T, P, P) to unflatten."""
    if transform == "linear":
        return array.T
    if transform == "conv":
        out = array.T
        return out.reshape(hf_shape) if hf_shape is not None else out
    return array


def expected_hf_shape(transform: str, jax_shape: tuple[int, ...], conv_shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == "linear":
        return tuple(reversed(jax_shape))
    if transform == "conv":
        return conv_shape
    return tuple(jax_shape)


class Planned(NamedTuple):
    """One checked HF tensor: where it goes and how to get it there."""

    path: str  # JAX path
    hf_name: str
    transform: str
    load: Callable[[], np.ndarray]
    shape: tuple[int, ...]  # JAX shape


def plan_conversion(
    tensors: Iterable[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]],
    expected: dict[str, tuple[int, ...]],
    *,
    tie_word_embeddings: bool,
    mismatched: Iterable[str] = (),
) -> list[Planned]:
    """Checks HF tensor names and shapes against the expected JAX parameters, loading nothing.

    tensors: (hf_name, load() -> array, hf_shape) triples, e.g. from `list_tensors`.
    expected: JAX path -> shape, from `jax.eval_shape` of the model's init.
    mismatched: shape problems a caller already found (gptq.fold's), reported with the rest.
    Returns one `Planned` per expected parameter, in `expected`'s order. Raises one
    CheckpointError for all the unmapped tensors, missing parameters and shape mismatches at
    once: each kind counted and its first few named.
    """
    unmapped, mismatched, plan = [], list(mismatched), {}
    seen: dict[str, str] = {}
    for hf_name, load, hf_shape in tensors:
        if _IGNORED_HF.match(hf_name):
            continue
        mapped = hf_to_jax_name(hf_name)
        if mapped is None:
            unmapped.append(hf_name)
            continue
        path, transform = mapped
        if path == "lm_head/kernel" and tie_word_embeddings:
            continue  # tied: the embedding serves as the output layer
        if path not in expected:
            unmapped.append(hf_name)
            continue
        if path in seen:
            mismatched.append(f"{hf_name}: duplicate of {seen[path]}")
            continue
        seen[path] = hf_name
        want_jax = tuple(expected[path])
        if transform == "conv":
            ok = len(hf_shape) >= 2 and hf_shape[0] == want_jax[1] and int(np.prod(hf_shape[1:])) == want_jax[0]
            want_hf = f"({want_jax[1]}, {want_jax[0]} values per patch)"
        else:
            want_hf = expected_hf_shape(transform, want_jax, ())
            ok = tuple(hf_shape) == want_hf
        if not ok:
            mismatched.append(f"{hf_name}: checkpoint shape {tuple(hf_shape)}, config expects {want_hf}")
            continue
        plan[path] = Planned(path, hf_name, transform, load, want_jax)
    missing = [p for p in expected if p not in seen]
    kinds = [(f"{len(unmapped)} unmapped tensor(s)", sorted(unmapped), ", "),
             (f"{len(missing)} parameter(s) missing from the checkpoint", sorted(missing), ", "),
             (f"{len(mismatched)} shape mismatch(es)", mismatched, "; ")]
    kinds = [k for k in kinds if k[1]]
    # the first 3, 2 or 1 of each kind: the line stays near 300 characters
    limit, width = {1: (4, 200), 2: (3, 110)}.get(len(kinds), (2, 100))
    problems = [f"{what}: {listing(items, limit, sep=sep, width=width)}" for what, items, sep in kinds]
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + " | ".join(problems))
    return [plan[p] for p in expected]


def load_planned(item: Planned) -> np.ndarray:
    """Reads one planned tensor and puts it in the JAX layout (a contiguous copy)."""
    return np.ascontiguousarray(to_jax(item.load(), item.transform, item.shape))


def convert_tensors(
    tensors: Iterable[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]],
    expected: dict[str, tuple[int, ...]],
    *,
    tie_word_embeddings: bool,
    cast: Callable[[np.ndarray], object] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Maps HF tensors onto the expected JAX parameter paths, all held in memory.

    See `plan_conversion`; shapes are checked before any tensor is loaded, so a mismatched
    checkpoint costs no I/O. Returns {jax_path: cast(array)}.
    """
    out = {}
    for item in plan_conversion(tensors, expected, tie_word_embeddings=tie_word_embeddings):
        array = load_planned(item)
        out[item.path] = cast(array) if cast is not None else array
        if on_tensor is not None:
            on_tensor(item.path)
    return out


def iter_jax_to_hf(flat_params: dict[str, object], conv_shape: tuple[int, ...]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every JAX parameter, in the published naming."""
    for path, leaf in flat_params.items():
        name, transform = jax_to_hf_name(path)
        yield name, to_hf(np.asarray(leaf), transform, conv_shape if transform == "conv" else None)
