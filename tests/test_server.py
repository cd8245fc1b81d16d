"""qwen2vl-serve: the OpenAI chat API over continuous batching (qwen2vl_jax.server, .batching).

One server per model for the module (uvicorn in a thread on a free localhost port), driven by
the real `openai` client and raw httpx. Replies are compared token for token with offline greedy
`Qwen2VL.generate` on the same messages (`return_token_ids` puts the ids in the reply).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import re
import time

import numpy as np
import pytest

from qwen2vl_jax.processing.detokenize import reply_text

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key"
MAX_BATCH = 4
MAX_CONTEXT = 384


# ---------------------------------------------------------------------------- helpers
def png(h: int, w: int, seed: int | None) -> bytes:
    """Random pixels (seed None: a flat grey image, which compresses to almost nothing)."""
    from PIL import Image

    if seed is None:
        pixels = np.full((h, w, 3), 128, np.uint8)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts, text: str = "Describe it.") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def offline_messages(messages: list[dict]) -> list[dict]:
    """The same conversation in the form the Processor takes offline."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": p["image_url"]["url"]} if p["type"] == "image_url"
                       else {"type": "video", "video": p["video_url"]["url"].removeprefix("file://")}
                       if p["type"] == "video_url" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def offline(served, messages, max_tokens: int) -> list[int]:
    """Greedy tokens of `Qwen2VL.generate` alone, up to and including the EOS."""
    model, processor = served.model, served.processor
    inputs = processor.apply_chat_template(offline_messages(messages), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)
    eos = served.service.eos_ids
    tokens = model.generate(**inputs, max_new_tokens=max_tokens, eos_token_ids=eos)[0].tolist()
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} is not in /metrics"
    return float(m.group(1))


def wait_for_idle(url: str, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health").json()
        if health["active_slots"] == 0 and health["queue_depth"] == 0 or time.monotonic() > end:
            return health
        time.sleep(0.02)


@dataclasses.dataclass
class Served:
    url: str
    model: object
    processor: object
    service: object
    media: object

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, body, key: str | None = KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        if isinstance(body, (bytes, str)):  # sent as JSON, whatever it holds
            headers["Content-Type"] = "application/json"
            return httpx.post(f"{self.url}/v1/chat/completions", content=body, headers=headers, timeout=120, **kw)
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=120, **kw)


