"""Reference helpers: tiny random HF Qwen2-VL models and hand-built multimodal inputs.

Weights are re-drawn with scales near 1/sqrt(fan_in) (HF's default init, std 0.02, leaves
logits so small that a wrong transpose or rotary could hide under the tolerance).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from qwen2vl_jax.config import TINY, Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_jax.safetensors_io import list_tensors, save_file

IMG, VID, VSTART, VEND = 201, 202, 203, 204
PAD = 0

# ------------------------------------------------------------------ reference assets
# Tests that need the real Qwen2-VL tokenizer or configs read them from one folder:
# $QWEN2VL_REFERENCE_ASSETS, else ../shared/assets beside the repository. The folder is either
# a copy of shared/assets as it is laid out (qwen2-vl-7b-instruct/, qwen2-vl-2b/,
# tokenizer-vectors/) or any downloaded Qwen2-VL checkpoint folder (tokenizer.json,
# config.json ...): then the tests that need a tokenizer use it, and those that need the golden
# vectors or a particular release's files skip. Use reference_folder(kind) to get a folder.
REFERENCE_ENV = "QWEN2VL_REFERENCE_ASSETS"
DEFAULT_REFERENCE_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
# kind -> (what it is, the subfolder of the shared/assets layout, files it must hold)
REFERENCE_KINDS = {
    "tokenizer": ("a Qwen2-VL-Instruct tokenizer (tokenizer.json, tokenizer_config.json, chat template, "
                  "preprocessor_config.json)", "qwen2-vl-7b-instruct", ("tokenizer.json", "tokenizer_config.json")),
    "vocab-merges": ("a Qwen2 vocab.json + merges.txt", "qwen2-vl-2b", ("vocab.json", "merges.txt")),
    "qwen2-vl-7b-instruct": ("the Qwen2-VL-7B-Instruct files of shared/assets", "qwen2-vl-7b-instruct", ("config.json",)),
    "qwen2-vl-2b": ("the Qwen2-VL-2B (base) files of shared/assets", "qwen2-vl-2b", ("config.json",)),
    "tokenizer-vectors": ("the Qwen2 tokenizer golden vectors of shared/assets", "tokenizer-vectors",
                          ("ggml-vocab-qwen2.gguf.inp", "ggml-vocab-qwen2.gguf.out")),
}
# The kinds a single downloaded checkpoint folder can serve (the folder itself).
CHECKPOINT_KINDS = ("tokenizer", "vocab-merges")


def reference_root() -> Path:
    """$QWEN2VL_REFERENCE_ASSETS if set (and not empty), else ../shared/assets beside the repo."""
    env = os.environ.get(REFERENCE_ENV, "").strip()
    return Path(env).expanduser() if env else DEFAULT_REFERENCE_ASSETS


def find_reference(kind: str) -> tuple[Path | None, str]:
    """(folder, "") for a kind of reference asset, or (None, why it is not available)."""
    what, sub, needs = REFERENCE_KINDS[kind]
    root = reference_root()
    source = f"{REFERENCE_ENV}={root}" if os.environ.get(REFERENCE_ENV, "").strip() else \
        f"{root} (the default; set {REFERENCE_ENV} to point elsewhere)"
    hint = f"set {REFERENCE_ENV} to a copy of shared/assets or to a downloaded Qwen2-VL checkpoint folder"
    if not root.is_dir():
        return None, f"reference assets not found: {source} is no folder; {hint}"
    layout = any((root / s).is_dir() for _, s, _ in REFERENCE_KINDS.values())
    if layout:
        folder = root / sub
    elif kind in CHECKPOINT_KINDS:
        folder = root
    else:
        return None, (f"{what} are needed: {source} is a checkpoint folder, not a copy of shared/assets "
                      f"(set {REFERENCE_ENV} to one to run this test)")
    missing = [n for n in needs if not (folder / n).is_file()]
    if missing:
        return None, f"{what} not found: {folder} lacks {', '.join(missing)} ({source}); {hint}"
    return folder, ""


def reference_folder(kind: str) -> Path:
    """The folder holding `kind` (a key of REFERENCE_KINDS), or pytest.skip naming the variable."""
    folder, why = find_reference(kind)
    if folder is None:
        import pytest

        pytest.skip(why)
    return folder


# Kept for the tests that join subfolder names to it: the reference root (a folder that may be a
# checkpoint folder or may not exist; prefer reference_folder(kind)).
SHARED_ASSETS = reference_root()


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Odd/prime widths so a transposed weight cannot pass by accident."""

    seed: int = 0
    tie: bool = False
    mrope_section: tuple[int, int, int] = (2, 1, 2)
    hidden: int = 60
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 97
    layers: int = 2
    vocab: int = 211
    v_embed: int = 36
    v_heads: int = 3
    v_depth: int = 2
    v_mlp_ratio: int = 3


