"""The host-side work per request: the prompt's size bounded before any of it is tokenized,
media read, prompt rendered and tokenized (on the preprocessing pools, step by step under the
request's deadline), the vision cache consulted, the generation settings checked against the
context."""

from __future__ import annotations

import hashlib
import importlib.util
import threading
import time

import numpy as np

from qwen2vl_jax.chat import turn_end_ids
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.serving import media
from qwen2vl_jax.serving.metrics import Metrics
from qwen2vl_jax.serving.preprocess import Preprocessor, Ticket
from qwen2vl_jax.serving.schema import Parsed
from qwen2vl_jax.serving.settings import ApiError, Settings

# Text is counted in pieces this long, stopping once the count is over the tokens left: a huge prompt
# costs one piece, not a tokenization of the whole text (the tokenizer's memory grows with its
# input many times over).
COUNT_CHARS = 1 << 15
# A token of the vocabulary can stand for several characters of text (its length in the
# vocabulary's byte-level spelling bounds that); normalization can fold a few characters into one,
# hence the margin on top.
CHARS_MARGIN = 2


def longest_token(tokenizer) -> int:
    """Characters of text one token can stand for at most (its byte-level spelling's length)."""
    try:
        return max(1, max(map(len, tokenizer.backend.get_vocab(with_added_tokens=True))))
    except Exception:  # noqa: BLE001 - another tokenizer: a bound no byte-level BPE vocabulary exceeds
        return 256


