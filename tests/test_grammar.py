"""serving.grammar: JSON schema / json_object grammars as token bitmasks over the real Qwen2
tokenizer, driven by a random model; EOS forced once complete; bounded whitespace; bad schemas."""

from __future__ import annotations

import json

import numpy as np
import pytest

import constrained
from qwen2vl_jax.errors import InputError

pytest.importorskip("llguidance", reason="structured output needs llguidance (the serve extra)")

from qwen2vl_jax.serving.grammar import allowed, fill_rows, response_format_spec  # noqa: E402

# Every value bounded: a random model must finish it within a bounded number of tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 6}]},
    },
    "required": ["name", "age", "kind", "ok", "tags", "home"],
    "additionalProperties": False,
}
SPEC = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
# Tokens a reply under SCHEMA can take at most: the keys and punctuation, plus one token per
# character of every bounded string at worst.
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def engine():
    return constrained.grammars()


def _valid(obj, schema) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(obj, schema)


@pytest.mark.parametrize("seed,sample", [(0, False), (1, False), (2, False), (3, True), (4, True), (5, True)])
def test_json_schema_random_model(engine, seed, sample):
    tok, grammars = engine
    grammar = grammars.compile(SPEC)
    tokens, ended = constrained.generate(grammars, grammar.matcher(), np.random.default_rng(seed), MAX_TOKENS, sample)
    assert ended, f"no EOS within {MAX_TOKENS} tokens: {tok.decode(tokens)!r}"
    text = tok.decode(tokens)
    obj = json.loads(text)
    _valid(obj, SCHEMA)
    if "\\" not in text:  # no escapes to spell differently: the text is json.dumps' own spelling
        assert text == json.dumps(obj, ensure_ascii=False), "whitespace beyond the fixed separators"


def test_json_object_random_model(engine):
    tok, grammars = engine
    grammar = grammars.compile({"type": "json_object"})
    bias = constrained.json_bias(tok, grammars.vocab_size)
    sizes = []
    for seed in range(6):
        tokens, ended = constrained.generate(grammars, grammar.matcher(), np.random.default_rng(seed), 800,
                                             sample=seed % 2 == 1, bias=bias)
        assert ended
        obj = json.loads(tok.decode(tokens))
        assert isinstance(obj, dict)
        sizes.append(len(obj))
    assert max(sizes) > 0, "only empty objects: the random model never explored"


def test_first_token_must_open_an_object(engine):
    tok, grammars = engine
    matcher = grammars.compile({"type": "json_object"}).matcher()
    words = np.zeros(grammars.mask_words, np.int32)
    matcher.fill(words)
    ids = np.flatnonzero(allowed(words, grammars.vocab_size))
    assert len(ids) > 0
    assert all(tok.decode([int(i)]).startswith("{") for i in ids)
    assert not set(ids) & set(grammars.eos_ids)
    assert not matcher.accept(tok.encode("[")[0])
    assert matcher.failed and matcher.finished
    matcher.fill(words)  # a failed row is only let end
    assert set(np.flatnonzero(allowed(words, grammars.vocab_size))) == set(grammars.eos_ids)


def test_eos_forced_once_complete(engine):
    tok, grammars = engine
    spec = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"enum": [1, 12]}}, "required": ["n"], "additionalProperties": False}}}
    matcher = grammars.compile(spec).matcher()
    words = np.zeros(grammars.mask_words, np.int32)
    for token in tok.encode('{"n": 1'):
        matcher.fill(words)
        ok = allowed(words, grammars.vocab_size)
        assert ok[token] and not ok[list(grammars.eos_ids)].any()
        assert matcher.accept(token) and not matcher.finished
    matcher.fill(words)
    assert not allowed(words, grammars.vocab_size)[list(grammars.eos_ids)].any()  # '{"n": 1' is not done
    for token in tok.encode("}"):
        assert matcher.accept(token)
    assert matcher.finished
    matcher.fill(words)
    assert set(np.flatnonzero(allowed(words, grammars.vocab_size))) == set(grammars.eos_ids)
    assert matcher.accept(grammars.eos_ids[0])


