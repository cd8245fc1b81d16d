"""A job's events turned into the reply: text with stop strings applied, usage, timings, as one
JSON object or as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from qwen2vl_jax import grounding
from qwen2vl_jax.processing.detokenize import Detokenizer
from qwen2vl_jax.serving.schema import Parsed
from qwen2vl_jax.serving.settings import ApiError


async def watch_disconnect(request, job) -> None:
    """Cancels the job when the client goes away (uvicorn answers receive() with
    http.disconnect once the body is read and the connection closes)."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return


class Reply:
    """Turns a job's events into the reply: text with stop strings applied, usage, timings."""

    def __init__(self, service, parsed: Parsed, job, events: asyncio.Queue, arrived: float, prompt_tokens: int,
                 image_sizes=()):
        self.service, self.parsed, self.job, self.events = service, parsed, job, events
        self.arrived, self.prompt_tokens = arrived, prompt_tokens
        self.image_sizes = list(image_sizes)  # (width, height) of the request's images: the boxes' pixels
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.ids: list[int] = []  # every generated token, the EOS included
        self.detokenizer = Detokenizer(service.processor.tokenizer)  # control tokens out, grounding kept
        self.text = ""
        self.sent = 0  # characters of self.text already streamed
        self.finish: str | None = None
        self.last = None
        self.deadline = arrived + service.settings.request_timeout
        self.streamed_ids = 0  # tokens already streamed (return_token_ids)

    # ------------------------------------------------------------ events
    async def _next(self):
        remaining = self.deadline - time.perf_counter()
        try:
            return await asyncio.wait_for(self.events.get(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.job.cancel()
            raise ApiError(504, f"the request took longer than the server's limit of "
                                f"{self.service.settings.request_timeout:g} s (--request-timeout)",
                           code="timeout") from None

    def _take(self, event) -> None:
        """Applies one event: a token (text, stop strings) and/or the end."""
        metrics = self.service.metrics
        now = time.perf_counter()
        if event.finish == "error":
            raise ApiError(400, event.message or "the request failed")
        if event.finish == "cancelled":
            raise ApiError(499, "the request was cancelled")
        if event.token is not None:
            if self.last is None:
                metrics.ttft.observe(now - self.arrived)
            else:
                metrics.per_token.observe(now - self.last)
            self.last = now
            metrics.generated_tokens += 1
            self.ids.append(event.token)
            if event.finish != "stop":  # an EOS ends the text without being part of it
                self.detokenizer.push(event.token)
                self.text = self.detokenizer.text
                if self._apply_stop():
                    return
        if event.finish is not None:
            self.text += self.detokenizer.flush()
            self.finish = event.finish

    def _apply_stop(self) -> bool:
        for s in self.parsed.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                self.finish = "stop"
                self.job.cancel()
                return True
        return False

    def _ready_text(self) -> str:
        """New text safe to send: all of it once finished, else what cannot still turn out to
        be the start of a stop string or an incomplete character."""
        end = len(self.text)
        if self.finish is None:
            if self.text.endswith("\ufffd"):
                end = len(self.text.rstrip("\ufffd"))
            if self.parsed.stop:
                end = min(end, len(self.text) - max(len(s) for s in self.parsed.stop) + 1)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def boxes(self) -> list[dict]:
        """The reply's grounding boxes in pixels of the request's last image (markup that does not
        parse is left out; the text keeps it)."""
        return grounding.boxes_for_images(self.text, self.image_sizes)[0]

    def usage(self) -> dict:
        n = len(self.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    # ------------------------------------------------------------ whole replies
    async def whole(self) -> dict:
        while self.finish is None:
            self._take(await self._next())
        choice = {"index": 0, "message": {"role": "assistant", "content": self.text, "boxes": self.boxes()},
                  "finish_reason": self.finish, "logprobs": None}
        if self.parsed.return_token_ids:
            choice["token_ids"] = list(self.ids)
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.service.settings.model_name, "choices": [choice], "usage": self.usage()}

    # ------------------------------------------------------------ streams
    def _chunk(self, delta: dict, finish: str | None = None, token_ids: list[int] | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.service.settings.model_name, "choices": [choice]}
        if self.parsed.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self, watcher):
        want_ids = self.parsed.return_token_ids
        try:
            yield self._chunk({"role": "assistant", "content": ""}, token_ids=[] if want_ids else None)
            while self.finish is None:
                try:
                    self._take(await self._next())
                except ApiError as e:
                    if e.status == 499:  # the client is gone: nothing to send to
                        return
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                new_ids = self.ids[self.streamed_ids:] if want_ids else None
                self.streamed_ids = len(self.ids)
                text = self._ready_text()
                if text or new_ids:
                    yield self._chunk({"content": text}, token_ids=new_ids)
            if self.finish is not None:
                yield self._chunk({"boxes": self.boxes()}, self.finish)  # the whole text's boxes, once
                if self.parsed.include_usage:
                    body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.service.settings.model_name, "choices": [], "usage": self.usage()}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self.job.cancel()
