"""OpenAI tool calls in Qwen2's `<tool_call>` convention: rendering, parsing, streaming, grammar.

Qwen2-VL's own chat template knows nothing of tools; Qwen2 and Qwen2.5 were taught this form:
- the system turn ends with a "# Tools" section listing each tool (OpenAI's
  `{"type": "function", "function": {...}}` object, one JSON line each) inside `<tools></tools>`
  and asking for calls as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`;
- an assistant turn with tool calls holds its text (if any), then one such block per call,
  separated by newlines;
- `tool` role messages go back inside a user turn, each as `<tool_response>\\n...\\n</tool_response>`,
  consecutive ones sharing one turn.

`render_messages(messages, tools)` rewrites OpenAI messages into plain {role, content} messages
that `processing.chat_template.render_instruct` turns into exactly that text (as Qwen2.5's
template renders them, except that the default system prompt stays Qwen2-VL's own).

`parse_tool_calls(text)` finds the calls in a reply; `ToolCallStream` does the same on text
deltas and yields OpenAI delta pieces; both agree on every reply, however it is cut.

`tool_choice_spec(tools, tool_choice, parallel_tool_calls)` is the grammar spec for `required`
and a named function (None for `auto` and `none`), compiled by `serving.grammar.Grammars`;
`tool_calls_lark(spec)` is its grammar text.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Callable, Mapping, Sequence

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.processing.chat_template import DEFAULT_SYSTEM

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
RESPONSE_START = "<tool_response>"
RESPONSE_END = "</tool_response>"

TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# OpenAI's rule for function names (plus '.'), which also keeps them safe inside grammar literals.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A function without `parameters` takes none (OpenAI's reading).
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _dumps(value: Any) -> str:
    # jinja's `tojson` in HF's templates: json.dumps with ensure_ascii off, default separators.
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------- the tools list
def check_tools(tools: Any) -> list[dict]:
    """OpenAI's `tools` list, checked: each `{"type": "function", "function": {"name", ...}}` with
    a valid, unique name and an object (or absent) `parameters`. -> the list as given."""
    if not isinstance(tools, list) or not tools:
        raise InputError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    seen = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(tool.get("function"), Mapping):
            raise InputError(f"{where}: expected {{'type': 'function', 'function': {{...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InputError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '-' or '.'")
        if name in seen:
            raise InputError(f"{where}.function.name {name!r} is given twice")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise InputError(f"{where}.function.parameters must be a JSON schema object")
    return list(tools)


# ---------------------------------------------------------------------------- rendering
def _text_of(content: Any, where: str) -> str:
    """A message's text: a string, None (empty) or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise InputError(f"{where}: only text parts are accepted here")
            out.append(part["text"])
        return "".join(out)
    raise InputError(f"{where}: content must be a string or a list of text parts")


def _arguments(args: Any) -> Any:
    """OpenAI sends arguments as a JSON string; Qwen's template prints them with `tojson`, so a
    string that holds JSON is read back into its value first (as vLLM does)."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return {} if args is None else args


def call_block(name: str, arguments: Any) -> str:
    """One `<tool_call>` block as Qwen2.5's template writes it."""
    return f'{CALL_START}\n{{"name": "{name}", "arguments": {_dumps(_arguments(arguments))}}}\n{CALL_END}'


def _assistant_content(msg: Mapping, where: str) -> str:
    blocks = []
    for k, call in enumerate(msg["tool_calls"]):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InputError(f"{where}.tool_calls[{k}]: expected {{'function': {{'name', 'arguments'}}}}")
        blocks.append(call_block(fn["name"], fn.get("arguments")))
    text = _text_of(msg.get("content"), where)
    return "\n".join(([text] if text else []) + blocks)


def tools_system_text(tools: Sequence[Mapping]) -> str:
    """The "# Tools" section that follows the system prompt."""
    return TOOLS_HEADER + "".join("\n" + _dumps(t) for t in tools) + TOOLS_FOOTER


