"""The request surface beyond plain chat, each against the real `openai` client and a real
server: logprobs (against log-softmax of `Qwen2VL.logits`), n choices, per-request pixel
budgets (mm_processor_kwargs), and every new field's bad values as a 400 with an error object."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MAX_BATCH = 4
MAX_CONTEXT = 1024  # the tools section alone is ~600 tokens of the demo tokenizer


def png(h: int, w: int, seed: int = 0) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def server():
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.serving.app import ServerThread, build_service, create_app
    from qwen2vl_jax.serving.settings import Settings

    model = Qwen2VL.from_pretrained(DEMO_DIR, dtype="float32")
    processor = Processor.from_pretrained(DEMO_DIR)
    service = build_service(model, processor, max_batch=MAX_BATCH, max_context=MAX_CONTEXT,
                            settings=Settings(model_name="demo"), warm_up=False)
    with ServerThread(create_app(service)) as url:
        yield url, model, processor, service


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


QUESTION = [{"role": "user", "content": "What shape is red?"}]


def reference_logprobs(model, processor, messages, tokens) -> np.ndarray:
    """log-softmax of the model's logits at each generated position: f32[len(tokens), V]."""
    import jax

    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    full = np.concatenate([np.asarray(ids), np.asarray(tokens[:-1])[None]], axis=1)
    logits = np.asarray(model.logits(full))[0, ids.shape[1] - 1:]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def test_logprobs_are_the_models_distribution_plain_and_streamed(server, client):
    url, model, processor, service = server
    reply = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True,
                                                                                      "ignore_eos": True})
    choice = reply.choices[0]
    tokens = choice.token_ids
    entries = choice.logprobs.content
    assert len(entries) == len(tokens) == 6
    ref = reference_logprobs(model, processor, QUESTION, tokens)
    texts = service.token_texts
    for i, (t, entry) in enumerate(zip(tokens, entries)):
        assert abs(entry.logprob - ref[i, t]) < 1e-4, (i, entry.logprob, ref[i, t])
        assert len(entry.top_logprobs) == 3
        best = np.argsort(-ref[i])[:3]
        assert [texts(int(b))[0] for b in best] == [a.token for a in entry.top_logprobs]
        np.testing.assert_allclose([a.logprob for a in entry.top_logprobs], ref[i, best], atol=1e-4)
        assert entry.token == texts(t)[0] and entry.bytes == texts(t)[1]
        assert entry.top_logprobs[0].token == entry.token  # greedy: the drawn token is the most likely
    assert "".join(e.token for e in entries).startswith(choice.message.content[:1])

    streamed = []
    for chunk in client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True,
                                                extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed += c.logprobs.content
    assert [e.token for e in streamed] == [e.token for e in entries]
    np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in entries], atol=1e-5)

    plain = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_n_choices_prefilled_once_and_drawn_apart(server, client):
    settings = dict(model="demo", messages=QUESTION, max_tokens=8, temperature=1.5, seed=11,
                    extra_body={"return_token_ids": True, "ignore_eos": True})
    one = client.chat.completions.create(**settings)
    many = client.chat.completions.create(n=3, **settings)
    assert [c.index for c in many.choices] == [0, 1, 2]
    # choice 0 draws as the lone request with the same seed; the others draw apart
    assert many.choices[0].token_ids == one.choices[0].token_ids
    assert len({tuple(c.token_ids) for c in many.choices}) == 3
    assert all(c.finish_reason == "length" for c in many.choices)
    assert many.usage.completion_tokens == 24

    streamed = {i: [] for i in range(3)}
    finishes = {}
    for chunk in client.chat.completions.create(n=3, stream=True, **settings):
        for c in chunk.choices:
            streamed[c.index] += getattr(c, "token_ids", None) or []
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [streamed[i] for i in range(3)] == [c.token_ids for c in many.choices]
    assert finishes == {0: "length", 1: "length", 2: "length"}

    greedy = client.chat.completions.create(n=2, model="demo", messages=QUESTION, max_tokens=5, temperature=0)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_stop_string_ends_one_choice_only(server, client):
    settings = dict(model="demo", messages=QUESTION, max_tokens=10, temperature=1.5, seed=5,
                    extra_body={"ignore_eos": True})
    texts = [c.message.content for c in client.chat.completions.create(n=3, **settings).choices]
    # a stop string taken from choice 0's text cuts that choice; one absent from another leaves it whole
    stop = texts[0][2:5]
    cut = client.chat.completions.create(n=3, stop=[stop], **settings)
    for before, after in zip(texts, (c.message.content for c in cut.choices)):
        assert after == (before[:before.find(stop)] if stop in before else before)
    assert cut.choices[0].finish_reason == "stop"