def _serve(tmp_path_factory, model, name: str):
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.serving.app import ServerThread, build_service, create_app
    from qwen2vl_jax.serving.settings import Settings

    media = tmp_path_factory.mktemp(f"media_{name}")
    processor = Processor.from_pretrained(DEMO_DIR)
    settings = Settings(model_name=name, api_key=KEY, media_dir=media, max_images=3, max_image_pixels=512 * 512,
                        max_body_bytes=1 << 20)
    service = build_service(model, processor, max_batch=MAX_BATCH, max_context=MAX_CONTEXT, settings=settings,
                            warm_up_vision=False)  # the images sent compile their own sizes
    server = ServerThread(create_app(service))
    url = server.__enter__()
    return server, Served(url, model, processor, service, media)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model (the demo's shapes, random weights: long, varied answers)."""
    import jax

    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.checkpoint import read_config
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.modules.qwen2vl import init_params

    config = read_config(DEMO_DIR)
    # committed to the device, as a loaded folder's params are: the demo server's programs are
    # then these, read back from the session's compile cache instead of compiled again
    params = jax.device_put(init_params(config, jax.random.PRNGKey(1)), jax.devices()[0])
    model = Qwen2VL(config, params, dtype="float32")
    server, served = _serve(tmp_path_factory, model, "tiny")
    yield served
    server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.config import DEMO_DIR

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("the demo model is not shipped in this checkout")
    server, served = _serve(tmp_path_factory, Qwen2VL.from_pretrained(DEMO_DIR, dtype="float32"), "demo")
    yield served
    server.__exit__(None, None, None)


def ask(served, messages, max_tokens: int, stream: bool = False, **extra) -> tuple[list[int], str, dict]:
    """-> (token ids, text, the reply's finish_reason and usage) through the openai client."""
    client = served.client()
    body = {"return_token_ids": True, **extra}
    if not stream:
        r = client.chat.completions.create(model=served.service.settings.model_name, messages=messages,
                                           max_tokens=max_tokens, extra_body=body)
        choice = r.choices[0]
        return choice.model_extra["token_ids"], choice.message.content, {
            "finish": choice.finish_reason, "usage": r.usage.model_dump()}
    ids, text, finish, usage = [], "", None, None
    chunks = client.chat.completions.create(model=served.service.settings.model_name, messages=messages,
                                            max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, extra_body=body)
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            ids += (choice.model_extra or {}).get("token_ids") or []
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return ids, text, {"finish": finish, "usage": usage}


def check_reply(served, messages, max_tokens: int, stream: bool) -> list[int]:
    ids, text, info = ask(served, messages, max_tokens, stream)
    want = offline(served, messages, max_tokens)
    assert ids == want
    ended = bool(want) and want[-1] in served.service.eos_ids
    assert info["finish"] == ("stop" if ended else "length")
    assert text == reply_text(served.processor.tokenizer, want[:-1] if ended else want)
    assert info["usage"]["completion_tokens"] == len(want)
    prompt = served.processor.apply_chat_template(offline_messages(messages), add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]
    assert info["usage"]["prompt_tokens"] == prompt.shape[1]
    return ids


# ---------------------------------------------------------------------------- replies
def test_replies_equal_offline_generate(tiny):
    from media import write_video

    video = write_video(tiny.media / "clip.mp4", n=8, fps=4, h=56, w=56)
    cases = [
        (user(text="Hello there, who are you?"), 24),
        (user(image_part(data_uri(png(56, 84, 1)))), 20),
        (user(image_part(data_uri(png(84, 56, 2))), image_part(data_uri(png(56, 56, 3))), text="Compare them."), 16),
        (user({"type": "video_url", "video_url": {"url": f"file://{video}"}}, text="What happens?"), 12),
    ]
    for i, (messages, max_tokens) in enumerate(cases):
        ids = check_reply(tiny, messages, max_tokens, stream=bool(i % 2))
        assert len(ids) > 1  # something to compare, not an immediate EOS
    # The same two through the other mode.
    check_reply(tiny, cases[0][0], 24, stream=True)
    check_reply(tiny, cases[3][0], 12, stream=False)


def test_demo_model_replies_equal_offline_generate(demo):
    from qwen2vl_jax.train import synthetic
    import random

    image, _ = synthetic.single_shape(random.Random(3))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    messages = user(image_part(data_uri(buf.getvalue())), text="What shape is this?")
    check_reply(demo, messages, 12, stream=False)
    check_reply(demo, messages, 12, stream=True)
    check_reply(demo, user(text="Say something."), 10, stream=True)


def test_sampling_settings_are_per_request_data(tiny):
    from compile_counter import count_compiles

    messages = user(text="Tell me a story.")
    sampled = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, "seed": 5}
    ask(tiny, messages, 10)  # this prompt's bucket, compiled
    with count_compiles() as c:  # other settings, seeds and lengths are values, not shapes
        a = ask(tiny, messages, 16, **sampled)[0]
        b = ask(tiny, messages, 16, stream=True, **sampled)[0]
        other = ask(tiny, messages, 12, **{**sampled, "seed": 6, "temperature": 1.3})[0]
    assert c["n"] == 0, c
    assert a == b != other[: len(b)]
    # The draws are those of offline generate with the same seed and settings.
    inputs = tiny.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    want = tiny.model.generate(**inputs, max_new_tokens=16, eos_token_ids=tiny.service.eos_ids, **sampled)[0]
    assert len(a) > 1 and a == want[: len(a)].tolist()


