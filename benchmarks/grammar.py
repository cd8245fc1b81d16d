"""Structured output's host cost per token, one table: llguidance (serving.grammar) and, when it
is installed, xgrammar, on the real Qwen2 tokenizer and the same schemas.

    python benchmarks/grammar.py [--runs 6] [--max-tokens 400]

For each engine: import time (a fresh interpreter's `import`, interpreter start included), tokenizer set-up, and per schema the first compile, a compile of
the same schema again (a new request) and the time to fill one row's bitmask, per token, while
a random model (random logits masked by the bitmask, argmax) writes replies under the schema.
Schemas: `bounded` (strings with maxLength, enums, an array), `free` (the same without
maxLength), `wide` (40 required string-or-integer fields) and `json_object`. Times are wall
clock on this machine, single-threaded per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from common import ASSETS

BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 30},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "kind", "ok"],
    "additionalProperties": False,
}


def _no_max_length(d):
    if isinstance(d, dict):
        return {k: _no_max_length(v) for k, v in d.items() if k != "maxLength"}
    return [_no_max_length(x) for x in d] if isinstance(d, list) else d


SCHEMAS = {
    "bounded": BOUNDED,
    "free": _no_max_length(BOUNDED),
    "wide": {"type": "object", "properties": {f"f{i}": {"type": ["string", "integer"]} for i in range(40)},
             "required": [f"f{i}" for i in range(40)], "additionalProperties": False},
    "json_object": {"type": "object"},
}


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab):
        from qwen2vl_jax.serving.grammar import Grammars

        self.g = Grammars(tok, vocab)
        self.eos = self.g.eos_ids

    def compile(self, schema, fresh):
        spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        if fresh:
            self.g.clear_cache()
        return self.g.compile(spec)

    def start(self, grammar):
        return grammar.matcher(), np.zeros(self.g.mask_words, np.int32)

    def fill(self, state):
        m, words = state
        m.fill(words)
        return words

    def accept(self, state, token):
        return state[0].accept(token)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import xgrammar as xgr

        self.xgr = xgr
        self.eos = (tok.im_end_token_id, tok.endoftext_token_id)
        encoded = [""] * vocab
        for text, i in tok.backend.get_vocab(with_added_tokens=True).items():
            encoded[i] = text
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=list(self.eos))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)

    def compile(self, schema, fresh):
        if fresh:
            self.compiler.clear_cache()
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def start(self, grammar):
        return self.xgr.GrammarMatcher(grammar), self.xgr.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)

    def fill(self, state):
        m, words = state
        m.fill_next_token_bitmask(words)
        return words[0].numpy()

    def accept(self, state, token):
        return state[0].accept_token(token)


def measure(engine_cls, tok, vocab, runs, max_tokens):
    module = "llguidance" if engine_cls is Llguidance else "xgrammar"
    t0 = time.perf_counter()  # in a fresh interpreter: what a server pays at start-up
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    imported = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = engine_cls(tok, vocab)
    setup = time.perf_counter() - t0
    rows = []
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = engine.compile(schema, fresh=True)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.compile(schema, fresh=False)
        again = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        fills, ended = [], 0
        for _ in range(runs):
            state = engine.start(grammar)
            for _ in range(max_tokens):
                t0 = time.perf_counter()
                words = engine.fill(state)
                fills.append(time.perf_counter() - t0)
                ok = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)
                logits = rng.standard_normal(vocab)
                logits[~ok] = -np.inf
                token = int(np.argmax(logits))
                if token in engine.eos:
                    ended += 1
                    break
                assert engine.accept(state, token)
        f = np.array(fills) * 1e6
        rows.append((name, first * 1e3, again * 1e3, f.mean(), np.median(f), np.quantile(f, 0.99), len(f), ended))
    return imported, setup, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=400)
    args = ap.parse_args()
    from qwen2vl_jax.jsonio import read_json
    from qwen2vl_jax.processing.tokenizer import Qwen2Tokenizer

    folder = ASSETS / "qwen2-vl-7b-instruct"
    if not Qwen2Tokenizer.present(folder):
        sys.exit(f"no tokenizer in {folder} (set QWEN2VL_REFERENCE_ASSETS)")
    tok = Qwen2Tokenizer.from_pretrained(folder)
    vocab = int(read_json(folder / "config.json")["vocab_size"])
    engines = [Llguidance]
    try:
        import xgrammar  # noqa: F401

        engines.append(Xgrammar)
    except ImportError:
        print("xgrammar is not installed: its rows are left out")
    print(f"tokenizer {folder.name}, vocab {vocab}, {args.runs} replies per schema, at most {args.max_tokens} tokens each")
    print(f"{'engine':<11} {'schema':<12} {'compile ms':>10} {'again ms':>9} {'fill us mean':>12} {'p50':>6} {'p99':>7} {'tokens':>7} {'ended':>6}")
    for cls in engines:
        imported, setup, rows = measure(cls, tok, vocab, args.runs, args.max_tokens)
        print(f"{cls.name:<11} import {imported:.2f} s, tokenizer set-up {setup:.2f} s")
        for name, first, again, mean, p50, p99, n, ended in rows:
            print(f"{cls.name:<11} {name:<12} {first:>10.1f} {again:>9.2f} {mean:>12.0f} {p50:>6.0f} {p99:>7.0f} {n:>7} {ended:>4}/{args.runs}")


if __name__ == "__main__":
    main()
