"""Counters and histograms for /metrics (Prometheus text)."""

from __future__ import annotations

import math

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if x <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += x

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            total += c
            out.append(f'{name}_bucket{{le="{"+Inf" if b == math.inf else b}"}} {total}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {total}"]


def _prefix_lines(cache) -> tuple:
    """The prefix cache's counters (none when it is off)."""
    if cache is None:
        return ()
    return (("prefix_cache_hits_total", "counter", cache.hits, "requests that reused a cached prompt prefix"),
            ("prefix_cache_cached_tokens_total", "counter", cache.cached_tokens,
             "prompt tokens whose keys and values came from the prefix cache"),
            ("prefix_cache_evictions_total", "counter", cache.evictions, "cached blocks evicted for room"),
            ("prefix_cache_entries", "gauge", cache.chains, "distinct prompt prefixes held"),
            ("prefix_cache_blocks", "gauge", cache.blocks, "blocks held (one copy of a block prompts share)"),
            ("prefix_cache_bytes", "gauge", cache.nbytes, "device memory the held blocks take"),
            ("prefix_cache_pool_bytes", "gauge", cache.allocated * cache.block_nbytes,
             "device memory of the pool made so far (held blocks and free ones)"))


class Metrics:
    """Counters and histograms for /metrics (updated from the event loop only)."""

    def __init__(self):
        self.requests: dict[int, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)

    def render(self, batcher) -> str:
        p = "qwen2vl"
        lines = [f"# TYPE {p}_requests_total counter"]
        lines += [f'{p}_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        cache = batcher.vision_cache
        for name, kind, value, doc in (
            ("prompt_tokens_total", "counter", self.prompt_tokens, "prompt tokens of admitted requests"),
            ("generation_tokens_total", "counter", self.generated_tokens, "tokens generated"),
            ("queue_depth", "gauge", batcher.queue_depth, "requests waiting for a slot"),
            ("active_slots", "gauge", batcher.active_slots, "slots decoding a request"),
            ("max_slots", "gauge", batcher.max_batch, "decode slots"),
            ("decode_steps_total", "counter", batcher.steps, "decode steps run"),
            ("vision_cache_hits_total", "counter", cache.hits, "images whose features came from the cache"),
            ("vision_cache_misses_total", "counter", cache.misses, "images that went through the vision tower"),
            ("vision_cache_entries", "gauge", len(cache), "images in the vision cache"),
            *_prefix_lines(batcher.prefix_cache),
        ):
            lines += [f"# HELP {p}_{name} {doc}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"]
        lines += [f"# TYPE {p}_time_to_first_token_seconds histogram", *self.ttft.lines(f"{p}_time_to_first_token_seconds")]
        lines += [f"# TYPE {p}_time_per_output_token_seconds histogram",
                  *self.per_token.lines(f"{p}_time_per_output_token_seconds")]
        return "\n".join(lines) + "\n"