def test_concurrent_requests_get_their_own_tokens(tiny):
    sizes = [(56, 56), (56, 84), (84, 56), (84, 84), (112, 56), (56, 112), (112, 84), (84, 112)]
    jobs = [(user(image_part(data_uri(png(h, w, 10 + i))), text="What is this?" + " Tell me." * i), 6 + 3 * i)
            for i, (h, w) in enumerate(sizes)]
    want = [offline(tiny, m, n) for m, n in jobs]
    steps = metric(tiny.url, "qwen2vl_decode_steps_total")
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: ask(tiny, *job, stream=job[1] % 2 == 0)[0], jobs))
    assert got == want
    # They shared decode steps: fewer steps than the tokens they asked for one at a time.
    assert metric(tiny.url, "qwen2vl_decode_steps_total") - steps < sum(len(w) - 1 for w in want)


def test_disconnect_frees_the_slot(tiny):
    generated = metric(tiny.url, "qwen2vl_generation_tokens_total")
    body = {"model": "tiny", "messages": user(text="Count for ever."), "max_tokens": 300, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{tiny.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():  # leave after the first token
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
    health = wait_for_idle(tiny.url)
    assert health["active_slots"] == 0 and health["queue_depth"] == 0
    assert metric(tiny.url, "qwen2vl_generation_tokens_total") - generated < 300
    check_reply(tiny, user(text="Still there?"), 8, stream=False)


# ---------------------------------------------------------------------------- bad input
def test_bad_requests_get_error_objects(tiny):
    tiny_png, big_png = png(8, 8, 0), png(600, 600, None)
    outside = tiny.media.parent / "outside.png"
    outside.write_bytes(png(56, 56, 4))
    inside = tiny.media / "inside.png"
    inside.write_bytes(png(56, 56, 4))
    ok = {"model": "tiny", "messages": user(text="hi"), "max_tokens": 4}
    cases = [
        ("malformed JSON", b'{"messages": [', KEY, 400),
        ("missing key", ok, None, 401),
        ("wrong key", ok, "nope", 401),
        ("unknown role", {**ok, "messages": [{"role": "wizard", "content": "hi"}]}, KEY, 400),
        ("unknown part", {**ok, "messages": user({"type": "input_audio", "input_audio": {}})}, KEY, 400),
        ("undecodable image", {**ok, "messages": user(image_part("data:image/png;base64,"
                                                                  + base64.b64encode(b"not a png").decode()))},
         KEY, 400),
        ("tiny image", {**ok, "messages": user(image_part(data_uri(tiny_png)))}, KEY, 400),
        ("too large image", {**ok, "messages": user(image_part(data_uri(big_png)))}, KEY, 400),
        ("too many images", {**ok, "messages": user(*[image_part(data_uri(png(56, 56, 5)))] * 4)}, KEY, 400),
        ("prompt over context", {**ok, "messages": user(text="word " * 500)}, KEY, 400),
        ("max_tokens over the limit", {**ok, "max_tokens": MAX_CONTEXT}, KEY, 400),
        ("bad temperature", {**ok, "temperature": -1}, KEY, 400),
        ("body too large", {**ok, "messages": user(text="x" * (1 << 20))}, KEY, 413),
        ("file outside --media-dir", {**ok, "messages": user(image_part(f"file://{outside}"))}, KEY, 403),
        ("remote image without --allow-remote-media", {**ok, "messages": user(image_part("http://example.com/a.png"))},
         KEY, 403),
    ]
    for what, body, key, status in cases:
        r = tiny.post(body, key=key)
        assert r.status_code == status, (what, r.status_code, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] and set(error) == {"message", "type", "param", "code"}, what
    assert tiny.post({**ok, "messages": user(image_part(f"file://{inside}"))}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        tiny.client("wrong").models.list()
    assert [m.id for m in tiny.client().models.list().data] == ["tiny"]
    assert httpx.get(f"{tiny.url}/health").json()["status"] == "ok"
    assert metric(tiny.url, 'qwen2vl_requests_total{status="401"}') >= 2


def test_full_queue_is_429(tiny):
    batcher = tiny.service.batcher
    batcher.max_queue = 0  # no room: every request finds the queue full
    try:
        r = tiny.post({"model": "tiny", "messages": user(text="hi"), "max_tokens": 4})
        with pytest.raises(openai.RateLimitError, match="busy"):
            ask(tiny, user(text="hi"), 4)
    finally:
        batcher.max_queue = 64
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
    assert metric(tiny.url, 'qwen2vl_requests_total{status="429"}') >= 2
    check_reply(tiny, user(text="hi"), 4, stream=False)  # served again once there is room


def test_timeout_is_a_clear_error(tiny):
    service = tiny.service
    settings = service.settings
    service.settings = dataclasses.replace(settings, request_timeout=1e-4)
    try:
        r = tiny.post({"model": "tiny", "messages": user(text="hi"), "max_tokens": 50, "ignore_eos": True})
    finally:
        service.settings = settings
    assert r.status_code == 504
    assert "--request-timeout" in r.json()["error"]["message"]
    assert wait_for_idle(tiny.url)["active_slots"] == 0


def test_stop_strings_end_the_reply(tiny):
    messages = user(text="Say a few words.")
    _, text, info = ask(tiny, messages, 24)
    assert info["finish"] == "length" and len(text) > 8
    stop = text[len(text) // 2: len(text) // 2 + 3]
    want = text[: text.find(stop)]
    for stream in (False, True):
        _, got, info = ask(tiny, messages, 24, stream=stream, stop=[stop, "never in the text"])
        assert (got, info["finish"]) == (want, "stop")
    assert wait_for_idle(tiny.url)["active_slots"] == 0


def test_vision_cache(tiny):
    first, other = data_uri(png(56, 56, 20)), data_uri(png(56, 56, 21))
    hits, misses = (metric(tiny.url, f"qwen2vl_vision_cache_{k}_total") for k in ("hits", "misses"))
    a = ask(tiny, user(image_part(first)), 6)[0]
    assert metric(tiny.url, "qwen2vl_vision_cache_misses_total") == misses + 1
    assert ask(tiny, user(image_part(first)), 6)[0] == a  # from the cache, the same answer
    assert metric(tiny.url, "qwen2vl_vision_cache_hits_total") == hits + 1
    ask(tiny, user(image_part(other)), 6)
    assert metric(tiny.url, "qwen2vl_vision_cache_hits_total") == hits + 1
    assert metric(tiny.url, "qwen2vl_vision_cache_misses_total") == misses + 2


def test_queue_is_bounded():
    from qwen2vl_jax.serving.scheduler import Batcher, QueueFull, Request, VisionCache

    class Slots:  # the batcher's queue never touches the engine before start()
        max_batch = 2

    batcher = Batcher(Slots(), None, max_queue=1, vision_cache=VisionCache())
    req = lambda: Request(np.zeros(3, np.int32), [], [], None, lambda e: None)  # noqa: E731
    batcher.submit(req())
    with pytest.raises(QueueFull, match="holds 1"):
        batcher.submit(req())


def test_vision_cache_is_bounded():
    from qwen2vl_jax.serving.vision_cache import VisionCache

    cache = VisionCache(max_entries=2)
    grid = np.array([[1, 2, 2]])
    for k in "abc":
        cache.put(k, grid, np.full((1, 4), ord(k), np.float32))
    assert cache.get("a") is None and cache.get("c")[1][0, 0] == ord("c") and len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 1)


def test_parser_flags():
    from qwen2vl_jax.serving.cli import build_parser, main

    args = build_parser().parse_args(["--max-batch", "8", "--media-dir", "/tmp", "--allow-remote-media"])
    assert (args.max_batch, args.media_dir, args.allow_remote_media, args.port, args.host) == (
        8, "/tmp", True, 8000, "127.0.0.1")
    assert main(["--model", "/no/such/folder"]) == 2