def render_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                    *, default_system: str = DEFAULT_SYSTEM) -> list[dict]:
    """OpenAI chat messages (with `tool_calls` on assistant turns and `tool` role messages) and
    tools -> {role, content} messages for `chat_template.render_instruct`.

    With tools, the system turn (the first message's, else `default_system`) gains the tools
    section. Assistant tool calls become `<tool_call>` blocks after the turn's text; runs of
    `tool` messages become one user turn of `<tool_response>` blocks. Other messages pass
    through unchanged (their content may hold images)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError("messages must be a list of {'role', 'content'} dicts")
    out: list[dict] = []
    msgs = list(messages)
    if tools:
        tools = check_tools(list(tools))
        section = tools_system_text(tools)
        first = msgs[0] if msgs else None
        if isinstance(first, Mapping) and first.get("role") == "system":
            content = first.get("content")
            if isinstance(content, list):
                content = [*content, {"type": "text", "text": section}]
            else:
                content = _text_of(content, "messages[0]") + section
            out.append({**first, "content": content})
            msgs = msgs[1:]
            offset = 1
        else:
            out.append({"role": "system", "content": default_system + section})
            offset = 0
    else:
        offset = 0
    responses: list[str] = []  # the tool messages of the current run
    for i, msg in enumerate(msgs, start=offset):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise InputError(f"{where}: expected a dict with 'role' and 'content'")
        role = msg["role"]
        if role == "tool":
            responses.append(f"{RESPONSE_START}\n{_text_of(msg.get('content'), where)}\n{RESPONSE_END}")
            continue
        if responses:
            out.append({"role": "user", "content": "\n".join(responses)})
            responses = []
        if role == "assistant" and msg.get("tool_calls"):
            if not isinstance(msg["tool_calls"], list):
                raise InputError(f"{where}.tool_calls must be a list")
            out.append({"role": "assistant", "content": _assistant_content(msg, where)})
        elif role == "assistant" and msg.get("content") is None:
            out.append({"role": "assistant", "content": ""})
        else:
            out.append({k: v for k, v in msg.items() if k in ("role", "content")})
    if responses:
        out.append({"role": "user", "content": "\n".join(responses)})
    return out


# ---------------------------------------------------------------------------- parsing
def _call(body: str, make_id: Callable[[], str]) -> dict | None:
    """The OpenAI tool call a block's body holds, or None when it is not a well-formed call: a
    JSON object with a non-empty string `name` and an object `arguments` (absent: {}; a string
    holding a JSON object is read)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": make_id(), "type": "function", "function": {"name": obj["name"], "arguments": _dumps(args)}}


def parse_tool_calls(text: str, make_id: Callable[[], str] = new_call_id) -> tuple[str | None, list[dict]]:
    """A reply -> (content, tool_calls).

    A block runs from `<tool_call>` to the next `</tool_call>`, or to the end of the text when
    it is not closed (the model stopped right after the JSON). Well-formed blocks become
    OpenAI tool calls (`id`, `type: "function"`, `function: {name, arguments}` with arguments
    as a JSON string) and leave the content with the whitespace on either side of them;
    malformed ones stay in the content as they are. Content that is left empty is None."""
    pieces: list[str] = []
    calls: list[dict] = []
    pos, strip_next = 0, False
    while True:
        i = text.find(CALL_START, pos)
        piece = text[pos:] if i < 0 else text[pos:i]
        if strip_next:
            piece = piece.lstrip()
        if i < 0:
            pieces.append(piece)
            break
        j = text.find(CALL_END, i + len(CALL_START))
        body = text[i + len(CALL_START): len(text) if j < 0 else j]
        end = len(text) if j < 0 else j + len(CALL_END)
        call = _call(body, make_id)
        if call is None:
            pieces.append(piece + text[i:end])
            strip_next = False
        else:
            pieces.append(piece.rstrip())
            calls.append(call)
            strip_next = True
        pos = end
    content = "".join(pieces)
    return (content or None), calls


def _held_prefix(s: str, marker: str) -> int:
    """Length of the longest end of `s` that is a proper start of `marker`."""
    for n in range(min(len(s), len(marker) - 1), 0, -1):
        if marker.startswith(s[-n:]):
            return n
    return 0


