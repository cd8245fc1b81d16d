"""The incremental detokenizer (processing.detokenize): token by token it gives exactly what one
decode of the kept tokens gives, never half a character, and keeps the grounding markers."""

from __future__ import annotations

import random

import pytest

from qwen2vl_jax.config import DEMO_DIR
from qwen2vl_jax.processing.detokenize import GROUNDING_TOKENS, Detokenizer, skipped_ids
from qwen2vl_jax.processing.tokenizer import Qwen2Tokenizer

TEXTS = ["plain words, then numbers 12345 and symbols {}[]", "naïve café — 東京タワー 🙂🚀 ok",
         "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|> there",
         "a<|quad_start|>(1,2),(3,4),(5,6),(7,8)<|quad_end|>b", "line\nbreaks\r\n\ttabs  "]


@pytest.fixture(scope="module", params=["demo", "reference"])
def tokenizer(request):
    if request.param == "demo":
        return Qwen2Tokenizer.from_pretrained(DEMO_DIR)
    from hf_utils import reference_folder

    return Qwen2Tokenizer.from_pretrained(reference_folder("tokenizer"))


def _stream(tokenizer, ids, **kw):
    d = Detokenizer(tokenizer, **kw)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == d.text
    return d, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_one_decode(tokenizer, text):
    im_end, eot = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    ids = tokenizer.encode(text) + [im_end, eot]
    d, pieces = _stream(tokenizer, ids)
    kept = [i for i in ids if i not in skipped_ids(tokenizer)]
    assert d.text == tokenizer.decode(kept) == text  # control tokens go, grounding markers stay
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    plain, _ = _stream(tokenizer, ids, keep_grounding=False)
    assert plain.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_random_tokens_match_a_whole_decode(tokenizer):
    """Any id sequence, including ones that split characters and never complete them."""
    rng = random.Random(0)
    n = min(tokenizer.vocab_size, 152_000)
    for _ in range(30):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 40))]
        d, _ = _stream(tokenizer, ids)
        assert d.text == tokenizer.decode([i for i in ids if i not in skipped_ids(tokenizer)])


def test_grounding_markers_are_whole_tokens(tokenizer):
    for t in GROUNDING_TOKENS:
        ids = tokenizer.encode(t)
        assert len(ids) == 1 and tokenizer.id_to_token(ids[0]) == t