SPECS = {
    "untied": TinySpec(),
    "tied": TinySpec(seed=1, tie=True, mrope_section=(1, 2, 3), hidden=48, heads=4, kv_heads=1,
                     intermediate=67, v_embed=40, v_heads=2, v_mlp_ratio=2),
    "seed2": TinySpec(seed=2, mrope_section=(3, 4, 4), hidden=44, heads=2, kv_heads=1, intermediate=53,
                      layers=3, v_embed=24, v_heads=2, v_depth=3, v_mlp_ratio=4),
}

# ------------------------------------------------------------------ the registry of tiny configs
# Every tiny model config the tests use, by name. SPECS (above) are the HF-side specs the
# session fixtures build and save (test_model_parity runs each one, so add there only what
# every parity test should run); the rest live here.

# test_gptq: widths that pack 8 (or 4) values per int32: hidden 48, kv width 2 * 12 = 24,
# intermediate 88; q/o are square but k/v/gate/up/down are not.
GPTQ_SPECS = {
    "untied": TinySpec(seed=3, mrope_section=(1, 2, 3), hidden=48, heads=4, kv_heads=2, intermediate=88),
    "tied": TinySpec(seed=4, tie=True, mrope_section=(2, 2, 2), hidden=48, heads=4, kv_heads=2,
                     intermediate=88, v_embed=40, v_heads=2, v_mlp_ratio=2),
}


def spec_config(spec: TinySpec) -> Qwen2VLConfig:
    """Our config for a TinySpec: what Qwen2VLConfig.from_hf reads from hf_config(spec)."""
    return Qwen2VLConfig(
        vision=VisionConfig(depth=spec.v_depth, embed_dim=spec.v_embed, num_heads=spec.v_heads,
                            mlp_ratio=float(spec.v_mlp_ratio), out_hidden_size=spec.hidden),
        text=TextConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                        num_key_value_heads=spec.kv_heads, rms_norm_eps=1e-6, rope_theta=10000.0,
                        mrope_section=spec.mrope_section, max_position_embeddings=4096),
        tie_word_embeddings=spec.tie, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, bos_token_id=205, eos_token_id=206,
    )


def _placeholder_ids() -> dict:
    """The token ids of the tiny vocabularies (the same as the IMG/VID/VSTART/VEND rows use)."""
    return dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
                bos_token_id=205, eos_token_id=206)


