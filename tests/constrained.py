"""What the grammar and tool-call tests share: the real tokenizer's grammar engine, and a random
"model" that samples under a matcher's mask."""

from __future__ import annotations

import numpy as np

import hf_utils
from qwen2vl_jax.jsonio import read_json

# The 7B-Instruct checkpoint's logits width (its config.json's vocab_size) when the folder has none.
VOCAB_SIZE = 152064


def grammars():
    """Grammars over the real Qwen2-VL tokenizer (skips when the reference assets are missing)."""
    from qwen2vl_jax.processing.tokenizer import Qwen2Tokenizer
    from qwen2vl_jax.serving.grammar import Grammars

    folder = hf_utils.reference_folder("tokenizer")
    tok = Qwen2Tokenizer.from_pretrained(folder)
    vocab = int((read_json(folder / "config.json", missing_ok=True) or {}).get("vocab_size", VOCAB_SIZE))
    return tok, Grammars(tok, vocab)


def json_bias(tokenizer, vocab_size: int, weight: float = 6.0) -> np.ndarray:
    """Logit bias toward short tokens made of JSON punctuation, digits and a few letters: a random
    model so biased closes its strings and objects soon (free JSON has no bound of its own)."""
    bias = np.zeros(vocab_size, np.float32)
    for text, i in tokenizer.backend.get_vocab().items():
        if len(text) <= 3 and set(text) <= set('{}[]":,0123456789abetrufl'):
            bias[i] = weight
    return bias


def generate(grammars, matcher, rng: np.random.Generator, max_tokens: int, sample: bool = False,
             bias: np.ndarray | None = None):
    """Random logits (plus `bias`) masked by the matcher each step, argmax (or sampled); stops at
    an EOS id or after max_tokens. -> (tokens, ended): tokens without the EOS, whether an EOS
    ended them."""
    from qwen2vl_jax.serving.grammar import allowed

    words = np.zeros(grammars.mask_words, np.int32)
    out = []
    for _ in range(max_tokens):
        matcher.fill(words)
        ok = allowed(words, grammars.vocab_size)
        assert ok.any(), "the mask allows nothing"
        logits = rng.standard_normal(grammars.vocab_size) * 3.0
        if bias is not None:
            logits += bias
        logits[~ok] = -np.inf
        if sample:
            p = np.exp(logits - logits.max())
            token = int(rng.choice(grammars.vocab_size, p=p / p.sum()))
        else:
            token = int(np.argmax(logits))
        assert matcher.accept(token), f"token {token} was in the mask but refused"
        if token in grammars.eos_ids:
            assert matcher.finished
            return out, True
        out.append(token)
    return out, False
