"""The served edge cases, each against offline `Qwen2VL.generate` on the same prompt and settings.

One real server over a tiny random model (the demo's shapes, random weights) with 4 slots of
320 cache slots, so the context buckets are 256 and 320 and a boundary is cheap to reach:
- two requests decoded together in slots 0 and 1, one greedy and one seeded and sampled;
- prompts whose prompt + max_tokens is 256 (a context bucket), 257 and 258 (the first steps
  over the next bucket), and 320 (the whole context);
- max_tokens equal to the room the prompt leaves (200), and one more (400 naming max_tokens);
- an image sent again after the pixel budget changed (the vision cache misses);
- a stop string that starts inside one token and ends inside the next;
- the usage of a reply that ended on an end-of-sequence token.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import inspect
import io
import json
import pkgutil
import re

import numpy as np
import pytest

from qwen2vl_jax.processing.detokenize import reply_text

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "case-key"
MAX_BATCH = 4
MAX_CONTEXT = 320  # context buckets (256, 320)
BOUNDARY = 256
EOS_PROMPT = "Who are you?"  # the prompt whose greedy reply ends on an end-of-sequence token


# ---------------------------------------------------------------------------- helpers
def serving(name: str):
    """A name of the serving code, from wherever it lives (the serving package or its modules,
    or the single server module)."""
    modules = []
    try:
        pkg = importlib.import_module("qwen2vl_jax.serving")
        modules.append(pkg)
        modules += [f"qwen2vl_jax.serving.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    except ImportError:
        pass
    modules.append("qwen2vl_jax.server")
    for mod in modules:
        if isinstance(mod, str):
            try:
                mod = importlib.import_module(mod)
            except ImportError:
                continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise ImportError(f"no serving module defines {name}")


def png(h: int, w: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(*parts, text: str) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def offline_messages(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": [{"type": "image", "image": p["image_url"]["url"]}
                                            if p["type"] == "image_url" else p for p in m["content"]]}
            for m in messages]


@dataclasses.dataclass
class Served:
    url: str
    model: object
    processor: object
    service: object

    @property
    def eos(self) -> tuple:
        return tuple(self.service.eos_ids)

    def inputs(self, messages) -> dict:
        return self.processor.apply_chat_template(offline_messages(messages), add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)

    def prompt_tokens(self, messages) -> int:
        return int(self.inputs(messages)["input_ids"].shape[1])

    def offline(self, messages, max_tokens: int, ignore_eos: bool = False, **settings) -> list[int]:
        """`Qwen2VL.generate` alone: the tokens up to and including the first end-of-sequence
        token (every token when ignore_eos)."""
        eos = () if ignore_eos else self.eos
        tokens = self.model.generate(**self.inputs(messages), max_new_tokens=max_tokens, eos_token_ids=eos,
                                     **settings)[0].tolist()
        for i, t in enumerate(tokens):
            if t in eos:
                return tokens[: i + 1]
        return tokens

    def text(self, tokens: list[int]) -> str:
        return reply_text(self.processor.tokenizer, tokens)

    def body(self, messages, max_tokens: int, **extra) -> dict:
        return {"model": "cases", "messages": messages, "max_tokens": max_tokens, "return_token_ids": True, **extra}

    def post(self, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    def ask(self, messages, max_tokens: int, **extra) -> dict:
        """A whole reply -> {ids, text, finish, usage}."""
        r = self.post(self.body(messages, max_tokens, **extra))
        assert r.status_code == 200, r.text
        reply = r.json()
        choice = reply["choices"][0]
        return {"ids": choice["token_ids"], "text": choice["message"]["content"], "finish": choice["finish_reason"],
                "usage": reply["usage"]}

    def events(self, messages, max_tokens: int, **extra):
        """A streamed reply's chunks, as they come (the usage chunk included)."""
        body = self.body(messages, max_tokens, stream=True, stream_options={"include_usage": True}, **extra)
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    yield json.loads(line[6:])

    @staticmethod
    def collect(chunks) -> dict:
        out = {"ids": [], "text": "", "finish": None, "usage": None}
        for chunk in chunks:
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            for choice in chunk["choices"]:
                out["ids"] += choice.get("token_ids") or []
                out["text"] += choice["delta"].get("content") or ""
                out["finish"] = choice["finish_reason"] or out["finish"]
        return out

    def stream(self, messages, max_tokens: int, **extra) -> dict:
        return self.collect(self.events(messages, max_tokens, **extra))

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} is not in /metrics"
        return float(m.group(1))


