"""Qwen2-VL's chat templates, rendered by hand (no jinja at run time).

Two templates ship with the published checkpoints: the Instruct one (system prompt, turns,
image/video placeholders, add_vision_id, add_generation_prompt) and the base models' one (a
list of content items, no turns). `identify` recognises either from the folder's template
string; `render` reproduces exactly what HF's jinja rendering of that string produces.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import InputError

INSTRUCT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASE_TEMPLATE = (
    "{% if messages is string %}{{ messages }}{% else %}{% for content in messages %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
)

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

TEMPLATES = {"instruct": INSTRUCT_TEMPLATE, "base": BASE_TEMPLATE}


def _squash(s: str) -> str:
    return "".join(s.split())


def identify(template: str | None) -> str | None:
    """'instruct' or 'base' for the official templates (whitespace-insensitive), None for
    anything else."""
    if template is None:
        return None
    key = _squash(template)
    for name, t in TEMPLATES.items():
        if key == _squash(t):
            return name
    return None


def _text(v: Any) -> str:
    # jinja's {{ }} prints str(value); None prints "None".
    return v if isinstance(v, str) else str(v)


def _kind(item: Any) -> str:
    """Which branch of the template a content item takes: image, video, text or skip."""
    if not isinstance(item, Mapping):
        raise InputError(f"message content items must be dicts, got {type(item).__name__}")
    t = item.get("type")
    if t == "image" or "image" in item or "image_url" in item:
        return "image"
    if t == "video" or "video" in item:
        return "video"
    if "text" in item:
        return "text"
    return "skip"


def _content(items: Any, counts: list[int], add_vision_id: bool, where: str) -> str:
    if isinstance(items, Mapping) or not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise InputError(f"{where}: content must be a string or a list of content items")
    out = []
    for item in items:
        kind = _kind(item)
        if kind == "image":
            counts[0] += 1
            if add_vision_id:
                out.append(f"Picture {counts[0]}: ")
            out.append(IMAGE_PLACEHOLDER)
        elif kind == "video":
            counts[1] += 1
            if add_vision_id:
                out.append(f"Video {counts[1]}: ")
            out.append(VIDEO_PLACEHOLDER)
        elif kind == "text":
            out.append(_text(item["text"]))
    return "".join(out)


def render_instruct(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, add_vision_id: bool = False
) -> str:
    """The Qwen2-VL Instruct template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError("messages must be a list of {'role', 'content'} dicts")
    out = []
    counts = [0, 0]  # images, videos: counted across the whole conversation
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise InputError(f"message {i}: expected a dict with 'role' and 'content'")
        role = msg["role"]
        if i == 0 and role != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{_text(role)}\n")
        content = msg["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.append(_content(content, counts, add_vision_id, f"message {i}"))
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_base(messages: Any) -> str:
    """The base models' template: a string as is, or a list of content items."""
    if isinstance(messages, str):
        return messages
    return _content(messages, [0, 0], False, "messages")


def render(
    name: str, messages: Any, add_generation_prompt: bool = False, add_vision_id: bool = False
) -> str:
    if name == "instruct":
        return render_instruct(messages, add_generation_prompt, add_vision_id)
    if name == "base":
        return render_base(messages)
    raise InputError(f"unknown chat template {name!r}")
