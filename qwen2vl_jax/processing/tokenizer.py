"""The Qwen2 byte-level BPE tokenizer, through the `tokenizers` library only.

Reads tokenizer.json when the folder has one; otherwise builds the same pipeline that
transformers' Qwen2Tokenizer builds from vocab.json + merges.txt (NFC, Qwen2's split regex,
byte-level, BPE without dropout) and adds the special tokens listed in
tokenizer_config.json. No BOS is added; the pad token is <|endoftext|>.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import InputError, first_line
from ..jsonio import read_json

# Qwen2's pre-tokenizer split (the same regex its tokenizer.json carries).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL's special tokens and ids (tokenizer_config.json of the published checkpoints).
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def _build_from_vocab(vocab: str, merges: str, added: Sequence[AddedToken]) -> Tokenizer:
    tok = Tokenizer(BPE.from_file(vocab, merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    return tok


def _added_tokens(cfg: dict, where: str | os.PathLike = "tokenizer_config.json") -> list[AddedToken]:
    decoder = cfg.get("added_tokens_decoder")
    if not decoder:
        return [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    if not (isinstance(decoder, dict) and all(isinstance(d, dict) and isinstance(d.get("content"), str)
                                              and str(k).isdigit() for k, d in decoder.items())):
        raise InputError(f"{where}: added_tokens_decoder must map token ids to objects with a 'content' string")
    out = []
    for _, d in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        out.append(
            AddedToken(
                d["content"],
                single_word=d.get("single_word", False),
                lstrip=d.get("lstrip", False),
                rstrip=d.get("rstrip", False),
                normalized=d.get("normalized", False),
                special=d.get("special", True),
            )
        )
    return out


class Qwen2Tokenizer:
    """Text <-> ids. `encode`/`decode` and the special-token ids the rest of the library
    needs (pad, eos, image/video placeholders, vision start/end)."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None):
        self._tok = tokenizer
        cfg = config or {}
        self.config = cfg

        def _tok_name(key, default):
            v = cfg.get(key, default)
            if isinstance(v, dict):
                v = v.get("content")
            return v

        self.pad_token = _tok_name("pad_token", "<|endoftext|>")
        self.eos_token = _tok_name("eos_token", "<|im_end|>")
        self.padding_side = cfg.get("padding_side", "left")
        self.model_max_length = int(cfg.get("model_max_length", 32768))
        self.pad_token_id = self.token_to_id(self.pad_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = self.token_to_id(self.image_token)
        self.video_token_id = self.token_to_id(self.video_token)
        self.vision_start_token_id = self.token_to_id("<|vision_start|>")
        self.vision_end_token_id = self.token_to_id("<|vision_end|>")
        self.im_start_token_id = self.token_to_id("<|im_start|>")
        self.im_end_token_id = self.token_to_id("<|im_end|>")
        self.endoftext_token_id = self.token_to_id("<|endoftext|>")

    @staticmethod
    def present(path: str | os.PathLike) -> bool:
        """Whether `path` holds tokenizer files this class reads."""
        d = Path(path)
        return (d / "tokenizer.json").exists() or ((d / "vocab.json").exists() and (d / "merges.txt").exists())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen2Tokenizer":
        d = Path(path)
        cfg_file = d / "tokenizer_config.json"
        cfg = read_json(cfg_file, missing_ok=True) or {}
        if (d / "tokenizer.json").exists():
            try:
                tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises a bare Exception
                raise InputError(f"{d / 'tokenizer.json'}: cannot read the tokenizer ({first_line(e)})") from None
        elif cls.present(d):
            added = _added_tokens(cfg, cfg_file)
            try:
                tok = _build_from_vocab(str(d / "vocab.json"), str(d / "merges.txt"), added)
            except Exception as e:
                raise InputError(f"{d}: cannot read vocab.json + merges.txt ({first_line(e)})") from None
        else:
            raise InputError(f"{d}: no tokenizer.json, nor vocab.json + merges.txt")
        return cls(tok, cfg)

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise InputError(f"tokenizer has no token {token!r}")
        return i

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def __len__(self) -> int:
        return self.vocab_size
