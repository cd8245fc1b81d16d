"""Structured output: a grammar per request row, as a token bitmask each step (llguidance).

    grammars = Grammars(tokenizer, vocab_size, eos_ids)   # once per server (~2-4 s)
    grammar = grammars.compile(spec)                      # per request, cached by the spec
    matcher = grammar.matcher()                           # per row
    words = np.zeros(grammars.mask_words, np.int32)       # ceil(vocab_size / 32)
    loop:  matcher.fill(words)            # bit j of word i set: token 32*i + j allowed
           token = sample(logits masked by words)
           if not matcher.accept(token): end the row (cannot happen when sampling within the mask)

`spec` is OpenAI's `response_format` (`response_format_spec` gives None for none or `text`) or a
tool-call spec:
- `{"type": "json_object"}`: any JSON object;
- `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`;
- `{"type": "tool_calls", "tools": [{"name", "parameters"}], "choice": "required" | name,
  "parallel": bool}` (`serving.tools.tool_choice_spec` builds it from `tools`/`tool_choice`).
An unsupported or invalid one raises `InputError` with one line (the server's 400).

The mask is filled before every token the row samples, the one drawn at prefill included, and
every sampled token goes to `accept`. Once the grammar is complete (`finished`) the mask holds
only the EOS ids, so EOS is forced; `accept(eos)` then returns True. Ids the tokenizer does not
have (the model's vocabulary is padded past it) and special tokens other than EOS are never
allowed. A matcher that was given a token outside its mask is in error: its mask is EOS only.

JSON is written with fixed separators (", " between items, ": " after keys) and no other
whitespace, so the whitespace between JSON tokens is bounded and a weak model cannot spin on
it; with bounded values (string lengths, enums, array sizes) every reply ends within a bounded
number of tokens.

Matchers are independent and not thread-safe; `fill_rows` fills many rows' masks at once on
llguidance's thread pool (it releases the GIL): the scheduler fills a step's rows so.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from qwen2vl_jax.errors import InputError, first_line
from qwen2vl_jax.serving import tools as tool_grammar

try:
    import llguidance
except ImportError:  # pragma: no cover - the serve extra installs it
    llguidance = None

# Separators and whitespace of every JSON the grammars produce (see the module docstring);
# ", " and ": " are what json.dumps and Qwen's chat template write.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 128


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's bitmask."""
    return (vocab_size + 31) // 32


def response_format_spec(response_format: Any) -> dict | None:
    """A request's `response_format` -> the spec to compile, or None when it asks for nothing
    (absent, or OpenAI's default `{"type": "text"}`). Checked by `Grammars.compile`."""
    if response_format is None:
        return None
    if isinstance(response_format, Mapping) and response_format.get("type") == "text":
        return None
    if not isinstance(response_format, Mapping):
        raise InputError("response_format must be an object")
    return dict(response_format)


def _canonical(spec: Any) -> str:
    try:
        return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise InputError("response_format must be plain JSON") from None


class Matcher:
    """One row's place in its grammar."""

    __slots__ = ("_m", "_words")

    def __init__(self, matcher, words: int):
        self._m = matcher
        self._words = words

    def fill(self, words: np.ndarray) -> None:
        """Writes the allowed tokens into `words`: int32[ceil(vocab_size / 32)], contiguous."""
        if words.dtype != np.int32 or words.ndim != 1 or words.shape[0] != self._words or not words.flags.c_contiguous:
            raise ValueError(f"fill needs a contiguous int32[{self._words}] array, got {words.dtype}{list(words.shape)}")
        self._m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)

    def accept(self, token: int) -> bool:
        """Advances past `token`; False (and the matcher in error) when the grammar forbids it."""
        return bool(self._m.consume_token(int(token)))

    @property
    def finished(self) -> bool:
        """The grammar is complete (or the matcher is in error): only EOS is allowed next."""
        return bool(self._m.is_stopped())

    @property
    def failed(self) -> bool:
        """A forbidden token was accepted."""
        return bool(self._m.is_error())

    def copy(self) -> "Matcher":
        """An independent matcher at the same place (for `n` rows sharing a prompt)."""
        return Matcher(self._m.deep_copy(), self._words)


class Grammar:
    """A compiled spec. `matcher()` is cheap (a copy of a prototype, microseconds)."""

    def __init__(self, prototype, words: int, key: str):
        self._proto = prototype
        self._words = words
        self.key = key

    def matcher(self) -> Matcher:
        return Matcher(self._proto.deep_copy(), self._words)