def test_mask_never_allows_ids_past_the_tokenizer_or_specials(engine):
    tok, grammars = engine
    specials = {tok.token_to_id(t) for t in ("<|im_start|>", "<|image_pad|>", "<|vision_start|>", "<|video_pad|>")}
    matcher = grammars.compile(SPEC).matcher()
    rng = np.random.default_rng(7)
    words = np.zeros(grammars.mask_words, np.int32)
    for _ in range(MAX_TOKENS):
        matcher.fill(words)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        assert not bits[tok.vocab_size:].any()  # the model's padded ids, and the last word's spare bits
        ids = set(np.flatnonzero(bits))
        assert not ids & specials
        logits = rng.standard_normal(grammars.vocab_size)
        logits[~bits[:grammars.vocab_size]] = -np.inf
        token = int(np.argmax(logits))
        assert matcher.accept(token)
        if token in grammars.eos_ids:
            break
    assert matcher.finished


def test_fill_rows_matches_fill(engine):
    tok, grammars = engine
    a = grammars.compile(SPEC).matcher()
    b = grammars.compile({"type": "json_object"}).matcher()
    for token in tok.encode('{"name": "x'):
        assert a.accept(token)
    batch = np.full((3, grammars.mask_words), 7, np.int32)
    fill_rows([(a, 2), (b, 0)], batch)
    one = np.zeros(grammars.mask_words, np.int32)
    a.fill(one)
    np.testing.assert_array_equal(batch[2], one)
    b.fill(one)
    np.testing.assert_array_equal(batch[0], one)
    assert (batch[1] == 7).all()
    with pytest.raises(ValueError):
        a.fill(np.zeros(grammars.mask_words, np.int64))
    with pytest.raises(ValueError, match="rows of"):
        fill_rows([(a, 0)], np.zeros((1, grammars.mask_words + 1), np.int32))


def test_copy_is_independent(engine):
    tok, grammars = engine
    a = grammars.compile({"type": "json_object"}).matcher()
    assert a.accept(tok.encode("{")[0])
    b = a.copy()
    assert b.accept(tok.encode("}")[0]) and b.finished
    assert not a.finished


def test_cache_by_canonical_spec_and_bounded(engine):
    tok, grammars = engine
    s1 = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
    s2 = {"json_schema": {"schema": {"properties": {"x": {"type": "integer"}}, "type": "object"}, "name": "a"}, "type": "json_schema"}
    assert grammars.compile(s1) is grammars.compile(s2)
    grammars.cache_size = 2
    try:
        first = grammars.compile(s1)
        grammars.compile({"type": "json_object"})
        assert grammars.compile(s1) is first  # used last: kept
        other = grammars.compile({"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "array"}}})
        assert grammars.cache_info() == {"size": 2, "limit": 2}
        assert grammars.compile(s1) is first  # json_object was the one dropped
        grammars.compile({"type": "json_object"})  # drops the array one (s1 was used after it)
        assert grammars.compile({"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "array"}}}) is not other
    finally:
        grammars.cache_size = 128


@pytest.mark.parametrize("spec,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "foo"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"allOf": [{"type": "string"}, {"type": "integer"}]}}}, "nsatisfiable"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}}, "regex"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "schema"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "yaml"}, "not supported"),
    ({"type": "text"}, "no grammar"),
    ("json", "object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"maximum": float("nan")}}}, "JSON"),
])
def test_bad_specs_raise_input_error(engine, spec, words):
    _, grammars = engine
    with pytest.raises(InputError) as e:
        grammars.compile(spec)
    message = str(e.value)
    assert words in message and "\n" not in message


def test_response_format_spec():
    assert response_format_spec(None) is None
    assert response_format_spec({"type": "text"}) is None
    assert response_format_spec({"type": "json_object"}) == {"type": "json_object"}
    with pytest.raises(InputError):
        response_format_spec("json")
