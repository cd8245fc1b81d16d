"""The chat request body (OpenAI's schema) checked field by field into a `Parsed` request; media
is not read here."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from qwen2vl_jax.serving.settings import ApiError, Settings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_N = 16  # choices per request (each takes a row of the batch; --max-batch bounds it too)
MAX_TOP_LOGPROBS = 20  # as OpenAI allows
MAX_TOOLS = 64
# Per-request preprocessing (vLLM's mm_processor_kwargs; qwen-vl-utils' names on a part).
IMAGE_PIXEL_KEYS = ("min_pixels", "max_pixels")
VIDEO_KEYS = ("fps", "max_frames", "total_pixels", "min_pixels", "max_pixels")
MAX_STOP = 4  # stop strings per request, as OpenAI allows
QUOTE_CHARS = 100  # the most of a client's value an error message repeats

# The body's fields, by what the server does with them. A field it does not know is refused
# rather than ignored: a client that asks for tools, logprobs or a JSON schema and gets plain
# text back would take the reply for something it is not.
IMPLEMENTED = {"model", "messages", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options",
               "temperature", "top_p", "top_k", "repetition_penalty", "seed", "n", "ignore_eos", "return_token_ids",
               "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
               "mm_processor_kwargs"}
IGNORED = {"user": str, "metadata": dict, "store": bool, "service_tier": str, "prompt_cache_key": str,
           "safety_identifier": str}  # bookkeeping for OpenAI's platform: no effect on the reply
# Not implemented: accepted only at the value that means "not asked for".
NEUTRAL = {
    "frequency_penalty": lambda v: v == 0, "presence_penalty": lambda v: v == 0, "functions": lambda v: v == [],
    "function_call": lambda v: v in ("none", "auto"), "logit_bias": lambda v: v == {}, "best_of": lambda v: v == 1,
}
STREAM_OPTIONS = {"include_usage"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def quote(value: Any) -> str:
    """A client's value as an error message repeats it: its repr, cut to about QUOTE_CHARS."""
    if isinstance(value, str) and len(value) > QUOTE_CHARS:
        return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def _safe(name: str) -> str:
    """A client's field name fit to name in an error: cut short, lone surrogates escaped."""
    return name[:QUOTE_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------------------- the JSON text
def load_json(raw: bytes) -> Any:
    """The body's bytes -> its JSON value; ApiError 400 for text that is not JSON, that nests
    deeper than the interpreter's recursion limit (json.loads recurses once per level and stops
    there with RecursionError, after a few hundred microseconds) or holds a number too long to
    convert. Nothing below walks arbitrary nesting: parse_body reads fixed paths."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body nests too deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:QUOTE_CHARS]})") from None


# ---------------------------------------------------------------------------- the request body
@dataclasses.dataclass
class Parsed:
    """A checked chat request."""

    messages: list[dict]  # HF messages; image parts hold bytes, video parts a local path
    max_tokens: int | None
    settings: dict  # temperature, top_p, top_k, repetition_penalty, seed (None: the model's default)
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    return_token_ids: bool
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs
    response_format: dict | None = None  # json_object / json_schema (None: text)
    tools: list[dict] | None = None  # OpenAI function tools offered (None: none)
    tool_choice: str | dict = "auto"  # "none", "auto", "required" or {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    vision: dict = dataclasses.field(default_factory=dict)  # mm_processor_kwargs: min/max_pixels, video settings
    prompt: str | list[int] | None = None  # /v1/completions: the prompt as text or token ids (no chat template)

    @property
    def tool_call_grammar(self) -> dict | None:
        """The grammar spec that forces tool calls (tool_choice "required" or a named function)."""
        from qwen2vl_jax.serving.tools import tool_choice_spec

        if not self.tools:
            return None
        return tool_choice_spec(self.tools, self.tool_choice, self.parallel_tool_calls)

    @property
    def grammar_spec(self) -> dict | None:
        """What the reply's tokens must follow: forced tool calls win over a response_format."""
        return self.tool_call_grammar or self.response_format

    @property
    def renders_tools(self) -> bool:
        """Whether the prompt needs the tool rendering (tools offered, or tool turns in the history)."""
        return bool(self.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in self.messages)


def _number(body: dict, name: str, kind=float, lo=None, hi=None):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f" between {lo} and {hi}" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}{rng} (got {quote(value)})",
                       name)
    return kind(value)


