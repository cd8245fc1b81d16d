"""The host-side work per request: media read, prompt rendered and tokenized, the vision cache
consulted, the generation settings checked against the context."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from qwen2vl_jax.errors import InputError
from qwen2vl_jax.serving import media
from qwen2vl_jax.serving.metrics import Metrics
from qwen2vl_jax.serving.schema import Parsed
from qwen2vl_jax.serving.settings import ApiError, Settings


# ---------------------------------------------------------------------------- the service
class Service:
    """The model, processor and batcher behind the app, and the host-side work per request."""

    def __init__(self, model, processor, batcher, settings: Settings):
        self.model, self.processor, self.batcher, self.settings = model, processor, batcher, settings
        self.metrics = Metrics()
        self.created = int(time.time())
        eos = list(model.generation_config.eos_token_ids)
        im_end = processor.tokenizer.token_to_id("<|im_end|>")
        self.eos_ids = tuple(dict.fromkeys([*eos, im_end]))

    @property
    def max_context(self) -> int:
        """Cache slots per request: prompt plus generated tokens."""
        return self.batcher.slots.max_context

    def prepare(self, parsed: Parsed):
        """Reads the media, renders and tokenizes the prompt -> (input_ids, images, videos).
        Runs in a worker thread."""
        from qwen2vl_jax.batching import VisionInput

        proc, settings = self.processor, self.settings
        parts = [p for m in parsed.messages if isinstance(m["content"], list) for p in m["content"]]
        n_images = sum(p["type"] == "image" for p in parts)
        if n_images > settings.max_images:
            raise ApiError(400, f"{n_images} images are over the server's limit of {settings.max_images} per request "
                                "(--max-images)", "messages")
        hf_messages, images, videos = [], [], []
        ip = proc.image_processor
        for m in parsed.messages:
            if isinstance(m["content"], str):
                hf_messages.append(m)
                continue
            content = []
            for p in m["content"]:
                if p["type"] == "text":
                    content.append(p)
                elif p["type"] == "image":
                    data = media.image_bytes(p["url"], p["where"], settings)
                    media.check_image_size(data, p["where"], settings)
                    key = f"{hashlib.sha256(data).hexdigest()}|{ip.min_pixels}|{ip.max_pixels}|{ip.factor}"
                    hit = self.batcher.vision_cache.get(key)
                    if hit is not None:
                        images.append(VisionInput(None, hit[0], key, hit[1]))
                    else:
                        out = self._vision(lambda: ip([{"image": data}]), p["where"])
                        images.append(VisionInput(out["pixel_values"], out["image_grid_thw"], key))
                    content.append({"type": "image", "image": "data"})
                else:
                    path = media.local_path(p["url"], p["where"], settings)
                    ele = {"video": str(path)}
                    if settings.max_video_frames:
                        ele["max_frames"] = settings.max_video_frames
                    out = self._vision(lambda: proc.video_processor([ele]), p["where"])
                    videos.append(VisionInput(out["pixel_values_videos"], out["video_grid_thw"]))
                    content.append({"type": "video", "video": str(path)})
            hf_messages.append({"role": m["role"], "content": content})
        try:
            text = proc.apply_chat_template(hf_messages, add_generation_prompt=True)
            merge = ip.merge_size ** 2
            counts = [np.asarray([int(np.prod(v.grid_thw)) // merge for v in items], np.int64)
                      for items in (images, videos)]
            ids = proc._expand(proc.tokenizer.encode_batch([text]), *counts)[0]
        except InputError as e:
            raise ApiError(400, str(e), "messages") from None
        return ids.astype(np.int32), images, videos

    @staticmethod
    def _vision(fn, where: str):
        try:
            return fn()
        except InputError as e:
            raise ApiError(400, f"{where}: {e}", where) from None

    def generation_config(self, parsed: Parsed, prompt_tokens: int):
        room = self.max_context - prompt_tokens
        max_tokens = parsed.max_tokens
        if max_tokens is None:
            if room < 1:
                raise ApiError(400, f"the prompt ({prompt_tokens} tokens) fills the context of "
                                    f"{self.max_context} tokens", "messages")
            max_tokens = min(self.settings.default_max_tokens, room)
        elif max_tokens > room:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over the "
                                f"context of {self.max_context} tokens", "max_tokens")
        try:
            return self.model.generation_settings(max_new_tokens=max_tokens, eos_token_ids=self.eos_ids,
                                                  **parsed.settings)
        except InputError as e:
            raise ApiError(400, str(e)) from None
