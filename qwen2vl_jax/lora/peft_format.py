"""PEFT's adapter folder, read and written with the names peft uses for Qwen2-VL.

    adapter_config.json         peft's LoraConfig (peft_type LORA, r, lora_alpha, target_modules ...)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight  [r, in]
                                base_model.model.<module>.lora_B.weight  [out, r]

<module> is the torch module's name in `Qwen2VLForConditionalGeneration`: transformers 5
names the decoder `model.language_model.layers.{i}...` and the vision tower `model.visual...`
(what peft writes with it, and what `save_adapter` writes); transformers 4 named them
`model.layers.{i}...` and `visual...`. `load_adapter` reads both. `target_modules` is written as
module-name suffixes (`self_attn.q_proj` for every layer's, `layers.3.self_attn.q_proj` for
one), which peft matches under either naming.

Only plain LoRA is read: DoRA, trained biases, modules_to_save and the like change more than
the low-rank term, and are refused by name.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from qwen2vl_jax.errors import CheckpointError, InputError, listing
from qwen2vl_jax.hf_mapping import TABLE, hf_to_jax_name, jax_to_hf_name
from qwen2vl_jax.jsonio import read_json
from qwen2vl_jax.lora.layer import A, B, SCALE
from qwen2vl_jax.lora.tree import heads, is_linear
from qwen2vl_jax.params import flatten
from qwen2vl_jax.safetensors_io import load_tensor, read_header, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model
BASE_CLASS = "Qwen2VLForConditionalGeneration"
# Settings that make an adapter more than x @ A @ B * scale: refused when set.
_UNSUPPORTED = {"use_dora": (False, None), "lora_bias": (False, None), "bias": ("none", None),
                "modules_to_save": (None, []), "fan_in_fan_out": (False, None), "layer_replication": (None,),
                "target_parameters": (None, []), "trainable_token_indices": (None, {}, []),
                "use_qalora": (False, None), "alora_invocation_tokens": (None, [])}
_PUBLISHED_TO_TF5 = (("visual.", "model.visual."), ("model.", "model.language_model."))


def module_name(head: str) -> str:
    """Our module path -> its torch module's name in transformers 5's Qwen2VLForConditionalGeneration
    (model/layers_3/self_attn/q_proj -> model.language_model.layers.3.self_attn.q_proj)."""
    name = jax_to_hf_name(f"{head}/kernel")[0].removesuffix(".weight")
    for old, new in _PUBLISHED_TO_TF5:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _head_of(module: str) -> str | None:
    """A torch module name (either naming) -> our module path, when it is a linear layer."""
    mapped = hf_to_jax_name(module + ".weight")
    if mapped is None or not is_linear(mapped[0]):
        return None
    return mapped[0].rpartition("/")[0]


def target_modules(adapted: list[str], float_shapes: dict) -> list[str]:
    """peft's target_modules for exactly the modules `adapted` (our module paths): per kind of
    layer, its suffix when every layer of the model has it adapted (`self_attn.q_proj`), else
    one suffix per layer (`layers.3.self_attn.q_proj`); unindexed modules by their own suffix
    (`merger.mlp.0`, `lm_head`). Names without the model prefix match under both namings."""
    present: dict[str, set[str]] = {}  # published template -> layer indices the model has
    chosen: dict[str, set[str]] = {}
    templates = [(re.compile("^" + re.escape(jx.rpartition("/")[0]).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$"),
                  hf.removesuffix(".weight")) for hf, jx, tf in TABLE if tf == "linear"]
    for path in flatten(float_shapes):
        if not is_linear(path):
            continue
        head = path.rpartition("/")[0]
        for pattern, hf in templates:
            m = pattern.match(head)
            if m:
                present.setdefault(hf, set()).add(m.groupdict().get("i") or "")
                if head in adapted:
                    chosen.setdefault(hf, set()).add(m.groupdict().get("i") or "")
                break
    out = []
    for hf, indices in sorted(chosen.items()):
        if "{i}" not in hf:
            out.append(hf.partition(".")[2] if hf.startswith(("visual.", "model.")) else hf)
            continue
        stem, _, rest = hf.partition(".{i}.")
        if indices == present[hf]:
            out.append(rest if rest.count(".") else f"{stem.rpartition('.')[2]}.{rest}")
        else:
            short = stem.rpartition(".")[2]  # layers, blocks
            out += [f"{short}.{i}.{rest}" for i in sorted(indices, key=int)]
    return out


def save_adapter(folder: str | os.PathLike, adapter: dict, float_shapes: dict, *, dropout: float = 0.0,
                 base_model: str | None = None) -> Path:
    """Writes a flat adapter (HF paths, `tree.init_adapter`'s leaves) as PEFT's folder: weights
    in float32, ranks and alphas from the leaves (a module whose rank or alpha differs from the
    most common one goes into rank_pattern / alpha_pattern). -> the folder."""
    folder = Path(folder)
    flat = {p: np.asarray(v) for p, v in flatten(adapter).items()}
    adapted = heads(flat)
    tensors, ranks, alphas = {}, {}, {}
    for head in adapted:
        name = PREFIX + module_name(head)
        a, b = flat[f"{head}/{A}"], flat[f"{head}/{B}"]
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)  # [r, in]
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)  # [out, r]
        r = a.shape[-1]
        ranks[head] = r
        alphas[head] = round(float(flat[f"{head}/{SCALE}"]) * r, 6)
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    short = {h: module_name(h) for h in adapted}
    config = {
        "peft_type": "LORA", "task_type": None, "auto_mapping": {
            "base_model_class": BASE_CLASS, "parent_library": "transformers.models.qwen2_vl.modeling_qwen2_vl"},
        "base_model_name_or_path": base_model, "inference_mode": True,
        "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": float(dropout),
        "target_modules": target_modules(adapted, float_shapes),
        "rank_pattern": {short[h]: v for h, v in ranks.items() if v != r},
        "alpha_pattern": {short[h]: v for h, v in alphas.items() if v != alpha},
        "use_rslora": False, "use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "exclude_modules": None, "layer_replication": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS, {"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the
    module's name (under either naming)."""
    names = (module, module.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1))
    for key, value in patterns.items():
        if any(re.match(rf"(.*\.)?({key})$", n) for n in names):
            return value
    return default