@pytest.fixture(scope="module")
def served():
    """A server over a tiny random model whose end-of-sequence ids are its generation config's
    plus the fourth distinct token it answers EOS_PROMPT with (a random model never reaches the
    real one), so a greedy reply can end on one."""
    import jax

    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.checkpoint import read_config
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.modules.qwen2vl import init_params
    from qwen2vl_jax.processing import Processor

    config = read_config(DEMO_DIR)
    processor = Processor.from_pretrained(DEMO_DIR)
    # committed to the device, as a loaded folder's params are (the programs of the other
    # demo-shaped servers, read back from the session's compile cache)
    params = jax.device_put(init_params(config, jax.random.PRNGKey(1)), jax.devices()[0])
    model = Qwen2VL(config, params, dtype="float32")
    probe = Served("", model, processor, None)
    inputs = probe.inputs(user(text=EOS_PROMPT))
    tokens = model.generate(**inputs, max_new_tokens=12, eos_token_ids=())[0].tolist()
    end = next(t for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])
    generation = model.generation_config
    model.generation_config = generation.replace(eos_token_ids=(*generation.eos_token_ids, end))

    Settings, build_service = serving("Settings"), serving("build_service")
    create_app, ServerThread = serving("create_app"), serving("ServerThread")
    settings = Settings(model_name="cases", api_key=KEY, max_image_pixels=512 * 512, max_body_bytes=1 << 20)
    # no warm-up: only the buckets these cases use compile, when they first come
    cold = {"warm_up": False} if "warm_up" in inspect.signature(build_service).parameters else {}
    service = build_service(model, processor, max_batch=MAX_BATCH, max_context=MAX_CONTEXT, settings=settings,
                            **cold)
    server = ServerThread(create_app(service))
    url = server.__enter__()
    served = Served(url, model, processor, service)
    assert end in served.eos
    yield served
    server.__exit__(None, None, None)


def context_buckets(served):
    """The decode step's context buckets where the service shows them (None elsewhere)."""
    slots = getattr(getattr(served.service, "batcher", None), "slots", None)
    return getattr(slots, "context_buckets", None)


def long_prompt(served, tokens: int) -> list[dict]:
    """A text prompt of exactly `tokens` tokens (one per repeated word)."""
    base = served.prompt_tokens(user(text="word"))
    messages = user(text="word" + " word" * (tokens - base))
    assert served.prompt_tokens(messages) == tokens
    return messages


# ---------------------------------------------------------------------------- cases
def test_greedy_and_seeded_sampled_rows_decoded_together(served):
    """A greedy request (slot 0, 200 tokens) and a seeded sampled one admitted while it runs
    (slot 1): each equals offline generate alone with its own settings, and they shared steps."""
    greedy_messages, long_n = user(text="Tell me a story."), 200
    sampled_messages = user(text="Name a color.")
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.05, "seed": 11}
    want_greedy = served.offline(greedy_messages, long_n, ignore_eos=True)
    want_sampled = served.offline(sampled_messages, 24, **sampled)
    assert len(want_sampled) > 4 and want_sampled != served.offline(sampled_messages, 24)[: len(want_sampled)]
    assert httpx.get(f"{served.url}/health").json()["active_slots"] == 0
    steps = served.metric("qwen2vl_decode_steps_total")

    chunks, other = [], None
    for chunk in served.events(greedy_messages, long_n, ignore_eos=True):
        chunks.append(chunk)
        if other is None and any(c.get("token_ids") for c in chunk["choices"]):  # slot 0 is decoding
            other = served.ask(sampled_messages, 24, **sampled)
    greedy = Served.collect(chunks)
    assert greedy["ids"] == want_greedy and greedy["finish"] == "length"
    assert other["ids"] == want_sampled
    assert other["text"] == served.text(want_sampled[:-1] if want_sampled[-1] in served.eos else want_sampled)
    # decoded together: fewer steps than the two one after the other
    shared = (long_n - 1) + (len(want_sampled) - 1) - (served.metric("qwen2vl_decode_steps_total") - steps)
    assert shared > 0, "the two requests were not decoded together"


@pytest.mark.parametrize("past", [0, 1, 2])
def test_prompt_and_tokens_on_a_context_bucket_boundary(served, past):
    """prompt + max_tokens = 256 + past: the last step attends over exactly 255 + past slots,
    so past=2 is the first that needs the 320-slot bucket. Every case equals offline."""
    assert context_buckets(served) in (None, (BOUNDARY, MAX_CONTEXT))
    messages = long_prompt(served, 240)
    n = BOUNDARY - 240 + past
    want = served.offline(messages, n, ignore_eos=True)
    got = served.ask(messages, n, ignore_eos=True)
    assert got["ids"] == want and len(want) == n and got["finish"] == "length"
    assert got["text"] == served.text(want)
    assert got["usage"] == {"prompt_tokens": 240, "completion_tokens": n, "total_tokens": 240 + n}