def test_pixel_budget_per_request_and_per_part(server, client):
    url, model, processor, service = server
    image = png(448, 448)

    def tokens(content, **kw):
        reply = client.chat.completions.create(model="demo", max_tokens=1,
                                               messages=[{"role": "user", "content": content}], **kw)
        return reply.usage.prompt_tokens

    part = {"type": "image_url", "image_url": {"url": image}}
    text = {"type": "text", "text": "What is it?"}
    full = tokens([part, text])  # the processor's budget (the demo's: 112 x 112 at most)
    big = tokens([part, text], extra_body={"mm_processor_kwargs": {"max_pixels": 224 * 224}})
    small = tokens([{"type": "image_url", "image_url": {"url": image, "max_pixels": 56 * 56}}, text],
                   extra_body={"mm_processor_kwargs": {"max_pixels": 224 * 224}})  # the part's own wins
    # the offline processor with the same budget counts the same placeholder tokens
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1])))
    merge = processor.image_processor.merge_size ** 2

    def count(**budget) -> int:
        return int(np.prod(processor.image_processor(images=[img], **budget)["image_grid_thw"])) // merge

    text_tokens = full - count()
    assert big == text_tokens + count(max_pixels=224 * 224) > full
    assert small == text_tokens + count(max_pixels=56 * 56) < full
    # the budget is part of the vision cache key: the full image again still counts in full
    assert tokens([part, text]) == full


@pytest.mark.parametrize("extra,param", [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 5}, None),  # over --max-batch 4
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format.type"), ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                   "function": {"name": "g"}}},
     "tool_choice"),
    ({"mm_processor_kwargs": {"max_pixel": 5}}, "mm_processor_kwargs.max_pixel"),
    ({"mm_processor_kwargs": {"min_pixels": 900, "max_pixels": 800}}, "mm_processor_kwargs"),
    ({"mm_processor_kwargs": {"max_pixels": -1}}, "max_pixels"),
])
def test_bad_values_of_the_new_fields_are_400s(server, extra, param):
    url = server[0]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "demo", "messages": QUESTION, "max_tokens": 2, **extra},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


SCHEMA = {"type": "object", "properties": {"shape": {"enum": ["circle", "square", "triangle"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "big": {"type": "boolean"}},
          "required": ["shape", "count", "big"], "additionalProperties": False}


def check_schema(text: str) -> dict:
    import json

    value = json.loads(text)
    assert set(value) == {"shape", "count", "big"}
    assert value["shape"] in ("circle", "square", "triangle") and 0 <= value["count"] <= 9
    assert isinstance(value["count"], int) and isinstance(value["big"], bool)
    return value


def test_json_schema_replies_always_parse_and_validate(server, client):
    pytest.importorskip("llguidance")
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    reply = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=60, temperature=1.0, seed=3,
                                           n=3, response_format=fmt, extra_body={"ignore_eos": True})
    for c in reply.choices:
        check_schema(c.message.content)
        assert c.finish_reason == "stop"  # EOS forced once the object is complete
    text = ""
    for chunk in client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=60, temperature=0,
                                                response_format=fmt, stream=True):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    check_schema(text)
    obj = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})
    import json

    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    # rows without a grammar decode beside them as before
    plain = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=5, temperature=0)
    assert plain.choices[0].message.content and not plain.choices[0].message.content.startswith("{")