class ToolCallStream:
    """Text deltas of a reply -> OpenAI delta pieces, with the same result as `parse_tool_calls`
    on the whole text however the text is cut.

    `feed(delta)` and, once the reply is over, `finish()` return lists of pieces:
    `{"content": str}`, or for the k-th call first
    `{"tool_calls": [{"index": k, "id", "type": "function", "function": {"name", "arguments": ""}}]}`
    then `{"tool_calls": [{"index": k, "function": {"arguments": str}}]}`.

    Content is sent as it comes except what could still turn out to be part of a tool call: the
    start of a `<tool_call>` marker and trailing whitespace (dropped if a call follows). A call
    is sent once its block is closed (or at `finish`), because only then is it known to be
    well-formed; a malformed block goes out as content. `calls` lists the calls sent so far."""

    def __init__(self, make_id: Callable[[], str] = new_call_id):
        self.make_id = make_id
        self.calls: list[dict] = []
        self._buf = ""  # text received and not yet sent or decided
        self._ws = ""  # trailing whitespace of the content, held back
        self._in_call = False
        self._strip = False  # drop whitespace right after a call

    def feed(self, delta: str) -> list[dict]:
        self._buf += delta
        out: list[dict] = []
        self._drain(out)
        return out

    def finish(self) -> list[dict]:
        out: list[dict] = []
        self._drain(out)
        if self._in_call:
            self._close(self._buf, closed=False, out=out)
        else:
            if self._strip:
                self._buf = self._buf.lstrip()
            if self._ws + self._buf:
                out.append({"content": self._ws + self._buf})
        self._buf, self._ws, self._in_call = "", "", False
        return out

    # -------------------------------------------------------------- internals
    def _content(self, s: str, out: list[dict]) -> None:
        s = self._ws + s
        keep = len(s.rstrip())
        if keep:
            out.append({"content": s[:keep]})
        self._ws = s[keep:]

    def _close(self, body: str, closed: bool, out: list[dict]) -> None:
        call = _call(body, self.make_id)
        if call is None:
            self._content(CALL_START + body + (CALL_END if closed else ""), out)
            self._strip = False
            return
        self._ws = ""
        self._strip = True
        k = len(self.calls)
        self.calls.append(call)
        fn = call["function"]
        out.append({"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                    "function": {"name": fn["name"], "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]})

    def _drain(self, out: list[dict]) -> None:
        while self._buf:
            if self._in_call:
                j = self._buf.find(CALL_END)
                if j < 0:
                    return
                body, self._buf = self._buf[:j], self._buf[j + len(CALL_END):]
                self._in_call = False
                self._close(body, closed=True, out=out)
                continue
            if self._strip:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return
                self._strip = False
            i = self._buf.find(CALL_START)
            if i >= 0:
                self._content(self._buf[:i], out)
                self._buf = self._buf[i + len(CALL_START):]
                self._in_call = True
                continue
            held = _held_prefix(self._buf, CALL_START)
            self._content(self._buf[:len(self._buf) - held], out)
            self._buf = self._buf[len(self._buf) - held:]
            return


# ---------------------------------------------------------------------------- tool_choice
def tool_choice_spec(tools: Sequence[Mapping] | None, tool_choice: Any = None,
                     parallel_tool_calls: bool = True) -> dict | None:
    """The grammar spec `Grammars.compile` takes for a request's `tool_choice`: None for `auto`,
    `none` or no choice (the reply is free); for `required`, one or more calls to any of the
    tools (one with `parallel_tool_calls` false); for `{"type": "function", "function": {"name"}}`,
    calls to that function only. Only each tool's name and parameters are kept, so requests
    that differ in descriptions share a compiled grammar."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if not tools:
        raise InputError("tool_choice needs tools")
    tools = check_tools(list(tools))
    names = [t["function"]["name"] for t in tools]
    if tool_choice == "required":
        choice = "required"
    elif (isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), Mapping) and isinstance(tool_choice["function"].get("name"), str)):
        choice = tool_choice["function"]["name"]
        if choice not in names:
            raise InputError(f"tool_choice names function {choice!r}, which is not among the tools")
    else:
        raise InputError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")
    kept = [{"name": t["function"]["name"], "parameters": t["function"].get("parameters")} for t in tools]
    if choice != "required":
        kept = [t for t in kept if t["name"] == choice]
    return {"type": "tool_calls", "tools": kept, "choice": choice, "parallel": bool(parallel_tool_calls)}


def _lark_string(s: str) -> str:
    return json.dumps(s)  # names are checked (NAME_PATTERN), so JSON's escapes are all it needs


def tool_calls_lark(spec: Mapping, json_options: Mapping) -> str:
    """The llguidance Lark grammar of a `tool_calls` spec: `<tool_call>` blocks exactly as the
    template writes them, the name a literal and the arguments the tool's own JSON schema (each
    its own document, so its `$ref`s resolve), with `json_options` (separators, whitespace)."""
    tools = spec.get("tools")
    if not isinstance(tools, list) or not tools:
        raise InputError("tool_calls grammar: 'tools' must be a non-empty list")
    rules = []
    alts = []
    for k, tool in enumerate(tools):
        name = tool.get("name") if isinstance(tool, Mapping) else None
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InputError(f"tool_calls grammar: tools[{k}] needs a valid 'name'")
        params = tool.get("parameters")
        params = NO_PARAMETERS if params is None else params
        if not isinstance(params, Mapping):
            raise InputError(f"tools[{k}] ({name}): parameters must be a JSON schema object")
        doc = {**params, "x-guidance": dict(json_options)}
        head = f'{CALL_START}\n{{"name": "{name}", "arguments": '
        rules.append(f"call_{k}: {_lark_string(head)} args_{k} {_lark_string('}' + chr(10) + CALL_END)}")
        rules.append(f"args_{k}: %json {_dumps(doc)}")
        alts.append(f"call_{k}")
    start = 'start: call ("\\n" call)*' if spec.get("parallel", True) else "start: call"
    return "\n".join([start, "call: " + " | ".join(alts), *rules]) + "\n"
