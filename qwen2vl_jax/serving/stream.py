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
from qwen2vl_jax.serving.tools import parse_tool_calls


async def watch_disconnect(request, job) -> None:
    """Cancels the job when the client goes away (uvicorn answers receive() with
    http.disconnect once the body is read and the connection closes)."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return


class Choice:
    """One choice of the reply (OpenAI's n): its tokens, text with stop strings applied, logprobs,
    finish, and what of it has been streamed."""

    def __init__(self, index: int, tokenizer, tools=None):
        self.index = index
        self.ids: list[int] = []  # every generated token, the EOS included
        self.detokenizer = Detokenizer(tokenizer)  # control tokens out, grounding kept
        self.text = ""
        self.sent = 0  # characters of self.text already streamed
        self.finish: str | None = None
        self.logprobs: list[dict] = []  # OpenAI's entries, one per token
        self.sent_logprobs = 0
        self.streamed_ids = 0  # tokens already streamed (return_token_ids)
        self.tools = tools  # a tools.ToolCallStream when the request offers tools: splits calls from content


class Reply:
    """Turns a job's events into the reply: per choice, text with stop strings applied, tool
    calls, logprobs; usage, timings."""

    def __init__(self, service, parsed: Parsed, job, events: asyncio.Queue, arrived: float, prompt_tokens: int,
                 image_sizes=(), tool_parser=None):
        self.service, self.parsed, self.job, self.events = service, parsed, job, events
        self.arrived, self.prompt_tokens = arrived, prompt_tokens
        self.image_sizes = list(image_sizes)  # (width, height) of the request's images: the boxes' pixels
        self.completion = parsed.prompt is not None  # /v1/completions: text choices, legacy logprobs
        self.id = f"{'cmpl' if self.completion else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.object = "text_completion" if self.completion else "chat.completion"
        self.created = int(time.time())
        tokenizer = service.processor.tokenizer
        self.choices = [Choice(i, tokenizer, None if tool_parser is None else tool_parser())
                        for i in range(parsed.n)]
        self.last = None
        self._offsets: dict[int, int] = {}  # streamed completions: each choice's text offset so far
        self.deadline = arrived + service.settings.request_timeout
        self.token_texts = service.token_texts if parsed.top_logprobs is not None else None

    @property
    def finished(self) -> bool:
        return all(c.finish is not None for c in self.choices)

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

    def _take(self, event) -> Choice | None:
        """Applies one event: a token of one choice (text, stop strings, logprobs) and/or its
        end -> that choice (None for an event the reply no longer wants)."""
        metrics = self.service.metrics
        now = time.perf_counter()
        if event.finish == "error":
            raise ApiError(400, event.message or "the request failed")
        if event.finish == "cancelled":
            raise ApiError(499, "the request was cancelled")
        choice = self.choices[event.index]
        if choice.finish is not None:  # ended by a stop string: the row's later tokens are dropped
            return None
        if event.token is not None:
            if self.last is None:
                metrics.ttft.observe(now - self.arrived)
            else:
                metrics.per_token.observe(now - self.last)
            self.last = now
            metrics.generated_tokens += 1
            choice.ids.append(event.token)
            if self.token_texts is not None and event.logprob is not None:
                choice.logprobs.append(self.token_texts.entry(event.token, event.logprob, event.top))
            if event.finish != "stop":  # an EOS ends the text without being part of it
                choice.detokenizer.push(event.token)
                choice.text = choice.detokenizer.text
                if self._apply_stop(choice):
                    return choice
        if event.finish is not None:
            choice.text += choice.detokenizer.flush()
            choice.finish = event.finish
        return choice

    def _apply_stop(self, choice: Choice) -> bool:
        for s in self.parsed.stop:
            at = choice.text.find(s, max(0, choice.sent - len(s)))
            if at >= 0:
                choice.text = choice.text[:at]
                choice.finish = "stop"
                self.job.stop_choice(choice.index)
                return True
        return False

    def _ready_text(self, choice: Choice) -> str:
        """New text safe to send: all of it once finished, else what cannot still turn out to
        be the start of a stop string or an incomplete character."""
        end = len(choice.text)
        if choice.finish is None:
            if choice.text.endswith("\ufffd"):
                end = len(choice.text.rstrip("\ufffd"))
            if self.parsed.stop:
                end = min(end, len(choice.text) - max(len(s) for s in self.parsed.stop) + 1)
        end = max(end, choice.sent)
        out, choice.sent = choice.text[choice.sent:end], end
        return out

    def boxes(self, choice: Choice) -> list[dict]:
        """The choice's grounding boxes in pixels of the request's last image (markup that does
        not parse is left out; the text keeps it)."""
        return grounding.boxes_for_images(choice.text, self.image_sizes)[0]

    def usage(self) -> dict:
        """OpenAI's usage; with prefix caching on, prompt_tokens_details.cached_tokens too (the
        prompt tokens whose keys and values were reused)."""
        n = sum(len(c.ids) for c in self.choices)
        out = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}
        if self.service.batcher.prefix_cache is not None:
            out["prompt_tokens_details"] = {"cached_tokens": self.job.cached_tokens}
        return out

    def _logprobs(self, entries: list[dict], offset: int = 0) -> dict | None:
        """OpenAI's logprobs object of these entries: chat's {"content": [...]}, or the
        completions endpoint's columns (tokens, token_logprobs, top_logprobs, text_offset, the
        first token's offset `offset`)."""
        if self.token_texts is None:
            return None
        if not self.completion:
            return {"content": entries}
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def _completion_whole(self) -> dict:
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish, "logprobs": self._logprobs(c.logprobs)}
                   for c in self.choices]
        if self.parsed.return_token_ids:
            for choice, c in zip(choices, self.choices):
                choice["token_ids"] = list(c.ids)
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.service.settings.model_name, "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------ whole replies
    async def whole(self) -> dict:
        while not self.finished:
            self._take(await self._next())
        if self.completion:
            return self._completion_whole()
        choices = []
        for c in self.choices:
            message, finish = {"role": "assistant", "content": c.text}, c.finish
            if c.tools is not None:
                content, calls = parse_tool_calls(c.text)
                if calls:
                    message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                    finish = "tool_calls" if finish == "stop" else finish
            message["boxes"] = self.boxes(c)
            choice = {"index": c.index, "message": message, "finish_reason": finish,
                      "logprobs": self._logprobs(c.logprobs)}
            if self.parsed.return_token_ids:
                choice["token_ids"] = list(c.ids)
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.service.settings.model_name, "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------ streams
    def _chunk(self, index: int, delta: dict, finish: str | None = None, token_ids: list[int] | None = None,
               logprobs: list[dict] | None = None) -> str:
        lp = None if logprobs is None else self._logprobs(logprobs, self._offsets.get(index, 0))
        if self.completion:  # the legacy endpoint's chunk: the text itself, no delta
            choice = {"index": index, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": lp}
            self._offsets[index] = self._offsets.get(index, 0) + sum(len(e["token"]) for e in logprobs or ())
        else:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body = {"id": self.id, "object": self.object if self.completion else "chat.completion.chunk",
                "created": self.created, "model": self.service.settings.model_name, "choices": [choice]}
        if self.parsed.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _progress(self, c: Choice) -> list[str]:
        """The chunks of what choice c has ready: text (or tool-call deltas), its new token ids
        and logprobs; its last chunk with the finish reason once it is finished."""
        want_ids = self.parsed.return_token_ids
        new_ids = c.ids[c.streamed_ids:] if want_ids else None
        c.streamed_ids = len(c.ids)
        new_lp = c.logprobs[c.sent_logprobs:] if self.token_texts is not None else None
        c.sent_logprobs = len(c.logprobs)
        text = self._ready_text(c)
        if c.tools is None:
            deltas = [{"content": text}] if text else []
        else:
            deltas = c.tools.feed(text) + (c.tools.finish() if c.finish is not None else [])
        out = []
        if not deltas and (new_ids or new_lp):
            deltas = [{"content": ""}]
        for i, delta in enumerate(deltas):
            first = i == 0
            if delta.get("content") == "" and not first:
                continue
            out.append(self._chunk(c.index, delta, token_ids=new_ids if first else None,
                                   logprobs=new_lp if first else None))
        if c.finish is not None:
            finish = c.finish
            if c.tools is not None and c.tools.calls and finish == "stop":
                finish = "tool_calls"
            last = {} if self.completion else {"boxes": self.boxes(c)}  # the whole text's boxes, once
            out.append(self._chunk(c.index, last, finish))
        return out

    async def sse(self, watcher):
        want_ids = self.parsed.return_token_ids
        try:
            for c in self.choices if not self.completion else ():
                yield self._chunk(c.index, {"role": "assistant", "content": ""}, token_ids=[] if want_ids else None)
            while not self.finished:
                try:
                    choice = self._take(await self._next())
                except ApiError as e:
                    if e.status == 499:  # the client is gone: nothing to send to
                        return
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                if choice is not None:
                    for chunk in self._progress(choice):
                        yield chunk
            if self.finished and self.parsed.include_usage:
                body = {"id": self.id, "object": self.object if self.completion else "chat.completion.chunk",
                        "created": self.created,
                        "model": self.service.settings.model_name, "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self.job.cancel()