TOOLS = [{"type": "function", "function": {"name": "count_shapes", "description": "Counts shapes of a colour.",
                                           "parameters": {"type": "object", "properties": {
                                               "colour": {"enum": ["red", "green", "blue"]},
                                               "limit": {"type": "integer", "minimum": 1, "maximum": 5}},
                                               "required": ["colour", "limit"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                           "additionalProperties": False}}}]


def test_forced_tool_calls_are_well_formed_whole_and_streamed(server, client):
    pytest.importorskip("llguidance")
    import json

    named = {"type": "function", "function": {"name": "count_shapes"}}
    reply = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=80, temperature=0,
                                           tools=TOOLS, tool_choice=named)
    c = reply.choices[0]
    assert c.finish_reason == "tool_calls"
    calls = c.message.tool_calls
    assert calls and all(call.function.name == "count_shapes" for call in calls)
    args = json.loads(calls[0].function.arguments)
    assert args["colour"] in ("red", "green", "blue") and 1 <= args["limit"] <= 5

    streamed, finish = {}, None
    for chunk in client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=80, temperature=0,
                                                tools=TOOLS, tool_choice=named, stream=True):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                entry = streamed.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert [(e["name"], json.loads(e["arguments"])) for e in streamed.values()] == \
        [(call.function.name, json.loads(call.function.arguments)) for call in calls]

    required = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=80, temperature=1.0,
                                              seed=2, tools=TOOLS, tool_choice="required")
    assert required.choices[0].message.tool_calls
    assert all(call.function.name in ("count_shapes", "noop") for call in required.choices[0].message.tool_calls)


def test_tool_turns_are_rendered_and_fed_back(server, client):
    from qwen2vl_jax.serving.tools import render_messages

    url, model, processor, service = server
    call = {"id": "call_1", "type": "function", "function": {"name": "count_shapes",
                                                              "arguments": '{"colour": "red", "limit": 2}'}}
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    reply = client.chat.completions.create(model="demo", messages=history, max_tokens=2, tools=TOOLS)
    rendered = render_messages(history, TOOLS)
    text = processor.apply_chat_template(rendered, add_generation_prompt=True)
    assert "<tool_response>\n2\n</tool_response>" in text and "<tools>" in text
    assert reply.usage.prompt_tokens == len(processor.tokenizer.encode(text))
    # tool_choice none: no parsing, no grammar (the tools still shown to the model)
    none = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=3, tools=TOOLS,
                                          tool_choice="none")
    assert none.choices[0].message.tool_calls is None


def test_completions_endpoint_text_and_token_prompts(server, client):
    url, model, processor, service = server
    prompt = "A red circle and a blue"
    ids = processor.tokenizer.encode(prompt)
    offline = model.generate(np.asarray([ids]), max_new_tokens=6, eos_token_ids=())[0].tolist()
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = reply.choices[0]
    assert reply.object == "text_completion" and choice.token_ids == offline
    assert choice.text == processor.tokenizer.decode(offline)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) >= lp_i - 1e-6 for top, lp_i in zip(lp.top_logprobs, lp.token_logprobs))
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 6

    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == choice.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt=prompt, max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert streamed == choice.text
    assert client.completions.create(model="demo", prompt=prompt).usage.completion_tokens <= 16  # OpenAI's default

    for bad, param in [({"prompt": ""}, "prompt"), ({"prompt": [10**9]}, "prompt"), ({"prompt": 3}, "prompt"),
                       ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "logprobs": 21}, "logprobs"),
                       ({"prompt": "x", "messages": []}, "messages")]:
        r = httpx.post(f"{url}/v1/completions", json={"model": "demo", **bad}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_grammar_warm_up_builds_the_engine_and_asks_for_masked_programs(server, monkeypatch):
    """warm_up_grammar: the warm-up is asked for the grammar-masked programs (their compiles are
    counted in test_scan) and the grammar engine is built by the time the service is returned;
    without it neither."""
    from qwen2vl_jax.serving import app, grammar, warmup

    _, model, processor, _ = server
    asked = []
    monkeypatch.setattr(warmup, "warm_up", lambda batcher, processor, **kw: asked.append(kw["mask_words"]))
    on = app.build_service(model, processor, max_batch=1, max_context=64, warm_up_vision=False, warm_up_grammar=True)
    off = app.build_service(model, processor, max_batch=1, max_context=64, warm_up_vision=False)
    assert asked == [grammar.mask_words(model.config.text.vocab_size), 0] and asked[0] > 0
    assert isinstance(on._grammars, grammar.Grammars) and on.grammars() is on._grammars
    assert off._grammars is None