TINY_CONFIGS: dict[str, Qwen2VLConfig] = {
    # the HF-side specs, as our config reads them
    **{name: spec_config(spec) for name, spec in SPECS.items()},
    **{f"gptq_{name}": spec_config(spec) for name, spec in GPTQ_SPECS.items()},
    # the package's own tiny preset (qwen2vl_jax.config.TINY)
    "tiny": TINY,
    # test_sharding: heads, KV heads and widths that tensor=4 divides
    "sharded": Qwen2VLConfig(
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0, out_hidden_size=64),
        text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, mrope_section=(1, 1, 2),
                        rope_theta=10000.0, max_position_embeddings=4096),
        **_placeholder_ids(),
    ),
    # test_sharding: 2 KV heads, which tensor=4 does not divide (refused)
    "indivisible_heads": Qwen2VLConfig(
        text=TextConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=6, num_key_value_heads=2, mrope_section=(1, 1, 2)),
        vision=VisionConfig(depth=1, embed_dim=32, num_heads=4, mlp_ratio=2.0, out_hidden_size=48),
    ),
    # test_gpu: head width 64 (what cuDNN's fused attention takes)
    "gpu": Qwen2VLConfig(
        vision=VisionConfig(depth=2, embed_dim=128, num_heads=2, mlp_ratio=2, out_hidden_size=256),
        text=TextConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 12, 12),
                        max_position_embeddings=4096),
        **_placeholder_ids(),
    ),
    # test_generation's real_vocab_model: the real Qwen2-VL vocabulary and token ids, tiny widths
    # (the HF model: transformers.Qwen2VLConfig(**TINY_CONFIGS["real_vocab"].to_hf()))
    "real_vocab": Qwen2VLConfig(
        vision=VisionConfig(depth=1, embed_dim=16, num_heads=2, mlp_ratio=2, out_hidden_size=16),
        text=TextConfig(vocab_size=151936, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, mrope_section=(1, 1, 2),
                        rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768),  # HF's default eps
        tie_word_embeddings=True,
    ),
}

# Widths for qwen2vl_jax.train.demo.init_folder(folder, seed, vocab=..., **DEMO_WIDTHS[name]),
# whose vocabulary and token ids come from the tokenizer it trains (no full config here).
DEMO_WIDTHS = {
    # test_train's tiny_folder
    "small": dict(vision=dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2.0),
                  text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, mrope_section=(2, 3, 3))),
}


def hf_config(spec: TinySpec):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=205, eos_token_id=206,
            pad_token_id=PAD, tie_word_embeddings=spec.tie,
            rope_parameters={"rope_type": "default", "mrope_section": list(spec.mrope_section), "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=spec.v_depth, embed_dim=spec.v_embed, num_heads=spec.v_heads, mlp_ratio=spec.v_mlp_ratio,
            hidden_size=spec.hidden, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=spec.tie,
    )