def read_spec(folder: str | os.PathLike) -> tuple[dict, float]:
    """adapter_config.json, checked to be plain LoRA -> (the config, its dropout)."""
    path = Path(folder) / CONFIG
    config = read_json(path, error=CheckpointError)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    odd = [f"{k}={config[k]!r}" for k, ok in _UNSUPPORTED.items() if k in config and config[k] not in ok]
    if odd:
        raise CheckpointError(f"{path}: {', '.join(odd)}: only plain LoRA (x @ A @ B * scale on linear layers) "
                              "is supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise CheckpointError(f"{path}: {key} is {config.get(key)!r}, not a positive number")
    return config, float(config.get("lora_dropout") or 0.0)


def load_adapter(folder: str | os.PathLike, float_shapes: dict) -> dict:
    """A PEFT adapter folder (ours or peft's) -> the flat adapter on HF paths (float32 numpy:
    lora_a [in, r], lora_b [r, out], lora_scale []), checked against the model's float shapes
    (`init_shapes(config)`): every tensor that maps to no linear layer of the model and every
    shape that disagrees is named in one CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"adapter folder {folder} does not exist")
    config, _ = read_spec(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        hint = " (adapter_model.bin is torch's pickle: save it with safe_serialization)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{folder}: no {WEIGHTS}{hint}")
    header, start = read_header(weights)
    shapes = {p: tuple(s.shape) for p, s in flatten(float_shapes).items()}
    parts: dict[str, dict[str, str]] = {}  # head -> {"A"|"B": tensor name}
    modules: dict[str, str] = {}
    unmapped, bad = [], []
    for name in header:
        base = re.match(r"^(?:base_model\.model\.)?(.+)\.base_layer\.weight$", name)
        if base and _head_of(base.group(1)) is not None:
            # peft saves the output head's own weight beside its adapter (in case the vocabulary
            # was resized); the model's weight is used, so it must be the same shape
            n_in, n_out = shapes.get(f"{_head_of(base.group(1))}/kernel", (0, 0))
            if tuple(header[name]["shape"]) == (n_out, n_in):
                continue
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$", name)
        head = _head_of(m.group(1)) if m else None
        if head is None or f"{head}/kernel" not in shapes:
            unmapped.append(name)
            continue
        parts.setdefault(head, {})[m.group(2)] = name
        modules[head] = m.group(1)
    out = {}
    for head, names in sorted(parts.items()):
        if set(names) != {"A", "B"}:
            bad.append(f"{head}: lora_{'B' if 'A' in names else 'A'} is missing")
            continue
        n_in, n_out = shapes[f"{head}/kernel"]
        a_shape, b_shape = tuple(header[names["A"]]["shape"]), tuple(header[names["B"]]["shape"])
        r = a_shape[0] if a_shape else 0
        if len(a_shape) != 2 or a_shape[1] != n_in or b_shape != (n_out, r):
            bad.append(f"{modules[head]}: lora_A {a_shape}, lora_B {b_shape}, the model needs (r, {n_in}), ({n_out}, r)")
            continue
        r = _pattern_value(config.get("rank_pattern") or {}, modules[head], r)
        alpha = _pattern_value(config.get("alpha_pattern") or {}, modules[head], config["lora_alpha"])
        scale = float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)
        out[f"{head}/{A}"] = np.ascontiguousarray(load_tensor(weights, header[names["A"]], start).astype(np.float32).T)
        out[f"{head}/{B}"] = np.ascontiguousarray(load_tensor(weights, header[names["B"]], start).astype(np.float32).T)
        out[f"{head}/{SCALE}"] = np.float32(scale)
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} tensor(s) on no linear layer of the model: {listing(sorted(unmapped), 3)}")
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {listing(bad, 2, sep='; ')}")
    if not out and not problems:
        problems.append("no lora_A/lora_B tensors")
    if problems:
        raise CheckpointError(f"adapter {folder} does not fit the model: " + " | ".join(problems))
    return out

