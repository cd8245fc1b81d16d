"""The one reader of JSON files: every config, marker, index and settings file goes through
`read_json`, so a missing, unreadable or malformed file is one error line that names it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qwen2vl_jax.errors import InputError


def parse_json(text: str | bytes, where: str, *, error: type[InputError] = InputError, expect: type | None = dict) -> Any:
    """Parses `text` (read from `where`, named in the message); `expect` is the type the top
    level must have (None: any)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if "\n" in e.doc.rstrip("\r\n") else f"column {e.colno}"
        raise error(f"{where}: not valid JSON ({_reason(e)} at {at})") from None
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise error(f"{where}: expected a JSON {kind.split()[-1]} at the top level, found {_kind(value)}")
    return value


def read_json(path: str | os.PathLike, *, error: type[InputError] = InputError, expect: type | None = dict,
              missing_ok: bool = False) -> Any:
    """The parsed content of the JSON file `path` (see `parse_json`); with `missing_ok`, None
    when the file does not exist."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a JSON file") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    return parse_json(data, str(path), error=error, expect=expect)


def _reason(e: json.JSONDecodeError) -> str:
    # json calls an unterminated string's line break a "control character"; say what it is.
    if e.msg.startswith("Invalid control character") and e.doc[e.pos:e.pos + 1] in ("\n", "\r"):
        return "unterminated string"
    msg = e.msg.removesuffix(" at")  # "... starting at" + our " at line": one "at"
    return msg[0].lower() + msg[1:] if msg else "malformed"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")
