"""Model configuration: frozen dataclasses, presets, and reading HF config.json files.

Two config.json layouts exist in the wild and both are read:
- the published (transformers 4.x) one: text fields at the top level, `rope_scaling:
  {type|rope_type: mrope, mrope_section}`, `rope_theta`, and a `vision_config` that may spell
  `in_chans` for `in_channels`;
- transformers 5's nested one: `text_config` (with `rope_parameters`) and `vision_config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qwen2vl_jax.errors import CheckpointError
from qwen2vl_jax.jsonio import read_json


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584  # merger output width = the decoder's hidden size
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: C * T * P * P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int | tuple[int, ...] = 151645

    def __post_init__(self):
        v, t = self.vision, self.text
        problems = []
        if v.embed_dim % v.num_heads:
            problems.append(f"vision embed_dim {v.embed_dim} is not divisible by num_heads {v.num_heads}")
        if v.head_dim % 4:
            problems.append(f"vision head_dim {v.head_dim} must be a multiple of 4 for the 2D rotary embedding")
        if t.hidden_size % t.num_attention_heads:
            problems.append(
                f"hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}"
            )
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(
                f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {t.num_key_value_heads}"
            )
        if sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.out_hidden_size != t.hidden_size:
            problems.append(
                f"vision hidden_size {v.out_hidden_size} differs from the text hidden_size {t.hidden_size}"
            )
        if problems:
            raise CheckpointError("invalid config: " + "; ".join(problems))

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "Qwen2VLConfig":
        """Reads an HF config.json (a path, a folder holding one, or the parsed dict). A file
        that is missing, not a JSON object, or has a field of the wrong type is one
        CheckpointError naming it."""
        if isinstance(source, dict):
            return cls._from_dict(source)
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        raw = read_json(path, error=CheckpointError)
        try:
            return cls._from_dict(raw)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{path}: a field has a bad value ({line[:200]})") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> "Qwen2VLConfig":
        text_raw = dict(raw.get("text_config") or {})
        # Published layout: text fields at the top level. Nested fields win where both exist.
        for key, value in raw.items():
            if key not in ("text_config", "vision_config"):
                text_raw.setdefault(key, value)
        vision_raw = dict(raw.get("vision_config") or {})

        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "mrope"))
        if rope_type not in ("mrope", "default"):
            raise CheckpointError(f"unsupported rope type {rope_type!r} (Qwen2-VL uses mrope)")
        mrope_section = tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24)))
        rope_theta = float(rope.get("rope_theta", text_raw.get("rope_theta", 1_000_000.0)))

        if text_raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported text hidden_act {text_raw['hidden_act']!r} (expected silu)")
        if vision_raw.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise CheckpointError(
                f"unsupported vision hidden_act {vision_raw['hidden_act']!r} (expected quick_gelu)"
            )

        try:
            hidden = int(text_raw["hidden_size"])
            heads = int(text_raw["num_attention_heads"])
            text = TextConfig(
                vocab_size=int(text_raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(text_raw["intermediate_size"]),
                num_hidden_layers=int(text_raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(text_raw.get("num_key_value_heads") or heads),
                rms_norm_eps=float(text_raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                mrope_section=mrope_section,
                max_position_embeddings=int(text_raw.get("max_position_embeddings", 32768)),
            )
            vrope = vision_raw.get("rope_parameters") or {}
            vision = VisionConfig(
                depth=int(vision_raw.get("depth", 32)),
                embed_dim=int(vision_raw.get("embed_dim", 1280)),
                num_heads=int(vision_raw.get("num_heads", 16)),
                mlp_ratio=float(vision_raw.get("mlp_ratio", 4)),
                in_channels=int(vision_raw.get("in_channels", vision_raw.get("in_chans", 3))),
                patch_size=int(vision_raw.get("patch_size", vision_raw.get("spatial_patch_size", 14))),
                temporal_patch_size=int(vision_raw.get("temporal_patch_size", 2)),
                spatial_merge_size=int(vision_raw.get("spatial_merge_size", 2)),
                out_hidden_size=int(vision_raw.get("hidden_size", hidden)),
                rope_theta=float(vrope.get("rope_theta", 10000.0)),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks the field {e.args[0]!r}") from None

        tie = bool(raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False)))
        eos = raw.get("eos_token_id", text_raw.get("eos_token_id", 151645))
        return cls(
            vision=vision,
            text=text,
            tie_word_embeddings=tie,
            image_token_id=int(raw.get("image_token_id", 151655)),
            video_token_id=int(raw.get("video_token_id", 151656)),
            vision_start_token_id=int(raw.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(raw.get("vision_end_token_id", 151653)),
            bos_token_id=int(raw.get("bos_token_id", text_raw.get("bos_token_id", 151643)) or 151643),
            eos_token_id=tuple(eos) if isinstance(eos, list) else int(eos),
        )

    def to_hf(self) -> dict[str, Any]:
        """The published (flat) config.json layout, which every transformers version reads."""
        v, t = self.vision, self.text
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": t.vocab_size,
            "vision_config": {
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
            },
        }


def _preset(hidden, inter, layers, heads, kv_heads, vocab, tie) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        vision=VisionConfig(out_hidden_size=hidden),
        text=TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
        ),
        tie_word_embeddings=tie,
    )


# The released sizes (figures from the official config.json files).
QWEN2_VL_2B = _preset(1536, 8960, 28, 12, 2, 151936, True)
QWEN2_VL_7B = _preset(3584, 18944, 28, 28, 4, 152064, False)
QWEN2_VL_72B = _preset(8192, 29568, 80, 64, 8, 152064, False)

# A tiny model for tests and demos: odd widths so transposed weights cannot pass by accident.
TINY = Qwen2VLConfig(
    vision=VisionConfig(depth=2, embed_dim=40, num_heads=2, mlp_ratio=2.5, out_hidden_size=48),
    text=TextConfig(
        vocab_size=211,
        hidden_size=48,
        intermediate_size=74,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 1, 3),
        max_position_embeddings=4096,
    ),
    image_token_id=201,
    video_token_id=202,
    vision_start_token_id=203,
    vision_end_token_id=204,
    bos_token_id=205,
    eos_token_id=206,
)

# The small model shipped with the package (built by `python -m qwen2vl_jax.train.demo`): what
# the CLIs and the server use when no model is named.
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"

PRESETS = {"2b": QWEN2_VL_2B, "7b": QWEN2_VL_7B, "72b": QWEN2_VL_72B, "tiny": TINY}
