"""The chat request body (OpenAI's schema) checked field by field into a `Parsed` request; media
is not read here."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from qwen2vl_jax.serving.settings import ApiError, Settings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # stop strings per request, as OpenAI allows


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


def _number(body: dict, name: str, kind=float, lo=None, hi=None):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f" between {lo} and {hi}" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}{rng} (got {value!r})", name)
    return kind(value)


def parse_body(body: Any, settings: Settings) -> Parsed:
    """The JSON body -> Parsed (media not read yet); ApiError names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
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
    return Parsed(
        messages=[_message(m, i, settings) for i, m in enumerate(messages)],
        max_tokens=max_tokens, settings=values, stop=stop, stream=stream,
        include_usage=bool(options.get("include_usage", False)), ignore_eos=bool(body.get("ignore_eos", False)),
        return_token_ids=bool(body.get("return_token_ids", False)),
    )


def _message(m: Any, i: int, settings: Settings) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return {"role": ROLES[role], "content": content}
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
    return {"role": ROLES[role], "content": [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]}


def _url(value: Any, where: str) -> str:
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where} has no URL", where)
    return value


def _part(p: Any, where: str) -> dict:
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
        raise ApiError(400, f"{where} must be an object with a 'type'", where)
    kind = p["type"]
    if kind == "text":
        if not isinstance(p.get("text"), str):
            raise ApiError(400, f"{where}.text must be a string", f"{where}.text")
        return {"type": "text", "text": p["text"]}
    if kind in ("image_url", "image"):
        return {"type": "image", "url": _url(p.get(kind), f"{where}.{kind}"), "where": where}
    if kind in ("video_url", "video"):
        return {"type": "video", "url": _url(p.get(kind), f"{where}.{kind}"), "where": where}
    raise ApiError(400, f"{where}: content part type {kind!r} is not supported (text, image_url, video_url)",
                   f"{where}.type")