class Grammars:
    """The grammar engine for one tokenizer and vocabulary.

    tokenizer: `processing.tokenizer.Qwen2Tokenizer` (its `backend` is a `tokenizers.Tokenizer`).
    vocab_size: the model's vocabulary (the logits' width), at least the tokenizer's.
    eos_ids: the ids that end a reply (`chat.turn_end_ids`); default <|im_end|> and <|endoftext|>.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int] | None = None, *,
                 cache_size: int = CACHE_SIZE):
        if llguidance is None:
            raise InputError("structured output needs llguidance (pip install llguidance)")
        if vocab_size < tokenizer.vocab_size:
            raise InputError(f"vocab_size {vocab_size} is under the tokenizer's {tokenizer.vocab_size}")
        if eos_ids is None:
            eos_ids = [tokenizer.im_end_token_id, tokenizer.endoftext_token_id]
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        if not self.eos_ids:
            raise InputError("structured output needs at least one EOS id")
        self.vocab_size = int(vocab_size)
        self.mask_words = mask_words(self.vocab_size)
        self._tok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                           eos_token=list(self.eos_ids))
        self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        self.cache_size = cache_size  # compiled grammars kept, least recently used dropped first
        self._lock = threading.Lock()

    # -------------------------------------------------------------- compile
    def compile(self, spec: Mapping[str, Any]) -> Grammar:
        """A spec (see the module docstring) -> its Grammar, from the cache when seen before."""
        key = _canonical(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = Grammar(self._build(spec), self.mask_words, key)
        with self._lock:
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, spec: Mapping[str, Any]):
        if not isinstance(spec, Mapping):
            raise InputError("response_format must be an object")
        kind = spec.get("type")
        if kind == "json_object":
            where = "response_format json_object"
            text = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        elif kind == "json_schema":
            where = "response_format json_schema"
            js = spec.get("json_schema")
            if not isinstance(js, Mapping) or not isinstance(js.get("schema"), Mapping):
                raise InputError(f"{where}: expected {{'json_schema': {{'name': ..., 'schema': {{...}}}}}}")
            name = js.get("name")
            if name is not None and not isinstance(name, str):
                raise InputError(f"{where}: json_schema.name must be a string")
            try:
                text = llguidance.LLMatcher.grammar_from_json_schema(dict(js["schema"]), overrides=JSON_OPTIONS)
            except (ValueError, TypeError) as e:
                raise InputError(f"{where}: {first_line(e)}") from None
        elif kind == "tool_calls":
            where = "tools"
            text = llguidance.LLMatcher.grammar_from_lark(tool_grammar.tool_calls_lark(spec, JSON_OPTIONS))
        elif kind == "text":
            raise InputError("response_format text needs no grammar (response_format_spec gives None for it)")
        else:
            raise InputError(f"response_format type {kind!r} is not supported (json_object, json_schema)")
        matcher = llguidance.LLMatcher(self._tok, text, log_level=0)
        if matcher.is_error():
            if kind == "tool_calls":
                where = self._bad_tool(spec) or where
            raise InputError(f"{where}: unsupported or invalid schema: {first_line(matcher.get_error(), 300)}")
        return matcher

    def _bad_tool(self, spec: Mapping) -> str | None:
        """Which tool's parameters a failed tool grammar trips on, for the error line."""
        for k, tool in enumerate(spec.get("tools", [])):
            params = tool.get("parameters") or tool_grammar.NO_PARAMETERS
            text = llguidance.LLMatcher.grammar_from_json_schema(dict(params), overrides=JSON_OPTIONS)
            if llguidance.LLMatcher(self._tok, text, log_level=0).is_error():
                return f"tools[{k}] ({tool.get('name')}) parameters"
        return None

    # -------------------------------------------------------------- batches
    def cache_info(self) -> dict:
        with self._lock:
            return {"size": len(self._cache), "limit": self.cache_size}

    def clear_cache(self) -> None:
        """Forgets every compiled grammar (the next compile of a spec builds it anew)."""
        with self._lock:
            self._cache.clear()


_executor = None  # llguidance's thread pool, made on first use
_executor_lock = threading.Lock()


def fill_rows(rows: Sequence[tuple[Matcher, int]], words: np.ndarray) -> None:
    """Fills words[row] for each (matcher, row) at once, on llguidance's threads (the GIL released).
    words: int32[B, W] contiguous, W the matchers' mask width; rows not named are left as they are."""
    global _executor
    if words.dtype != np.int32 or words.ndim != 2 or not words.flags.c_contiguous:
        raise ValueError(f"fill_rows needs a contiguous int32[B, W] array, got {words.dtype}{list(words.shape)}")
    for matcher, row in rows:
        if matcher._words != words.shape[1]:
            raise ValueError(f"a matcher of {matcher._words}-word masks for rows of {words.shape[1]} words")
        if not 0 <= row < words.shape[0]:
            raise ValueError(f"row {row} is outside the {words.shape[0]} rows")
    if not rows:
        return
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
    _executor.unsafe_compute_mask_ptr([(m._m, int(r)) for m, r in rows], words.ctypes.data, words.shape[1] * 4,
                                      words.shape[0])


def allowed(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool[vocab_size] from a row's bitmask (for tests and host-side masking)."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)
