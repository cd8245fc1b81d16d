"""The Qwen2 tokenizer: golden vectors for both tokenizer layouts (tokenizer.json, and
vocab.json + merges.txt), special tokens, and parity with transformers' Qwen2Tokenizer."""

from __future__ import annotations

import shutil

import pytest

from hf_utils import reference_folder
from media import quiet_transformers
from qwen2vl_jax.processing import Qwen2Tokenizer
from qwen2vl_jax.processing.tokenizer import SPECIAL_TOKENS


def _vectors():
    vectors = reference_folder("tokenizer-vectors")
    texts = (vectors / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (vectors / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")
    # both files end with a separator/newline: drop the empty tail
    texts, ids = texts[:-1], ids[: len(texts) - 1]
    return texts, [[int(v) for v in line.split()] for line in ids]


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab+merges"])
def tok(request, tmp_path_factory):
    if request.param == "tokenizer.json":
        return Qwen2Tokenizer.from_pretrained(reference_folder("tokenizer"))
    # vocab.json + merges.txt alone (a checkpoint folder also holds tokenizer.json, which wins)
    source, folder = reference_folder("vocab-merges"), tmp_path_factory.mktemp("vocab_merges")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return Qwen2Tokenizer.from_pretrained(folder)


def test_golden_vectors(tok):
    texts, expected = _vectors()
    assert len(texts) == len(expected) == 46
    for text, ids in zip(texts, expected):
        assert tok.encode(text) == ids, repr(text)
    assert tok.encode_batch(texts) == expected


def test_special_tokens(tok):
    for token, i in SPECIAL_TOKENS.items():
        assert tok.token_to_id(token) == i
        assert tok.encode(f"a{token}b") == tok.encode("a") + [i] + tok.encode("b")
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645 and tok.padding_side == "left"
    assert (tok.image_token_id, tok.video_token_id) == (151655, 151656)
    assert (tok.vision_start_token_id, tok.vision_end_token_id) == (151652, 151653)
    assert tok.vocab_size == 151657


def test_decode(tok):
    text = "<|im_start|>user\nHallo, Welt! 你好 🦙 ü\t x<|im_end|>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHallo, Welt! 你好 🦙 ü\t x\n"
    assert tok.batch_decode([ids, ids[:3]]) == [text, tok.decode(ids[:3])]


def test_matches_transformers(tok, reference_tokenizer):
    pytest.importorskip("transformers")
    quiet_transformers()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(reference_tokenizer)
    texts = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What's in it?<|im_end|>\n<|im_start|>assistant\n",
        "   leading spaces, trailing   \n\n\n",
        "Ünïcödé NFC: e\u0301 vs \u00e9; numbers 1234567 3.14159",
        "<|box_start|>(10,20),(30,40)<|box_end|><|object_ref_start|>cat<|object_ref_end|>",
        "<|im_end|<|im_end|>>",  # a broken special token stays text
    ]
    for text in texts:
        assert tok.encode(text) == hf(text)["input_ids"], repr(text)
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"])