def test_max_tokens_equal_to_the_room_left(served):
    """max_tokens = the context left after the prompt: 200, every slot used, offline's tokens;
    one more: a 400 error object naming max_tokens."""
    messages = long_prompt(served, 240)
    room = MAX_CONTEXT - 240
    want = served.offline(messages, room, ignore_eos=True)
    for got in (served.ask(messages, room, ignore_eos=True), served.stream(messages, room, ignore_eos=True)):
        assert got["ids"] == want and len(want) == room and got["finish"] == "length"
        assert got["text"] == served.text(want)
        assert got["usage"]["completion_tokens"] == room and got["usage"]["prompt_tokens"] == 240
    for stream in (False, True):
        r = served.post(served.body(messages, room + 1, ignore_eos=True, stream=stream))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "max_tokens" and "max_tokens" in error["message"], error
        assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{served.url}/health").json()["active_slots"] == 0


def test_image_again_after_the_pixel_budget_changed(served):
    """The same 112x112 image at the default budget (16 image tokens), again (a cache hit),
    then with max_pixels 56*56 (4 tokens): the cache misses and the reply equals offline at
    the new budget; back at the old budget it hits again with the first reply."""
    messages = user(image_part(data_uri(png(112, 112, 30))), text="What is this?")
    hits, misses = served.metric("qwen2vl_vision_cache_hits_total"), served.metric("qwen2vl_vision_cache_misses_total")
    first = served.ask(messages, 8)
    assert first["ids"] == served.offline(messages, 8)
    assert served.ask(messages, 8)["ids"] == first["ids"]
    assert served.metric("qwen2vl_vision_cache_hits_total") == hits + 1
    assert served.metric("qwen2vl_vision_cache_misses_total") == misses + 1
    processor = served.processor
    assert processor is served.service.processor
    old = processor.image_processor
    processor.image_processor = dataclasses.replace(old, max_pixels=56 * 56)
    try:
        want = served.offline(messages, 8)
        small = served.ask(messages, 8)
        assert served.metric("qwen2vl_vision_cache_misses_total") == misses + 2
        assert served.metric("qwen2vl_vision_cache_hits_total") == hits + 1
        assert small["ids"] == want
        assert small["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"] - 12 == served.prompt_tokens(messages)
    finally:
        processor.image_processor = old
    assert served.ask(messages, 8)["ids"] == first["ids"]
    assert served.metric("qwen2vl_vision_cache_hits_total") == hits + 2


def test_stop_string_across_a_token_boundary(served):
    """A stop string made of the last three characters of one generated token and the first of
    the next (so a stream must hold back all but one of its characters while the first token is
    the last one seen): whole and streamed replies give the offline text cut where it starts."""
    messages = user(text="Say a few words.")
    tokens = served.offline(messages, 24, ignore_eos=True)
    full = served.text(tokens)
    prefixes = [served.text(tokens[: i + 1]) for i in range(len(tokens))]
    stop = None
    for i in range(1, len(tokens) - 1):
        a, b, c = prefixes[i - 1], prefixes[i], prefixes[i + 1]
        if not (full.startswith(c) and c.startswith(b) and b.startswith(a)) or "\ufffd" in c:
            continue
        piece, following = b[len(a):], c[len(b):]
        if len(piece) >= 3 and following:
            candidate = piece[-3:] + following[:1]
            if full.find(candidate) == len(b) - 3:  # its first occurrence straddles this boundary
                stop, cut = candidate, len(b) - 3
                break
    assert stop is not None, f"no token boundary to put a stop string across in {full!r}"
    want = full[:cut]
    # one stop string: a stream holds back as many characters as the longest one needs
    whole = served.ask(messages, 24, ignore_eos=True, stop=stop)
    streamed = served.stream(messages, 24, ignore_eos=True, stop=stop)
    assert (whole["text"], whole["finish"]) == (want, "stop")
    assert (streamed["text"], streamed["finish"]) == (want, "stop")
    for got in (whole, streamed):  # the tokens that made the text are offline's
        assert got["ids"] == tokens[: len(got["ids"])] and len(got["ids"]) >= i + 2


def test_usage_of_a_reply_ended_by_an_eos(served):
    """A greedy reply that ends on an end-of-sequence token: finish "stop", the token ids are
    offline's including that token, the text leaves it out, and completion_tokens counts it."""
    messages = user(text=EOS_PROMPT)
    want = served.offline(messages, 24)
    assert 2 < len(want) < 24 and want[-1] in served.eos
    n = served.prompt_tokens(messages)
    usage = {"prompt_tokens": n, "completion_tokens": len(want), "total_tokens": n + len(want)}
    for got in (served.ask(messages, 24), served.stream(messages, 24)):
        assert got["ids"] == want and got["finish"] == "stop"
        assert got["text"] == served.text(want[:-1])
        assert got["usage"] == usage
