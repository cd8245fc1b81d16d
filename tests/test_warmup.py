"""The server's warm-up runs the vision tower only on image sizes whose attention fits its share of
the machine's memory, and says which it leaves to compile on first use."""

from __future__ import annotations

import types

from qwen2vl_jax.config import DEMO_DIR
from qwen2vl_jax.processing import Processor
from qwen2vl_jax.serving import warmup


class FakeBatcher:
    """What warm_up touches: the batcher's own warm-up, its slots' config and encode."""

    def __init__(self, config):
        self.params = None
        self.encoded: list[int] = []
        self.slots = types.SimpleNamespace(config=config, row_buckets=(1,), context_buckets=(256,),
                                           encode=lambda params, pixels, grid: self.encoded.append(len(pixels)))

    def warm_up(self, mask_words=0):
        pass


def _run(monkeypatch, memory: int):
    from qwen2vl_jax.checkpoint import read_config

    processor = Processor.from_pretrained(DEMO_DIR, min_pixels=56 * 56, max_pixels=448 * 448)
    batcher = FakeBatcher(read_config(DEMO_DIR))
    monkeypatch.setattr(warmup, "memory_bytes", lambda: memory)
    lines: list[str] = []
    warmup.warm_up(batcher, processor, progress=lines.append)
    return batcher, processor, lines


def test_every_size_runs_when_memory_allows(monkeypatch):
    batcher, processor, lines = _run(monkeypatch, 1 << 50)
    buckets = warmup.vision_buckets(processor, batcher.slots.config.vision.merge_unit)
    assert len(buckets) > 1 and batcher.encoded == buckets
    assert not any("first use" in line for line in lines)


def test_sizes_over_the_memory_share_are_left_and_named(monkeypatch):
    heads = _run(monkeypatch, 1 << 50)[0].slots.config.vision.num_heads
    batcher, processor, lines = _run(monkeypatch, 0)
    everything = warmup.vision_buckets(processor, batcher.slots.config.vision.merge_unit)
    cut = everything[len(everything) // 2]
    memory = warmup.MEMORY_SHARE * warmup.vision_bytes(cut, heads)  # the middle size fits exactly
    batcher, _, lines = _run(monkeypatch, memory)
    assert batcher.encoded == [n for n in everything if n <= cut]
    left = [n for n in everything if n > cut]
    assert left and any(f"{len(left)} image sizes of {left[0]} patches or more" in line for line in lines)