def build_hf_model(spec: TinySpec):
    """A random fp32 HF Qwen2VLForConditionalGeneration in eval mode."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(hf_config(spec)).eval()
    gen = torch.Generator().manual_seed(spec.seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q.weight" in name \
                    or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:])) if "embed_tokens" not in name else 1
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    return model


def save_hf_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ inputs
def pixels_for(grids, seed: int) -> np.ndarray:
    n = int(sum(t * h * w for t, h, w in grids))
    return np.random.RandomState(seed).randn(n, 1176).astype(np.float32)


def vision_tokens(grid) -> list[int]:
    t, h, w = grid
    return [t * h * w // 4]


def row(*parts) -> list[int]:
    """parts: ints (text tokens) or ('img', grid) / ('vid', grid) -> token ids."""
    out = []
    for p in parts:
        if isinstance(p, tuple):
            kind, (t, h, w) = p
            out += [VSTART] + [IMG if kind == "img" else VID] * (t * h * w // 4) + [VEND]
        else:
            out.append(int(p))
    return out


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def mm_token_type_ids(ids: np.ndarray) -> np.ndarray:
    return (ids == IMG).astype(np.int64) + 2 * (ids == VID).astype(np.int64)


@dataclasses.dataclass
class Case:
    """One multimodal batch in the HF processor's key layout (numpy)."""

    name: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    image_grid_thw: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    pixel_values: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None

    def inputs(self) -> dict:
        d = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        for k in ("image_grid_thw", "video_grid_thw", "pixel_values", "pixel_values_videos"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    def torch_inputs(self) -> dict:
        import torch

        d = {k: torch.tensor(v) for k, v in self.inputs().items()}
        d["mm_token_type_ids"] = torch.tensor(mm_token_type_ids(self.input_ids))
        return d


def make_case(name: str, rows: list[list], image_grids=(), video_grids=(), seed: int = 0) -> Case:
    ids, mask = left_pad([row(*r) for r in rows])
    ig = np.array(image_grids, np.int64).reshape(-1, 3) if image_grids else None
    vg = np.array(video_grids, np.int64).reshape(-1, 3) if video_grids else None
    return Case(
        name, ids, mask, ig, vg,
        pixels_for(image_grids, seed) if image_grids else None,
        pixels_for(video_grids, seed + 1) if video_grids else None,
    )


def standard_cases() -> list[Case]:
    """The cases every parity test runs: text, images, video, mixed, left-padded batch."""
    g1, g2, g3 = (1, 4, 6), (1, 6, 4), (1, 2, 2)
    v1 = (2, 4, 4)  # 4 frames
    return [
        make_case("text", [[5, 9, 17, 33, 2, 8, 100]]),
        make_case("one_image", [[5, 6, ("img", g1), 7, 8, 9]], [g1], seed=1),
        make_case("two_images", [[5, ("img", g1), 11, ("img", g2), 12, ("img", g3), 13]], [g1, g2, g3], seed=2),
        make_case("video", [[5, 6, ("vid", v1), 7, 8]], video_grids=[v1], seed=3),
        make_case("image_video", [[5, ("vid", v1), 6, ("img", g2), 7]], [g2], [v1], seed=4),
        make_case(
            "left_padded_batch",
            [[5, ("img", g1), 7, 8, 9, 10, 11, 12], [3, 4, ("vid", v1), 6, ("img", g3), 2]],
            [g1, g3], [v1], seed=5,
        ),
    ]


# ---------------------------------------------------------------- HF folders from tensors
def read_all(folder: Path) -> dict[str, np.ndarray]:
    return {name: load() for name, load, _ in list_tensors(folder)}


def to_tf5_name(name: str) -> str:
    """Published name -> transformers 5's (model.visual.*, model.language_model.*)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def write_folder(folder: Path, tensors: dict[str, np.ndarray], config: dict, shards: int = 1) -> Path:
    """An HF folder from tensors, with `shards` files (+ index when more than one)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    add_side_files(folder)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", {"format": "pt"})
        return folder
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in part}, folder / fname, {"format": "pt"})
        weight_map.update({names[j]: fname for j in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


SIDE = {"tokenizer_config.json": '{"model_max_length": 4096}', "chat_template.jinja": "{{ messages }}",
        "preprocessor_config.json": '{"patch_size": 14}', "LICENSE": "Apache-2.0"}


def add_side_files(folder: Path) -> Path:
    for name, text in SIDE.items():
        (folder / name).write_text(text)
    return folder


# fp32 logits of ours against HF on these tiny models differ by at most ~1.3e-6 of the largest
# logit (summation order); a wrong RMSNorm eps (1e-5 for 1e-6) already shows as ~1e-5.
LOGITS_RTOL = 5e-6


def assert_logits_close(mine: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None,
                        rtol: float = LOGITS_RTOL) -> None:
    """max |mine - ref| over the real (mask) positions <= rtol * max |ref| there."""
    assert mine.shape == ref.shape, (mine.shape, ref.shape)
    if mask is not None:
        real = mask.astype(bool)
        mine, ref = mine[real], ref[real]
    err, scale = float(np.abs(mine - ref).max()), float(np.abs(ref).max())
    assert err <= rtol * scale, f"max |ours - HF| = {err:.3e}, over {rtol:g} x the largest logit {scale:.3f}"


def assert_same_model(model, reference, inputs: dict, new_tokens: int, atol: float = 2e-5) -> None:
    """Two of our models that lay out the same weights differently (scanned, fused, ...): logits
    within atol (fp32 summation order) and the same greedy tokens."""
    np.testing.assert_allclose(model.logits(**inputs), reference.logits(**inputs), rtol=0, atol=atol)
    np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=new_tokens),
                                  reference.generate(**inputs, max_new_tokens=new_tokens))