def _bool(body: dict, name: str, where: str | None = None) -> bool:
    """A true/false field (absent or null: false); "yes", 1 and the like are refused."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        where = where or name
        raise ApiError(400, f"'{where}' must be true or false (got {quote(value)})", where)
    return value


def _text(value: Any, where: str) -> str:
    """A string the tokenizer will see: JSON's \\ud800 escapes give lone surrogates, which are
    not text and which no encoder takes."""
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string", where)
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise ApiError(400, f"{where} holds a lone surrogate ({bad.group()!a} at character {bad.start()}), "
                            "which is not valid Unicode", where)
    return value


def _check_fields(body: dict) -> None:
    """Refuses the fields the server does not implement (see IMPLEMENTED, IGNORED, NEUTRAL)."""
    for name, value in body.items():
        if name in IMPLEMENTED or value is None:
            continue
        if name in IGNORED:
            if not isinstance(value, IGNORED[name]):
                raise ApiError(400, f"'{name}' must be a {IGNORED[name].__name__}", name)
        elif name in NEUTRAL:
            if name.endswith("_penalty") or name in ("top_logprobs", "best_of"):
                _number(body, name, float if name.endswith("_penalty") else int,
                        -2 if name.endswith("_penalty") else 0, 2 if name.endswith("_penalty") else 20)
            if not NEUTRAL[name](value):
                raise ApiError(400, f"'{name}' is not supported by this server (got {quote(value)})", name,
                               "unsupported_parameter")
        else:
            raise ApiError(400, f"unknown field {quote(name)} (this server takes: "
                                f"{', '.join(sorted(IMPLEMENTED))})", _safe(name), "unsupported_parameter")


def check_model(body: dict, settings: Settings) -> str:
    """The model a request names -> that name (absent: the served name); 404 for another."""
    name = body.get("model")
    if name is None:
        return settings.model_name
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string", "model")
    names = (settings.model_name, *settings.model_aliases)
    if name not in names:
        raise ApiError(404, f"the model {quote(name)} does not exist; this server serves "
                            f"{', '.join(map(repr, names))}", "model", "model_not_found")
    return name


def parse_body(body: Any, settings: Settings) -> Parsed:
    """The JSON body -> Parsed (media not read yet); ApiError names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_model(body, settings)
    _check_fields(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    n = _number(body, "n", int, 1, MAX_N) or 1
    want_logprobs = _bool(body, "logprobs")
    top_logprobs = _number(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not want_logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    for i, s in enumerate(stop):
        _text(s, f"stop[{i}]")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    for key in options:
        if key not in STREAM_OPTIONS:
            raise ApiError(400, f"stream_options.{_safe(key)} is not supported by this server "
                                f"(it takes: {', '.join(sorted(STREAM_OPTIONS))})", "stream_options",
                           "unsupported_parameter")
    values = {
        "temperature": _number(body, "temperature", float, 0, 100),
        "top_p": _number(body, "top_p", float, 0, 1),
        "top_k": _number(body, "top_k", int, -1, 2**31 - 1),
        "repetition_penalty": _number(body, "repetition_penalty", float, 1e-6, 100),
        "seed": _number(body, "seed", int, 0, 2**32 - 1),
    }
    if values["top_k"] == -1:  # vLLM's spelling of "off"
        values["top_k"] = 0
    if values["top_p"] == 0:
        raise ApiError(400, "'top_p' must be in (0, 1]", "top_p")
    tools, tool_choice = _tools(body)
    parallel = body.get("parallel_tool_calls")
    return Parsed(
        messages=[_message(m, i, settings) for i, m in enumerate(messages)],
        max_tokens=max_tokens, settings=values, stop=stop, stream=stream,
        include_usage=_bool(options, "include_usage", "stream_options.include_usage"),
        ignore_eos=_bool(body, "ignore_eos"), return_token_ids=_bool(body, "return_token_ids"),
        n=n, top_logprobs=(top_logprobs or 0) if want_logprobs else None,
        response_format=_response_format(body.get("response_format")), tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=True if parallel is None else _bool(body, "parallel_tool_calls"),
        vision=_vision_kwargs(body.get("mm_processor_kwargs"), "mm_processor_kwargs", VIDEO_KEYS),
    )


# /v1/completions: the fields it shares with chat, and its own
COMPLETION_SHARED = {"model", "max_tokens", "stop", "stream", "stream_options", "temperature", "top_p", "top_k",
                     "repetition_penalty", "seed", "n", "ignore_eos", "return_token_ids", "response_format",
                     "user", "metadata", "store", "service_tier", "safety_identifier", "frequency_penalty",
                     "presence_penalty", "logit_bias"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_completion_body(body: Any, settings: Settings, vocab_size: int) -> Parsed:
    """A /v1/completions body -> Parsed with `prompt` set (no messages); the fields it shares
    with chat are checked as there. `logprobs` is the legacy number of alternatives (0-20)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_model(body, settings)
    own = {"prompt", "logprobs", "echo", "suffix", "best_of"}
    for name, value in body.items():
        if name not in COMPLETION_SHARED and name not in own and value is not None:
            raise ApiError(400, f"unknown field {quote(name)} (this endpoint takes: "
                                f"{', '.join(sorted(COMPLETION_SHARED | own))})", _safe(name), "unsupported_parameter")
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported by this server", "echo", "unsupported_parameter")
    if body.get("suffix"):
        raise ApiError(400, "'suffix' is not supported by this server", "suffix", "unsupported_parameter")
    if _number(body, "best_of", int, 1, MAX_N) not in (None, 1):
        raise ApiError(400, "'best_of' other than 1 is not supported by this server", "best_of",
                       "unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt given as a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "'prompt' must not be empty", "prompt")
        _text(prompt, "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"'prompt' holds the token id {bad}, outside the vocabulary of {vocab_size}", "prompt")
    else:
        raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt)", "prompt")
    logprobs = _number(body, "logprobs", int, 0, MAX_TOP_LOGPROBS)
    shared = {k: v for k, v in body.items() if k in COMPLETION_SHARED}
    parsed = parse_body({**shared, "messages": [{"role": "user", "content": ""}]}, settings)
    return dataclasses.replace(parsed, messages=[], prompt=prompt, top_logprobs=logprobs,
                               max_tokens=parsed.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)


def _response_format(value: Any) -> dict | None:
    """OpenAI's response_format -> the grammar spec (None for plain text)."""
    where = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ApiError(400, f"'{where}' must be an object with a 'type'", where)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, f"'{where}.json_schema' must be an object with 'name' and 'schema'", f"{where}.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, f"'{where}.json_schema.schema' must be a JSON schema object", f"{where}.json_schema.schema")
        name = spec.get("name", "response")
        if not isinstance(name, str):
            raise ApiError(400, f"'{where}.json_schema.name' must be a string", f"{where}.json_schema.name")
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                        "strict": bool(spec.get("strict", False))}}
    raise ApiError(400, f"'{where}.type' {quote(kind)} is not one of text, json_object, json_schema", f"{where}.type")


def _tools(body: dict) -> tuple[list[dict] | None, str | dict]:
    """tools and tool_choice, checked (function tools only)."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise ApiError(400, f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
        names = set()
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                    or not isinstance(tool.get("function"), dict):
                raise ApiError(400, f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
            fn = tool["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
                raise ApiError(400, f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'",
                               f"{where}.function.name")
            if name in names:
                raise ApiError(400, f"{where}.function.name {quote(name)} is given twice", f"{where}.function.name")
            names.add(name)
            params = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise ApiError(400, f"{where}.function.parameters must be a JSON schema object",
                               f"{where}.function.parameters")
            if fn.get("description") is not None:
                _text(fn["description"], f"{where}.function.description")
        tools = tools or None
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ApiError(400, f"'tool_choice' {quote(choice)} is not one of none, auto, required, or a function",
                           "tool_choice")
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        if not tools or choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
            raise ApiError(400, f"'tool_choice' names the function {quote(choice['function']['name'])}, which "
                                "'tools' does not offer", "tool_choice")
        choice = {"type": "function", "function": {"name": choice["function"]["name"]}}
    else:
        raise ApiError(400, "'tool_choice' must be none, auto, required or {'type': 'function', 'function': "
                            "{'name': ...}}", "tool_choice")
    if choice == "required" and not tools:
        raise ApiError(400, "'tool_choice' is 'required' but no 'tools' are given", "tool_choice")
    return tools, choice


def _vision_kwargs(value: Any, where: str, keys: tuple[str, ...]) -> dict:
    """Per-request preprocessing settings (positive numbers; fps may be fractional)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"'{where}' must be an object", where)
    out = {}
    for key, v in value.items():
        if key not in keys:
            raise ApiError(400, f"{where}.{_safe(key)} is not supported (it takes: {', '.join(keys)})",
                           f"{where}.{_safe(key)}", "unsupported_parameter")
        kind = float if key == "fps" else int
        out[key] = _number(value, key, kind, 1 if kind is int else 0.01)
        if out[key] is None:
            del out[key]
    if "min_pixels" in out and "max_pixels" in out and out["min_pixels"] > out["max_pixels"]:
        raise ApiError(400, f"{where}.min_pixels ({out['min_pixels']}) is over max_pixels ({out['max_pixels']})", where)
    return out


