"""The server's warm-up, told as it goes: the batcher's decode step and short-prompt prefills,
then the vision tower at every size the server's pixel budget can give an image, so that no image
request pays for a compile. What still compiles on first use: prompts longer than the warmed
prefill buckets (one bucket each), images whose features come with more segments than one (a
video: one segment per two frames), a new bucket of merged features in a prefill, and image sizes
whose vision tower would hold more than a quarter of the machine's memory at once (its attention
scores grow with the square of the patch count: running them here could end the server before
it starts; such an image compiles, and needs that memory, when one comes)."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Callable

import numpy as np

HEARTBEAT_S = 10.0  # a line this often while one stage compiles
MEMORY_SHARE = 4  # warm-up runs the vision tower only on sizes needing under 1/MEMORY_SHARE of the RAM


def vision_bytes(patches: int, heads: int) -> int:
    """What the vision tower's attention holds for one segment of `patches` patches: the float32
    scores of every head, about three times over (scores, softmax, its temporaries)."""
    return 3 * heads * patches * patches * 4


def memory_bytes() -> int:
    """The machine's physical memory (0 when it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _pair(n: int) -> tuple[int, int]:
    """(h, w), both even, h * w == n (n a multiple of 4), as close to square as n allows."""
    m = n // 4
    d = max(k for k in range(1, math.isqrt(m) + 1) if m % k == 0)
    return 2 * d, 2 * (m // d)


def vision_buckets(processor, merge_unit: int) -> list[int]:
    """The patch-count buckets the vision tower compiles for one image the image processor can
    produce (its min_pixels .. max_pixels)."""
    from qwen2vl_jax.inputs import vision_sizes

    ip = processor.image_processor
    patch = ip.patch_size
    unit = ip.factor // patch  # patches per side of one merged token
    lo = max(1, ip.min_pixels // (ip.factor * ip.factor)) * unit * unit
    hi = max(1, ip.max_pixels // (ip.factor * ip.factor)) * unit * unit
    sizes = {}
    for n in range(lo, hi + 1, unit * unit):
        key = vision_sizes(np.asarray([[1, *_pair(n)]]), merge_unit)
        sizes.setdefault(key, n)
    return sorted(sizes.values())


class _Stage:
    """Prints the stage's start, a line every HEARTBEAT_S while it runs, and its time."""

    def __init__(self, progress: Callable[[str], None], what: str):
        self.progress, self.what = progress, what

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.done = threading.Event()
        self.progress(f"warm-up: {self.what} ...")

        def beat():
            while not self.done.wait(HEARTBEAT_S):
                self.progress(f"warm-up: still compiling {self.what} ({time.perf_counter() - self.t0:.0f} s)")

        threading.Thread(target=beat, daemon=True, name="qwen2vl-warmup").start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if exc[0] is None:
            self.progress(f"warm-up: {self.what}: {time.perf_counter() - self.t0:.1f} s")


def warm_up(batcher, processor, progress: Callable[[str], None] | None = None, vision: bool = True,
            mask_words: int = 0) -> None:
    """Compiles what requests will run, before the batcher starts: the batcher's own warm-up (with
    mask_words > 0 also under a grammar's token mask), then (vision=True) the vision tower for each
    bucket of image sizes."""
    say = progress or (lambda line: None)
    slots = batcher.slots
    rows, contexts = getattr(slots, "row_buckets", ()), getattr(slots, "context_buckets", ())
    masked = ", each also under a grammar's mask" if mask_words > 0 else ""
    with _Stage(say, f"decode step ({len(rows)} row x {len(contexts)} context buckets) and prefills of "
                     f"short prompts{masked}"):
        batcher.warm_up(mask_words=mask_words)
    if not vision:
        return
    merge_unit = slots.config.vision.merge_unit
    buckets = vision_buckets(processor, merge_unit)
    budget = memory_bytes() // MEMORY_SHARE
    heads = slots.config.vision.num_heads
    if budget:
        large = [n for n in buckets if vision_bytes(n, heads) > budget]
        buckets = [n for n in buckets if vision_bytes(n, heads) <= budget]
        if large:
            say(f"warm-up: {len(large)} image sizes of {large[0]} patches or more are left to compile on first use "
                f"(each needs over {budget / 2**30:.1f} GB for its attention)")
    dim = slots.config.vision.patch_dim
    t0 = time.perf_counter()
    for i, n in enumerate(buckets, 1):
        h, w = _pair(n)
        with _Stage(say, f"vision tower {i}/{len(buckets)} ({n} patches, e.g. a "
                         f"{h * processor.image_processor.patch_size}x{w * processor.image_processor.patch_size} "
                         "image)"):
            slots.encode(batcher.params, np.zeros((n, dim), np.float32), np.asarray([[1, h, w]], np.int64))
    if buckets:
        say(f"warm-up: vision tower, {len(buckets)} sizes: {time.perf_counter() - t0:.1f} s")
