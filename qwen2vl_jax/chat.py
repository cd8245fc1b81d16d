"""Chat from Python (notebooks, scripts): one call renders the messages, streams the answer as
text while it is generated, and returns it with its timings.

    from qwen2vl_jax.chat import chat
    reply = chat(model, processor, [{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "Describe it."}]}])
    print(reply.summary())   # prompt 93 tokens (64 vision) | first token 0.21 s | 31 tokens at 45.2 tokens/s

Messages are HF chat messages; image and video items take whatever the Processor takes (paths,
URLs for images, PIL images, arrays, lists of frames for a video). `model_folder` turns what a
user names (the shipped demo model, a local folder, a hub id) into a folder to load.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from qwen2vl_jax.errors import CheckpointError, InputError


def model_folder(name: str | os.PathLike, work_dir: str | os.PathLike = "~/.cache/qwen2vl-jax",
                 dtype: str = "bfloat16") -> Path:
    """"demo" -> the shipped demo model; a local folder (converted or HF) -> itself; anything
    else is a hub id (Qwen/Qwen2-VL-2B-Instruct), downloaded and converted once into
    work_dir/<name>-jax (later calls reuse it)."""
    from qwen2vl_jax.checkpoint import is_converted

    if str(name) == "demo":
        from qwen2vl_jax.train.demo import DEMO_DIR

        if not (DEMO_DIR / "config.json").is_file():
            raise CheckpointError(f"the demo model is not in this install ({DEMO_DIR} has no config.json)")
        return DEMO_DIR
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    out = Path(work_dir).expanduser() / (str(name).rstrip("/").split("/")[-1] + "-jax")
    if not is_converted(out):
        from qwen2vl_jax.convert.convert import convert_checkpoint

        convert_checkpoint(str(name), out, dtype=dtype, force=True)
    return out


@dataclasses.dataclass
class Reply:
    text: str
    token_ids: list[int]  # the generated tokens, without the EOS
    finish_reason: str  # "eos" or "length"
    prompt_tokens: int
    vision_tokens: int  # placeholder tokens among the prompt's
    preprocess_s: float  # chat template, image/video loading, resizing and patching (host)
    vision_s: float  # the vision tower alone (0 without images/videos)
    first_token_s: float  # vision tower + prefill + the first token (with compilation on a new bucket)
    decode_s: float  # every token after the first

    @property
    def prefill_s(self) -> float:
        """Prefill and the first token, the vision tower taken out."""
        return self.first_token_s - self.vision_s

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: the tokens after the first over the time they took."""
        n = len(self.token_ids) + (self.finish_reason == "eos") - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        n = len(self.token_ids)
        return (f"prompt {self.prompt_tokens} tokens ({self.vision_tokens} vision) | preprocessing "
                f"{self.preprocess_s:.2f} s | vision tower {self.vision_s:.2f} s | prefill {self.prefill_s:.2f} s | "
                f"{n} token{'s' * (n != 1)} at {self.tokens_per_s:.1f} tokens/s ({self.finish_reason})")


class TextStream:
    """Decodes a growing token list and writes only the new, complete characters."""

    def __init__(self, processor, out: TextIO | None):
        self.processor, self.out = processor, out
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.processor.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self._write(text[self.shown:])
        self.shown = len(text)

    def close(self) -> str:
        text = self.processor.decode(self.ids, skip_special_tokens=True)
        self._write(text[self.shown:] + "\n")
        return text

    def _write(self, s: str) -> None:
        if self.out is not None and s:
            self.out.write(s)
            self.out.flush()


def turn_end_ids(model, processor) -> tuple[int, ...]:
    """The model's EOS ids plus <|im_end|>: a chat turn ends there whatever the config says."""
    eos = list(model.generation_config.eos_token_ids)
    try:
        eos.append(processor.tokenizer.token_to_id("<|im_end|>"))
    except InputError:
        pass
    return tuple(dict.fromkeys(eos))


def chat(model, processor, messages: Sequence[dict[str, Any]], *, out: TextIO | None = sys.stdout,
         **settings) -> Reply:
    """Answers one conversation: the answer is written to `out` as it is generated (None: quiet).

    `settings` override the model's generation_config (max_new_tokens, temperature, top_k,
    top_p, repetition_penalty, seed, ...)."""
    from qwen2vl_jax.generation import generator_for

    t0 = time.perf_counter()
    inputs = processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="np")
    ids = np.asarray(inputs["input_ids"])
    vision = int(np.isin(ids, [model.config.image_token_id, model.config.video_token_id]).sum())
    if settings.get("eos_token_ids") is None:
        settings["eos_token_ids"] = turn_end_ids(model, processor)
    eos = set(model.generation_config.replace(**settings).eos_token_ids)
    stream = TextStream(processor, out)
    t1 = time.perf_counter()
    first = t1
    finish = "length"
    for i, step in enumerate(model.generate(**inputs, stream=True, **settings)):
        token = int(step[0])
        if i == 0:
            first = time.perf_counter()
        if token in eos:
            finish = "eos"
            break
        stream.push(token)
    t2 = time.perf_counter()
    text = stream.close()
    return Reply(text=text, token_ids=stream.ids, finish_reason=finish, prompt_tokens=int(ids.shape[-1]),
                 vision_tokens=vision, preprocess_s=t1 - t0, vision_s=generator_for(model).last_vision_s,
                 first_token_s=first - t1, decode_s=t2 - first)
