"""Chat from Python (notebooks, scripts): one call renders the messages, streams the answer as
text while it is generated, and returns it with its timings.

    from qwen2vl_jax.chat import chat
    reply = chat(model, processor, [{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "Describe it."}]}])
    print(reply.summary())   # prompt 93 tokens (64 vision) | first token 0.21 s | 31 tokens at 45.2 tokens/s

Messages are HF chat messages; image and video items take whatever the Processor takes (paths,
URLs for images, PIL images, arrays, lists of frames for a video). `chat` is the one streaming
consumer: `qwen2vl-generate` prints its answers through it too.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Sequence, TextIO

import numpy as np

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.processing.detokenize import Detokenizer
from qwen2vl_jax.sampling import GenerationConfig


@dataclasses.dataclass
class Reply:
    text: str
    token_ids: list[int]  # the generated tokens, without the EOS
    finish_reason: str  # "stop" (an EOS ended the turn) or "length" (max_new_tokens)
    eos_token_id: int | None  # the token that ended the turn (finish_reason "stop")
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
        n = len(self.token_ids) + (self.finish_reason == "stop") - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        n = len(self.token_ids)
        return (f"prompt {self.prompt_tokens} tokens ({self.vision_tokens} vision) | preprocessing "
                f"{self.preprocess_s:.2f} s | vision tower {self.vision_s:.2f} s | prefill {self.prefill_s:.2f} s | "
                f"{n} token{'s' * (n != 1)} at {self.tokens_per_s:.1f} tokens/s ({self.finish_reason})")


class TextStream:
    """Writes each token's new, complete characters as it comes (`Detokenizer`: control tokens
    left out, grounding markup kept)."""

    def __init__(self, processor, out: TextIO | None):
        self.out = out
        self.ids: list[int] = []
        self.detokenizer = Detokenizer(processor.tokenizer)

    def push(self, token: int) -> None:
        self.ids.append(int(token))
        self._write(self.detokenizer.push(token))

    def close(self) -> str:
        self._write(self.detokenizer.flush() + "\n")
        return self.detokenizer.text

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
         config: GenerationConfig | None = None, **settings) -> Reply:
    """Answers one conversation: the answer is written to `out` as it is generated (None: quiet).

    `settings` override `config` or the model's generation_config (max_new_tokens,
    temperature, top_k, top_p, repetition_penalty, seed, ...); the turn also ends at
    <|im_end|> (`turn_end_ids`) unless eos_token_ids are given."""
    t0 = time.perf_counter()
    inputs = processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="np")
    ids = np.asarray(inputs["input_ids"])
    vision = int(np.isin(ids, [model.config.image_token_id, model.config.video_token_id]).sum())
    if settings.get("eos_token_ids") is None and config is None:
        settings["eos_token_ids"] = turn_end_ids(model, processor)
    generation = model.generation_settings(config, **settings)
    stream = TextStream(processor, out)
    t1 = time.perf_counter()
    first = t1
    finish, end = "length", None
    vision_s = 0.0
    for step in model.stream(inputs, generation):
        token = int(step.ids[0])
        if step.index == 0:
            first, vision_s = time.perf_counter(), step.vision_s
        if step.reason() == "stop":  # the EOS that ended the turn: not part of the text
            finish, end = "stop", token
            break
        stream.push(token)
    t2 = time.perf_counter()
    text = stream.close()
    return Reply(text=text, token_ids=stream.ids, finish_reason=finish, eos_token_id=end,
                 prompt_tokens=int(ids.shape[-1]), vision_tokens=vision, preprocess_s=t1 - t0, vision_s=vision_s,
                 first_token_s=first - t1, decode_s=t2 - first)
