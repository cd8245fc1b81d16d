"""Chunked prefill and prefix caching in the server's batcher, over a tiny random model (the
demo's shapes, random weights; every program compiles once per shape for the whole module):
- replies are token for token the same with chunking and the prefix cache on or off (greedy,
  and sampled with a seed and a repetition penalty), requests admitted while others decode;
- chunks whose boundaries fall inside an image's placeholders;
- a multi-turn chat with an image through the openai client: turns 2 and 3 report
  usage.prompt_tokens_details.cached_tokens, skip the vision tower, and /metrics counts them;
- two prompts that share more than a block hold the shared blocks once, and the second reuses
  them (its reply unchanged);
- eviction under a tiny memory bound (the cache alone, and under the batcher): a chain is
  shortened from its tail, never left with a hole.
"""

from __future__ import annotations

import base64
import io
import re
import threading

import numpy as np
import pytest

from qwen2vl_jax.sampling import GenerationConfig
from qwen2vl_jax.serving.prefix_cache import BLOCK, PrefixCache, Span, block_hashes, placeholder_spans
from qwen2vl_jax.serving.scheduler import Batcher, Request, VisionInput
from qwen2vl_jax.serving.slots import Slots, chunk_shape

MAX_CONTEXT = 320


def png(size: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny():
    import jax

    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.checkpoint import read_config
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.modules.qwen2vl import init_params
    from qwen2vl_jax.processing import Processor

    config = read_config(DEMO_DIR)
    processor = Processor.from_pretrained(DEMO_DIR)
    return Qwen2VL(config, init_params(config, jax.random.PRNGKey(1)), dtype="float32"), processor


def prompt(processor, text: str, images=(), history=()) -> tuple[np.ndarray, list[VisionInput]]:
    """A chat prompt (the template, placeholders expanded) and its images as the server gives
    them to the batcher (keyed by content)."""
    from PIL import Image

    content = [{"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")} for data in images]
    messages = [*history, {"role": "user", "content": [*content, {"type": "text", "text": text}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    vision = []
    if images:
        grids = np.asarray(out["image_grid_thw"])
        per = np.prod(grids, axis=1)
        bounds = np.concatenate([[0], np.cumsum(per)])
        pixels = np.asarray(out["pixel_values"])
        vision = [VisionInput(pixels[a:b], grids[i:i + 1], f"img{hash(data)}")
                  for i, (a, b, data) in enumerate(zip(bounds[:-1], bounds[1:], images))]
    return np.asarray(out["input_ids"])[0].astype(np.int32), vision


def prefix_cache(model, max_bytes: int) -> PrefixCache:
    """A cache over the model's blocks, its pool made a row's worth of blocks at a time (as the
    server makes it)."""
    slots = Slots(model.engine, max_batch=4, max_context=MAX_CONTEXT)
    return PrefixCache(max_bytes, slots.block_nbytes(BLOCK), segment=MAX_CONTEXT // BLOCK)


def no_holes(cache: PrefixCache) -> bool:
    """Every held block's predecessor in its chain is held."""
    return all(cache._parent[h] is None or cache._parent[h] in cache._slot for h in cache._slot)


def chain(model, ids, vision) -> list[bytes]:
    """The block hashes the batcher gives a prompt with these images."""
    cfg = model.config
    counts = [int(np.prod(v.grid_thw)) // cfg.vision.merge_unit for v in vision]
    return block_hashes(ids, placeholder_spans(ids, cfg.image_token_id, counts, [v.content_key() for v in vision]))


def run(model, jobs, *, chunk: int = 0, cache: PrefixCache | None = None, rounds: int = 1, encodes=None):
    """Each round submits every job at once (they share steps; fills interleave with decoding)
    and waits -> per round, per job (tokens, finish, cached_tokens)."""
    slots = Slots(model.engine, max_batch=4, max_context=MAX_CONTEXT)
    if encodes is not None:
        encode = slots.encode

        def counted(*args):
            encodes.append(1)
            return encode(*args)

        slots.encode = counted
    batcher = Batcher(slots, model.params, prefill_chunk=chunk, prefix_cache=cache).start()
    out = []
    try:
        for _ in range(rounds):
            done, results, reqs = [], [], []
            for ids, vision, generation in jobs:
                got, end = [], threading.Event()

                def emit(event, got=got, end=end):
                    got.append(event)
                    if event.finish is not None:
                        end.set()

                reqs.append(Request(ids, vision, [], generation, emit))
                done.append(end)
                results.append(got)
                batcher.submit(reqs[-1])
            for end in done:
                assert end.wait(600)
            out.append([([e.token for e in got], got[-1].finish, r.cached_tokens) for got, r in zip(results, reqs)])
    finally:
        batcher.close()
    return out


GREEDY = GenerationConfig(max_new_tokens=10)
SAMPLED = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, repetition_penalty=1.3,
                           seed=7)


@pytest.fixture(scope="module")
def jobs(tiny):
    _, processor = tiny
    image = png(224, 0)
    with_image = prompt(processor, "What is in this picture? Describe it in a few words.", [image])
    text = prompt(processor, "word " * 90 + "and so on.")
    return [(*with_image, GREEDY), (*with_image, SAMPLED), (*text, GREEDY), (*text, SAMPLED)]


@pytest.fixture(scope="module")
def baseline(tiny, jobs):
    """Whole prompts, prefilled and inserted, no cache."""
    (out,) = run(tiny[0], jobs)
    assert all(finish == "length" and len(tokens) == 10 for tokens, finish, _ in out)
    return [tokens for tokens, _, _ in out]


@pytest.mark.parametrize("chunk, cached", [(16, False), (0, True), (40, True)])
def test_replies_unchanged(tiny, jobs, baseline, chunk, cached):
    """Chunked (16: a boundary inside the image's placeholders; 40), cached, both: the same
    tokens as the whole-prompt path; with the cache the second round reuses every prompt's full
    blocks (all but the last token at most)."""
    cache = prefix_cache(tiny[0], 1 << 30) if cached else None
    rounds = run(tiny[0], jobs, chunk=chunk, cache=cache, rounds=2 if cached else 1)
    for out in rounds:
        assert [tokens for tokens, _, _ in out] == baseline
    if cached:
        for (ids, _, _), (_, _, reused) in zip(jobs, rounds[1]):
            assert reused == min(ids.size // BLOCK * BLOCK, ids.size - 1) > 0
        assert cache.hits >= len(jobs)
        # two jobs per prompt, and every prompt starts with the template's block: each held once
        chains = [chain(tiny[0], ids, vision) for ids, vision, _ in jobs]
        assert cache.blocks == len(set().union(*chains)) < sum(map(len, chains)) and no_holes(cache)


def test_chunk_boundary_inside_an_image(tiny, jobs):
    """The image's placeholders straddle a 16-token chunk boundary, and its vision tower runs
    once for the whole request (a chunk takes the rows of its features it holds)."""
    model, processor = tiny
    ids, vision, _ = jobs[0]
    cfg = model.config
    (span,) = placeholder_spans(ids, cfg.image_token_id, [int(np.prod(vision[0].grid_thw)) // cfg.vision.merge_unit],
                                ["k"])
    assert span.start // 16 != (span.end - 1) // 16, span
    encodes = []
    (out,) = run(model, [jobs[0]], chunk=16, encodes=encodes)
    (alone,) = run(model, [jobs[0]])
    assert out[0][0] == alone[0][0] and len(encodes) == 1


def test_chunk_shape_fits_the_row():
    assert chunk_shape(0, 100, 320) == (128, 100)  # 16, 24, 32, 48, 64, 96, 128, ...
    assert chunk_shape(0, 90, 320) == (96, 90)
    assert chunk_shape(296, 17, 320) == (24, 17)
    assert chunk_shape(305, 14, 320) == (8, 8)  # 16 would pass the row's end: a power of two that fits
    assert chunk_shape(318, 1, 320) == (2, 1)


def test_prefix_cache_shares_blocks_and_evicts_tails():
    ids = np.arange(100, dtype=np.int32)
    other = ids.copy()
    other[40] = 7
    a, b = block_hashes(ids, []), block_hashes(other, [])
    assert len(a) == 100 // BLOCK and a[:2] == b[:2] and a[2] != b[2]
    # an image's key is part of the blocks its placeholders touch, and of every later one
    c = block_hashes(ids, [Span(20, 36, "x")])
    assert c[0] == a[0] and c[1] != a[1] and c[3] != a[3]

    cache = PrefixCache(max_bytes=550, block_nbytes=100, segment=2)  # 5 blocks fit: segments of 2, 4 slots
    assert (cache.capacity, cache.allocated, cache.lookup(a)) == (4, 0, [])
    assert cache.store(a[:3]) == (0, [0, 1, 2]) and cache.allocated == 4  # a second segment made
    assert cache.store(b[:3]) == (2, [3])  # a's first two blocks are b's: only b's third is copied
    assert (cache.blocks, cache.chains, cache.nbytes) == (4, 2, 400)  # the shared ones count once
    assert cache.lookup(b) == [0, 1, 3] and cache.lookup(a) == [0, 1, 2]
    cache.record(2 * BLOCK)
    assert (cache.hits, cache.cached_tokens) == (1, 2 * BLOCK)
    # full: b's tail (least recently used, extends nothing) goes, then a's; never a head
    d = block_hashes(ids + 1000, [])
    assert cache.store(d[:2]) == (0, [3, 2]) and cache.evictions == 2 and no_holes(cache)
    assert cache.lookup(b) == [0, 1] and cache.lookup(a) == [0, 1]
    assert cache.store(a[:3]) == (2, [2])  # d's tail went, not its head nor a's
    assert cache.lookup(d) == [3] and no_holes(cache)
    assert cache.store(d) == (1, [2, 1, 0]) and no_holes(cache)  # as much of a long chain as fits
    assert cache.lookup(d) == [3, 2, 1, 0] and cache.lookup(a) == [] and cache.evictions == 6
    cache.clear()
    assert (cache.blocks, cache.allocated, cache.lookup(c)) == (0, 0, [])
    assert PrefixCache(max_bytes=99, block_nbytes=100).store(a) == (0, [])  # a bound under a block keeps none


def test_prompts_share_blocks(tiny, jobs):
    """Two prompts that part after several blocks: the second reuses the first one's blocks, the
    pool holds them once, and its reply is the one it gets without the cache."""
    model = tiny[0]
    ids = jobs[2][0]
    other = ids.copy()
    other[40] = ids[40] + 1  # another word in the third block
    cache = prefix_cache(model, 1 << 30)
    # chunks of 16: the shapes test_replies_unchanged compiled (a restored run ends on one)
    (out,) = run(model, [(ids, [], GREEDY), (other, [], GREEDY)], chunk=16, cache=cache)
    (alone,) = run(model, [(other, [], GREEDY)])
    shared = 40 // BLOCK
    assert shared > 1 and [r for _, _, r in out] == [0, shared * BLOCK] and out[1][0] == alone[0][0]
    a, b = chain(model, ids, []), chain(model, other, [])
    assert cache.blocks == len(set(a) | set(b)) == len(a) + len(b) - shared and cache.chains == 2


def one_prompt_cache(model, jobs) -> PrefixCache:
    """A cache whose bound holds the blocks of the longest prompt of `jobs`."""
    per_block = Slots(model.engine, max_context=MAX_CONTEXT).block_nbytes(BLOCK)
    return prefix_cache(model, max(ids.size // BLOCK for ids, _, _ in jobs) * per_block)


def test_eviction_in_the_batcher(tiny, jobs, baseline):
    """A bound that holds the longer prompt's blocks: the prompts evict each other's from the
    tail, the head of a shortened chain is still found, and every reply is still the same."""
    model = tiny[0]
    picked = [jobs[0], jobs[2]]  # an image prompt of 3 blocks and a text one of 7: none shared
    cache = one_prompt_cache(model, picked)
    first, longer = (ids.size // BLOCK for ids, _, _ in picked)
    rounds = run(model, picked, chunk=16, cache=cache, rounds=2)
    for out in rounds:
        assert [tokens for tokens, _, _ in out] == [baseline[0], baseline[2]]
    # round 1: the text prompt's blocks evict the image one's; round 2: the image prompt's evict
    # the text one's last three, its first four are reused, and its last three evict the image's
    assert [r for _, _, r in rounds[1]] == [0, (longer - first) * BLOCK]
    assert cache.evictions == 3 * first and cache.blocks == cache.capacity == longer and no_holes(cache)
    assert cache.nbytes == cache.allocated * cache.block_nbytes


# ---------------------------------------------------------------------------- through the server
def test_multi_turn_chat_with_an_image(tiny):
    """Three turns resending the history and its image: turns 2 and 3 report cached tokens
    (streamed and not), their prompts skip the vision tower, and /metrics counts them; the
    replies are those of a server without the cache."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from qwen2vl_jax.serving.app import ServerThread, build_service, create_app
    from qwen2vl_jax.serving.settings import Settings

    model, processor = tiny
    url = "data:image/png;base64," + base64.b64encode(png(224, 3)).decode()
    questions = ["What is in this picture?", "And what colour is it?", "Say it again, shorter."]

    def chat(prefix_cache_gb: float):
        service = build_service(model, processor, max_batch=4, max_context=MAX_CONTEXT, warm_up=False,
                                settings=Settings(model_name="m"), prefill_chunk=16, prefix_cache_gb=prefix_cache_gb)
        encodes = []
        encode = service.batcher.slots.encode
        service.batcher.slots.encode = lambda *a: encodes.append(1) or encode(*a)
        with ServerThread(create_app(service)) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
            history, turns = [], []
            for i, q in enumerate(questions):
                content = [{"type": "text", "text": q}]
                if i == 0:
                    content.insert(0, {"type": "image_url", "image_url": {"url": url}})
                history.append({"role": "user", "content": content})
                before = len(encodes)
                if i < 2:
                    r = client.chat.completions.create(model="m", messages=history, max_tokens=8)
                    text, usage = r.choices[0].message.content, r.usage
                else:
                    chunks = list(client.chat.completions.create(model="m", messages=history, max_tokens=8, stream=True,
                                                                 stream_options={"include_usage": True}))
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    usage = chunks[-1].usage
                history.append({"role": "assistant", "content": text})
                details = usage.prompt_tokens_details
                turns.append((text, None if details is None else details.cached_tokens, len(encodes) - before))
            metrics = httpx.get(f"{base}/metrics").text
        return turns, metrics

    cached, metrics = chat(0.05)
    plain, _ = chat(0)
    assert [t[0] for t in cached] == [t[0] for t in plain]
    assert cached[0][1:] == (0, 1)  # turn 1: nothing cached, the tower runs
    for text, reused, encodes in cached[1:]:
        assert reused > 0 and encodes == 0
    assert all(t[1] is None for t in plain)  # no prefix cache: no details
    total = float(re.search(r"^qwen2vl_prefix_cache_cached_tokens_total (\S+)$", metrics, re.M).group(1))
    assert total == sum(t[1] for t in cached)


def test_lockstep_replays_fills(tiny, jobs, baseline):
    """A multi-process leader's calls (extend, and pool, save and restore under a bound that
    evicts), sent through the channel's encoding, replay on a follower without error while the
    leader's replies stay the same."""
    from qwen2vl_jax import distributed
    from qwen2vl_jax.serving.lockstep import Lockstep, follow

    class Recorded(Lockstep):
        def __init__(self):
            self.sent = []

        def send(self, op, arrays=None, **meta):
            self.sent.append((op, meta, distributed.unpack_arrays(distributed.pack_arrays(arrays or {}))))

        def receive(self):
            op, meta, arrays = self.sent.pop(0)
            return op, dict(meta), arrays

    model = tiny[0]
    channel = Recorded()
    slots = Slots(model.engine, max_batch=4, max_context=MAX_CONTEXT)
    slots.lead(channel)
    cache = one_prompt_cache(model, jobs)  # the pool of test_eviction_in_the_batcher: compiled once
    batcher = Batcher(slots, model.params, prefill_chunk=40, prefix_cache=cache).start()
    got = []
    for ids, vision, generation in [jobs[0], jobs[2], jobs[0]]:
        events, end = [], threading.Event()
        batcher.submit(Request(ids, vision, [], generation, lambda e, ev=events, end=end: (ev.append(e), e.finish and end.set())))
        assert end.wait(600)
        got.append([e.token for e in events])
    batcher.close()  # sends stop
    assert got == [baseline[0], baseline[2], baseline[0]]
    ops = {op for op, _, _ in channel.sent}
    assert {"extend", "pool", "save", "restore", "stop"} <= ops and cache.evictions, ops
    follow(model.engine, model.params, channel)
    assert not channel.sent