def tokens_over(encode, text: str, limit: int) -> int:
    """Counts `text`'s tokens piece by piece, splitting at a space or line break where one is
    near, and stops as soon as the count is certainly over `limit` (each split may add a token,
    so one per split is taken off). -> the count so far, less the splits."""
    count, start, splits = 0, 0, 0
    while start < len(text):
        end = min(start + COUNT_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + COUNT_CHARS // 2, end), text.rfind("\n", start + COUNT_CHARS // 2, end))
            end = cut if cut > start else end
            splits += 1
        count += len(encode(text[start:end]))
        start = end
        if count - splits > limit:
            break
    return count - splits


# ---------------------------------------------------------------------------- the service
class Service:
    """The model, processor and batcher behind the app, and the host-side work per request."""

    def __init__(self, model, processor, batcher, settings: Settings):
        self.model, self.processor, self.batcher, self.settings = model, processor, batcher, settings
        self.metrics = Metrics()
        self.created = int(time.time())
        self.eos_ids = turn_end_ids(model, processor)  # what ends a turn offline ends it here
        self.max_chars = self.max_context * longest_token(processor.tokenizer) * CHARS_MARGIN
        self.preprocessor = Preprocessor(settings.preprocess_workers, settings.max_queue,
                                         lambda: self.batcher.queue_depth)
        self._grammars = None
        self._grammars_lock = threading.Lock()

    @property
    def token_texts(self):
        """Token id -> its text and bytes (logprobs)."""
        from qwen2vl_jax.serving.logprobs import TokenTexts

        if getattr(self, "_token_texts", None) is None:
            self._token_texts = TokenTexts(self.processor.tokenizer)
        return self._token_texts

    def grammars(self):
        """The grammar engine (`grammar.Grammars`), built on first use: a few seconds."""
        with self._grammars_lock:
            if self._grammars is None:
                from qwen2vl_jax.serving.grammar import Grammars

                self._grammars = Grammars(self.processor.tokenizer, self.model.config.text.vocab_size,
                                          eos_ids=self.eos_ids)
            return self._grammars

    def grammar(self, parsed: Parsed):
        """The compiled grammar the request's tokens must follow (response_format, or forced tool
        calls), or None."""
        spec = parsed.grammar_spec
        if spec is None:
            return None
        try:
            return self.grammars().compile(spec)
        except InputError as e:
            raise ApiError(400, str(e), "tools" if parsed.tool_call_grammar else "response_format") from None

    def tool_parser(self, parsed: Parsed):
        """A factory of per-choice tool-call parsers when the request offers tools (else None)."""
        if not parsed.tools or parsed.tool_choice == "none":
            return None
        from qwen2vl_jax.serving.tools import ToolCallStream

        return ToolCallStream

    @property
    def max_context(self) -> int:
        """Cache slots per request: prompt plus generated tokens."""
        return self.batcher.max_context

    # ------------------------------------------------------------ before any work
    def check_size(self, parsed: Parsed) -> bool:
        """Refuses a request whose size alone shows it cannot fit the context (messages, parts,
        characters of text) or carries more media than allowed. Cheap: no tokenizing. -> whether
        it carries media."""
        context, settings = self.max_context, self.settings
        messages = parsed.messages
        if len(messages) > context:
            raise ApiError(400, f"{len(messages)} messages cannot fit the context of {context} tokens", "messages")
        parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
        if len(parts) > context:
            raise ApiError(400, f"{len(parts)} content parts cannot fit the context of {context} tokens", "messages")
        chars = sum(len(m["content"]) for m in messages if isinstance(m["content"], str))
        chars += sum(len(p["text"]) for p in parts if p["type"] == "text")
        if chars > self.max_chars:
            raise ApiError(400, f"the messages' text ({chars} characters) cannot fit the context of {context} tokens "
                                f"(at most {self.max_chars} characters)", "messages")
        n_media = sum(p["type"] != "text" for p in parts)
        if n_media > settings.max_images:
            n_videos = sum(p["type"] == "video" for p in parts)
            what = f"{n_media} images and videos" if n_videos else f"{n_media} images"
            raise ApiError(400, f"{what} are over the server's limit of {settings.max_images} per request "
                                "(--max-images, which counts videos too)", "messages")
        return n_media > 0

    async def preprocess(self, parsed: Parsed, arrived: float, gone=None):
        """`prepare` on the preprocessing pools under the request's deadline (from `arrived`);
        `gone()` returns when the client leaves. -> (input_ids, images, videos, image sizes)."""
        has_media = self.check_size(parsed)
        ticket = Ticket(arrived, self.settings.request_timeout)
        return await self.preprocessor.run(lambda t: self.prepare(parsed, t), ticket, media=has_media, gone=gone)

    # ------------------------------------------------------------ the work (a pool thread)
    def prepare(self, parsed: Parsed, ticket: Ticket | None = None):
        """Reads the media, renders and tokenizes the prompt -> (input_ids, images, videos, each
        image's (width, height) as sent: what grounding boxes are given in). Runs in a worker
        thread; stops between steps once `ticket` says the request is over."""
        from qwen2vl_jax.serving.scheduler import VisionInput

        proc, settings = self.processor, self.settings
        ticket = ticket or Ticket(time.perf_counter(), settings.request_timeout)
        if parsed.prompt is not None:
            return self._plain_prompt(parsed), [], [], []
        self.check_size(parsed)
        left = self.max_context - (parsed.max_tokens or 1)
        encode = proc.tokenizer.encode
        counted = 0
        messages = parsed.messages
        if parsed.renders_tools:  # tools in the system turn, tool calls and answers as Qwen2 writes them
            from qwen2vl_jax.serving.tools import render_messages

            try:
                messages = render_messages(messages, parsed.tools)
            except InputError as e:
                raise ApiError(400, str(e), "messages") from None
        for m in messages:
            texts = [m["content"]] if isinstance(m["content"], str) else \
                [p["text"] for p in m["content"] if p["type"] == "text"]
            for text in texts:
                counted += tokens_over(encode, text, left - counted)
                if counted > left:
                    raise self._too_long(counted, parsed)
                ticket.check()
        hf_messages, images, videos, sizes = [], [], [], []
        ip = proc.image_processor
        for m in messages:
            if isinstance(m["content"], str):
                hf_messages.append(m)
                continue
            content = []
            for p in m["content"]:
                if p["type"] == "text":
                    content.append(p)
                elif p["type"] == "image":
                    ticket.check()
                    data = media.image_bytes(p["url"], p["where"], settings, ticket)
                    w, h = media.image_size(data, p["where"], settings)
                    sizes.append((w, h))
                    lo, hi = self.pixel_budget(parsed, p)
                    counted += self._image_tokens(h, w, p["where"], lo, hi)
                    if counted > left:  # known from the header: refused before decoding
                        raise self._too_long(counted, parsed)
                    key = f"{hashlib.sha256(data).hexdigest()}|{lo}|{hi}|{ip.factor}"
                    # the scheduler looks the key up in its vision cache before the tower
                    out = self._vision(lambda: self._image(data, ticket, lo, hi), p["where"])
                    images.append(VisionInput(out["pixel_values"], out["image_grid_thw"], key))
                    del data
                    content.append({"type": "image", "image": "data"})
                else:
                    ticket.check()
                    path = media.local_path(p["url"], p["where"], settings)
                    if importlib.util.find_spec("av") is None:
                        raise ApiError(400, f"{p['where']}: this server cannot read videos (PyAV is not installed: "
                                            "pip install 'qwen2vl-jax[serve]')", p["where"])
                    ele = {"video": str(path), **self.video_options(parsed, p)}
                    out = self._vision(lambda: self._video(ele, ticket), p["where"])
                    videos.append(VisionInput(out["pixel_values_videos"], out["video_grid_thw"]))
                    content.append({"type": "video", "video": str(path)})
            hf_messages.append({"role": m["role"], "content": content})
        ticket.check()
        try:
            text = proc.apply_chat_template(hf_messages, add_generation_prompt=True)
            merge = ip.merge_size ** 2
            counts = [np.asarray([int(np.prod(v.grid_thw)) // merge for v in items], np.int64)
                      for items in (images, videos)]
            ids = proc.expand_placeholders(proc.tokenizer.encode_batch([text]), *counts)[0]
        except InputError as e:
            raise ApiError(400, str(e), "messages") from None
        return ids.astype(np.int32), images, videos, sizes

    def _plain_prompt(self, parsed: Parsed) -> np.ndarray:
        """A /v1/completions prompt: token ids as given, or the text tokenized as it is (no chat
        template), bounded by the context."""
        left = self.max_context - (parsed.max_tokens or 1)
        if isinstance(parsed.prompt, list):
            ids = np.asarray(parsed.prompt, np.int64)
        else:
            if len(parsed.prompt) > self.max_chars:
                raise ApiError(400, f"the prompt ({len(parsed.prompt)} characters) cannot fit the context of "
                                    f"{self.max_context} tokens", "prompt")
            counted = tokens_over(self.processor.tokenizer.encode, parsed.prompt, left)
            if counted > left:
                raise self._too_long(counted, parsed)
            ids = np.asarray(self.processor.tokenizer.encode(parsed.prompt), np.int64)
        if len(ids) > left:
            raise self._too_long(len(ids), parsed)
        return ids.astype(np.int32)

    def _too_long(self, counted: int, parsed: Parsed) -> ApiError:
        if parsed.max_tokens is None:
            return ApiError(400, f"the prompt (at least {counted} tokens) fills the context of {self.max_context} "
                                 "tokens", "messages")
        return ApiError(400, f"the prompt (at least {counted} tokens) plus max_tokens ({parsed.max_tokens}) is over "
                             f"the context of {self.max_context} tokens", "max_tokens")

    def pixel_budget(self, parsed: Parsed, part: dict) -> tuple[int, int]:
        """An image's (min_pixels, max_pixels): the part's own, else the request's
        mm_processor_kwargs, else the processor's; a max over the server's --max-image-pixels is
        refused."""
        ip = self.processor.image_processor
        asked = {**{k: v for k, v in parsed.vision.items() if k in ("min_pixels", "max_pixels")}, **part["vision"]}
        lo, hi = int(asked.get("min_pixels", ip.min_pixels)), int(asked.get("max_pixels", ip.max_pixels))
        limit = self.settings.max_image_pixels
        for name, value in (("min_pixels", lo), ("max_pixels", hi)):
            if name in asked and value > limit:
                raise ApiError(400, f"{part['where']}: {name} {value} is over the server's limit of {limit} pixels "
                                    "(--max-image-pixels)", "mm_processor_kwargs")
        if lo > hi:
            raise ApiError(400, f"{part['where']}: min_pixels {lo} is over max_pixels {hi}", "mm_processor_kwargs")
        return lo, hi

    def video_options(self, parsed: Parsed, part: dict) -> dict:
        """A video's qwen-vl-utils element options (fps, max_frames, total_pixels, min/max_pixels)
        from the part and the request, max_frames bounded by --max-video-frames."""
        ele = {**parsed.vision, **part["vision"]}
        cap = self.settings.max_video_frames
        if cap:
            if ele.get("max_frames", 0) > cap:
                raise ApiError(400, f"{part['where']}: max_frames {ele['max_frames']} is over the server's limit of "
                                    f"{cap} (--max-video-frames)", "mm_processor_kwargs")
            ele.setdefault("max_frames", cap)
        return ele

    def _image_tokens(self, height: int, width: int, where: str, min_pixels: int, max_pixels: int) -> int:
        """Placeholder tokens an image of this size becomes (the processor's resize rule)."""
        from qwen2vl_jax.processing.image import element_size, smart_resize

        ip = self.processor.image_processor
        try:
            h, w = element_size({}, height, width, ip.factor)
            h, w = smart_resize(h, w, ip.factor, min_pixels, max_pixels)
        except InputError as e:
            raise ApiError(400, f"{where}: {e}", where) from None
        return (h // ip.factor) * (w // ip.factor)

    def _image(self, data: bytes, ticket: Ticket, min_pixels: int, max_pixels: int) -> dict:
        """The image processor's steps for one image, the request checked between them: decode,
        resize, cut into patches (as `image_processor([{"image": data}])`)."""
        from qwen2vl_jax.processing.image import load_image

        ip = self.processor.image_processor
        img = load_image(data, "image")  # decoded, RGB, checked
        ticket.check()
        img = ip.prepare({"image": img}, min_pixels, max_pixels)  # the element's resize, then the processor's
        ticket.check()
        pixel_values, grid = ip.patches(img)
        return {"pixel_values": pixel_values, "image_grid_thw": np.asarray([grid], np.int64)}

    def _video(self, ele: dict, ticket: Ticket) -> dict:
        vp = self.processor.video_processor
        frames = vp.prepare(ele, name="video 1")  # decoded and resized
        ticket.check()
        pixel_values, grid = vp.patches(frames)
        return {"pixel_values_videos": pixel_values, "video_grid_thw": np.asarray([grid], np.int64)}

    @staticmethod
    def _vision(fn, where: str):
        try:
            return fn()
        except InputError as e:
            raise ApiError(400, f"{where}: {e}", where) from None

    def generation_config(self, parsed: Parsed, prompt_tokens: int):
        left = self.max_context - prompt_tokens
        max_tokens = parsed.max_tokens
        if max_tokens is None:
            if left < 1:
                raise ApiError(400, f"the prompt ({prompt_tokens} tokens) fills the context of "
                                    f"{self.max_context} tokens", "messages")
            max_tokens = min(self.settings.default_max_tokens, left)
        elif max_tokens > left:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over the "
                                f"context of {self.max_context} tokens", "max_tokens")
        try:
            return self.model.generation_settings(max_new_tokens=max_tokens, eos_token_ids=self.eos_ids,
                                                  **parsed.settings)
        except InputError as e:
            raise ApiError(400, str(e)) from None
