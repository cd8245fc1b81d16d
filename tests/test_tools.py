"""serving.tools: Qwen2's tool-call convention rendered through our chat template, replies parsed
(whole and streamed, cut anywhere), and tool_choice grammars that a random model must obey."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import constrained
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.processing.chat_template import render_instruct
from qwen2vl_jax.serving.tools import ToolCallStream, parse_tool_calls, render_messages, tool_choice_spec

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time"}}
# Parameters with $defs and $ref: each tool's schema must stay its own document.
SEARCH = {"type": "function", "function": {
    "name": "search",
    "parameters": {"type": "object", "$defs": {"Q": {"type": "string", "maxLength": 6}},
                   "properties": {"q": {"$ref": "#/$defs/Q"}, "k": {"type": "integer", "minimum": 1, "maximum": 5}},
                   "required": ["q", "k"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]

TOOLS_LINES = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}}, '
    '"required": ["city", "unit"], "additionalProperties": false}}}\n'
    '{"type": "function", "function": {"name": "now", "description": "The time"}}'
)
TOOLS_SECTION = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + TOOLS_LINES +
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>"
)


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


# ---------------------------------------------------------------------------- rendering
def test_render_conversation_with_tools():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}},
        ]},
        {"role": "tool", "tool_call_id": "a", "content": "21 C"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "9 C"}]},
        {"role": "assistant", "content": "Paris 21 C, Oslo 9 C. Time?", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "noon"},
        {"role": "user", "content": "Thanks"},
    ]
    text = render_instruct(render_messages(messages, TOOLS), add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief." + TOOLS_SECTION + "<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\n9 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nParis 21 C, Oslo 9 C. Time?\n"
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nnoon\n</tool_response><|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_default_system_and_no_tools():
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "Hi"}]}
    text = render_instruct(render_messages([user], TOOLS))
    assert text == ("<|im_start|>system\nYou are a helpful assistant." + TOOLS_SECTION + "<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n")
    # Without tools: the messages are as the plain template has them; tool results still render.
    plain = [user, {"role": "assistant", "content": "Hello"}]
    assert render_instruct(render_messages(plain)) == render_instruct(plain)
    fed = render_instruct(render_messages([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]))
    assert fed.endswith("<|im_start|>user\nq<|im_end|>\n<|im_start|>user\n<tool_response>\nr\n</tool_response><|im_end|>\n")


def test_render_rejects_bad_tools():
    with pytest.raises(InputError, match="tools\\[0\\]"):
        render_messages([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "bad name"}}])
    with pytest.raises(InputError, match="twice"):
        render_messages([{"role": "user", "content": "x"}], [WEATHER, WEATHER])
    with pytest.raises(InputError, match="parameters"):
        render_messages([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "f", "parameters": 3}}])


# ---------------------------------------------------------------------------- parsing
CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
BAD_JSON = '<tool_call>\n{"name": "now", "arguments": {</tool_call>'
NO_NAME = '<tool_call>\n{"arguments": {}}\n</tool_call>'

REPLIES = [
    "Just text, no calls <tool and a lone < sign.",
    CALL_A,
    CALL_A + "\n" + CALL_B,
    "Let me check.\n" + CALL_A + "\n" + CALL_B + "\nDone.",
    "Before " + BAD_JSON + " after",
    CALL_A + "\n" + NO_NAME + "\n" + CALL_B,
    "x" + CALL_A + CALL_B + "   ",
    '<tool_call>\n{"name": "now", "arguments": "{\\"a\\": 1}"}',  # unclosed, well-formed: the model stopped
    "text <tool_call>\n{\"name\": \"now\", \"argu",  # unclosed, cut: content
    "<tool_call><tool_call>\n{}\n</tool_call></tool_call>",
    "",
    "  \n",
    "a</tool_call>b<tool_call",
]


def test_parse_cases():
    content, calls = parse_tool_calls("Let me check.\n" + CALL_A + "\n" + CALL_B + "\nDone.", ids())
    assert content == "Let me check.Done."
    assert calls == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    assert parse_tool_calls(CALL_A + "\n" + CALL_B, ids())[0] is None
    content, calls = parse_tool_calls("Before " + BAD_JSON + " after", ids())
    assert content == "Before " + BAD_JSON + " after" and calls == []
    content, calls = parse_tool_calls(CALL_A + "\n" + NO_NAME + "\n" + CALL_B, ids())
    assert content == NO_NAME and [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    content, calls = parse_tool_calls(REPLIES[7], ids())
    assert content is None and calls[0]["function"] == {"name": "now", "arguments": '{"a": 1}'}
    assert parse_tool_calls(REPLIES[8], ids()) == (REPLIES[8], [])
    assert parse_tool_calls(REPLIES[0], ids()) == (REPLIES[0], [])
    assert parse_tool_calls("", ids()) == (None, [])
    # Each call gets its own id.
    _, calls = parse_tool_calls(CALL_A + CALL_A)
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["id"].startswith("call_")


def _assemble(pieces):
    content, calls = [], {}
    for piece in pieces:
        assert set(piece) <= {"content", "tool_calls"} and len(piece) == 1
        if "content" in piece:
            assert piece["content"]
            content.append(piece["content"])
            continue
        (delta,) = piece["tool_calls"]
        call = calls.setdefault(delta["index"], {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
        if "id" in delta:
            assert call["id"] is None and delta["type"] == "function"
            call["id"] = delta["id"]
            call["function"]["name"] = delta["function"]["name"]
        call["function"]["arguments"] += delta["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return ("".join(content) or None), [calls[k] for k in sorted(calls)]


def _stream(chunks):
    stream = ToolCallStream(ids())
    pieces = [p for chunk in chunks for p in stream.feed(chunk)]
    pieces += stream.finish()
    return _assemble(pieces), stream


@pytest.mark.parametrize("text", REPLIES)
def test_stream_matches_whole_parse_at_every_split(text):
    whole = parse_tool_calls(text, ids())
    (got, stream) = _stream([text])
    assert got == whole
    assert len(stream.calls) == len(whole[1])
    for i in range(len(text) + 1):
        assert _stream([text[:i], text[i:]])[0] == whole, f"split at {i}"
    assert _stream(list(text))[0] == whole, "one character at a time"
    rng = np.random.default_rng(len(text))
    for _ in range(20):
        cuts = sorted(rng.integers(0, len(text) + 1, size=3))
        assert _stream([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])[0] == whole


def test_stream_holds_a_marker_start():
    stream = ToolCallStream(ids())
    assert stream.feed("Hi <tool_") == [{"content": "Hi"}]
    assert stream.feed("call>\n{\"name\": \"now\"") == []
    assert stream.feed(", \"arguments\": {}}\n</tool_call>") == [
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
    ]
    assert stream.feed(" bye") == [{"content": "bye"}]
    assert stream.finish() == []
    held = ToolCallStream(ids())
    assert held.feed("a <tool") == [{"content": "a"}]
    assert held.finish() == [{"content": " <tool"}]


# ---------------------------------------------------------------------------- tool_choice
def test_tool_choice_spec():
    assert tool_choice_spec(TOOLS, "auto") is None and tool_choice_spec(TOOLS, "none") is None
    assert tool_choice_spec(None, None) is None
    spec = tool_choice_spec(TOOLS, "required")
    assert spec == {"type": "tool_calls", "choice": "required", "parallel": True, "tools": [
        {"name": "get_weather", "parameters": WEATHER["function"]["parameters"]}, {"name": "now", "parameters": None}]}
    named = tool_choice_spec(TOOLS, {"type": "function", "function": {"name": "now"}}, parallel_tool_calls=False)
    assert named == {"type": "tool_calls", "choice": "now", "parallel": False, "tools": [{"name": "now", "parameters": None}]}
    with pytest.raises(InputError, match="not among the tools"):
        tool_choice_spec(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InputError, match="tool_choice must be"):
        tool_choice_spec(TOOLS, "sometimes")
    with pytest.raises(InputError, match="needs tools"):
        tool_choice_spec(None, "required")


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("llguidance", reason="tool grammars need llguidance (the serve extra)")
    return constrained.grammars()


def _check_calls(tok, tokens, tools):
    jsonschema = pytest.importorskip("jsonschema")
    text = tok.decode(tokens)
    content, calls = parse_tool_calls(text)
    assert content is None, f"text outside the calls: {text!r}"
    assert calls, text
    by_name = {t["function"]["name"]: t["function"].get("parameters") for t in tools}
    for call in calls:
        name = call["function"]["name"]
        assert name in by_name
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, by_name[name] or {"type": "object", "maxProperties": 0})
    return calls


@pytest.mark.parametrize("seed", range(4))
def test_required_gives_well_formed_calls(engine, seed):
    tok, grammars = engine
    tools = [WEATHER, CLOCK, SEARCH]
    grammar = grammars.compile(tool_choice_spec(tools, "required"))
    tokens, ended = constrained.generate(grammars, grammar.matcher(), np.random.default_rng(seed), 600, sample=seed % 2 == 1)
    assert ended
    _check_calls(tok, tokens, tools)


@pytest.mark.parametrize("seed", range(3))
def test_named_function_gives_one_call_to_it(engine, seed):
    tok, grammars = engine
    spec = tool_choice_spec([WEATHER, CLOCK, SEARCH], {"type": "function", "function": {"name": "search"}},
                            parallel_tool_calls=False)
    grammar = grammars.compile(spec)
    tokens, ended = constrained.generate(grammars, grammar.matcher(), np.random.default_rng(seed), 200)
    assert ended
    (call,) = _check_calls(tok, tokens, [SEARCH])
    assert call["function"]["name"] == "search"
    # The text is exactly the template's own spelling of that call.
    args = json.loads(call["function"]["arguments"])
    if "\\" not in tok.decode(tokens):
        assert tok.decode(tokens) == f'<tool_call>\n{{"name": "search", "arguments": {json.dumps(args, ensure_ascii=False)}}}\n</tool_call>'


def test_bad_tool_parameters_raise_input_error(engine):
    _, grammars = engine
    bad = {"type": "function", "function": {"name": "broken", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}
    with pytest.raises(InputError, match=r"tools\[1\] \(broken\)"):
        grammars.compile(tool_choice_spec([WEATHER, bad], "required"))