def _message(m: Any, i: int, settings: Settings) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role {quote(role)} is not one of {', '.join(ROLES)}", f"{where}.role")
    for key in ("function_call", "audio"):
        if m.get(key):
            raise ApiError(400, f"{where}.{key} is not supported by this server", f"{where}.{key}",
                           "unsupported_parameter")
    extra = {}
    if m.get("tool_calls"):
        if role != "assistant":
            raise ApiError(400, f"{where}.tool_calls is only taken on an assistant message", f"{where}.tool_calls")
        extra["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if role == "tool" and isinstance(content, list):  # the text parts of a tool's answer
        content = "".join(_text(p.get("text") if isinstance(p, dict) else None, f"{where}.content[{j}].text")
                          for j, p in enumerate(content))
    if isinstance(content, str):
        return {"role": ROLES[role], "content": _text(content, f"{where}.content"), **extra}
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
    return {"role": ROLES[role], "content": [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]}


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's earlier tool calls, checked (arguments as a JSON string)."""
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be a list", where)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}[{i}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}",
                           where)
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args)
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": _text(fn["name"], f"{where}[{i}].function.name"),
                                 "arguments": _text(args, f"{where}[{i}].function.arguments")}})
    return out


def _url(value: Any, where: str) -> str:
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where} has no URL", where)
    return _text(value, where)


def _part_vision(p: dict, kind: str, where: str, keys: tuple[str, ...]) -> dict:
    """qwen-vl-utils' per-part settings: beside the part's type or inside its URL object."""
    found = {k: p[k] for k in keys if k in p}
    inner = p.get(kind)
    if isinstance(inner, dict):
        found.update({k: inner[k] for k in keys if k in inner})
    return _vision_kwargs(found, where, keys) if found else {}


def _part(p: Any, where: str) -> dict:
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
        raise ApiError(400, f"{where} must be an object with a 'type'", where)
    kind = p["type"]
    if kind == "text":
        return {"type": "text", "text": _text(p.get("text"), f"{where}.text")}
    if kind in ("image_url", "image"):
        return {"type": "image", "url": _url(p.get(kind), f"{where}.{kind}"), "where": where,
                "vision": _part_vision(p, kind, where, IMAGE_PIXEL_KEYS)}
    if kind in ("video_url", "video"):
        return {"type": "video", "url": _url(p.get(kind), f"{where}.{kind}"), "where": where,
                "vision": _part_vision(p, kind, where, VIDEO_KEYS)}
    raise ApiError(400, f"{where}: content part type {quote(kind)} is not supported (text, image_url, video_url)",
                   f"{where}.type")
