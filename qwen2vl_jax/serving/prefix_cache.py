"""Prompt prefixes whose keys and values are kept on the device, so a request that starts the
same way (a multi-turn chat resending its history and images, a shared system prompt) skips
their prefill and their vision tower.

A prompt is hashed in blocks of BLOCK tokens, each hash chained to the one before and covering
the media (images, videos) whose placeholders fall in the block by their key: the hash of the
media's content and its resize settings, so the same tokens with another image (or the same
image at another pixel budget) are another prefix. A block's hash thus names the whole prefix
up to its end. The keys and values of slot j depend only on tokens [0, j] (M-RoPE positions
too), so a cached block is exact for any prompt whose chain contains its hash.

Blocks are stored once, whatever number of prompts share them: a device pool of block slots
(each BLOCK tokens of every layer's keys and values, in the KV cache's dtype and layout) and,
here on the host, the index from a block's hash to its slot. After a request's prompt is in its
row, the row's full blocks that are not held yet are copied into free slots (`store`); a later
prompt has the longest held run of its chain copied from the pool into its row (`lookup`) and
is prefilled from there. Two conversations that share a system prompt and an image hold those
blocks once.

The pool is allocated in segments of `segment` slots, one more when every slot of those already
made is taken, up to the byte bound (`capacity` slots): a server whose prompts never fill the
bound does not hold it. Past it, blocks are evicted least recently used first, and only blocks
that no other held block extends: a block is found only when every block before it in its
chain is held, so a chain is shortened from its tail and never left with a hole. (A lookup or a
store touches a chain's blocks from the tail to the head, so a block is always more recently
used than any block extending it, and the least recently used block is one that none extends.)
Only the scheduler's thread calls it; others read the counters.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Sequence

import numpy as np

BLOCK = 16  # tokens per hashed block: the granularity at which a prefix is found and stored


@dataclasses.dataclass(frozen=True)
class Span:
    """The placeholders of one image or video: prompt tokens [start, end), and its key."""

    start: int
    end: int
    key: str


def placeholder_spans(ids: np.ndarray, token_id: int, counts: Sequence[int], keys: Sequence[str]) -> list[Span]:
    """The spans of media whose placeholders (`token_id`, counts[i] of them for item i, in
    order, each item's run contiguous) are in `ids`."""
    at = np.flatnonzero(np.asarray(ids) == token_id)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    if bounds[-1] != at.size:
        raise ValueError(f"{at.size} placeholders for media of {bounds[-1]}")
    return [Span(int(at[a]), int(at[b - 1]) + 1, key) for a, b, key in zip(bounds[:-1], bounds[1:], keys) if b > a]


def block_hashes(ids: np.ndarray, spans: Sequence[Span], block: int = BLOCK) -> list[bytes]:
    """One chained hash per full block of `ids` (a trailing partial block has none): block i's
    hash covers every token and media key of blocks [0, i]."""
    ids = np.asarray(ids, np.int32)
    out, h = [], b""
    for i in range(ids.size // block):
        a, b = i * block, (i + 1) * block
        d = hashlib.sha256(h)
        d.update(ids[a:b].tobytes())
        for s in spans:
            if s.start < b and s.end > a:
                d.update(f"|{s.key}|{s.start}|{s.end}".encode())
        h = d.digest()
        out.append(h)
    return out


class PrefixCache:
    """The host index of a pool of prompt blocks under a byte bound: a block's chained hash ->
    its pool slot, least recently used first."""

    def __init__(self, max_bytes: int, block_nbytes: int, *, segment: int = 256, block: int = BLOCK):
        """max_bytes: the bound on the pool; block_nbytes: the device bytes of one block (every
        layer's keys and values of `block` slots); segment: pool slots allocated at a time (at
        most; fewer when the bound holds fewer)."""
        if block_nbytes < 1 or segment < 1:
            raise ValueError(f"block_nbytes and segment must be positive (got {block_nbytes}, {segment})")
        self.max_bytes, self.block, self.block_nbytes = int(max_bytes), int(block), int(block_nbytes)
        fits = self.max_bytes // self.block_nbytes
        self.segment = min(int(segment), fits) or 1
        self.capacity = fits // self.segment * self.segment  # pool slots the bound allows (0: none)
        self.allocated = 0  # pool slots in the segments made so far
        # a held block's hash -> its slot; least recently used first, and a block always after
        # every held block that extends it
        self._slot: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._parent: dict[bytes, bytes | None] = {}
        self._children: dict[bytes, int] = {}  # held blocks that extend it by one
        self._free: list[int] = []
        self.hits = 0  # requests that reused a prefix
        self.cached_tokens = 0  # prompt tokens those requests did not prefill
        self.evictions = 0  # blocks evicted for room

    # ------------------------------------------------------------ what it holds
    @property
    def blocks(self) -> int:
        """Pool slots in use (a block shared by many prompts counts once)."""
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        """Device memory of the blocks held."""
        return self.blocks * self.block_nbytes

    @property
    def chains(self) -> int:
        """Distinct prefixes held: blocks that no held block extends."""
        return sum(1 for h in self._slot if not self._children[h])

    def __len__(self) -> int:
        return self.chains

    def held(self, hashes: Sequence[bytes]) -> int:
        """How many of these blocks, from the first, are held."""
        n = 0
        while n < len(hashes) and hashes[n] in self._slot:
            n += 1
        return n

    # ------------------------------------------------------------ lookup and store
    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The pool slots of the longest held run of these blocks (a prompt's chain), in order
        (empty: not even the first is held); the run becomes the most recently used."""
        run = list(hashes[:self.held(hashes)])
        self._touch(run)
        return [self._slot[h] for h in run]

    def record(self, tokens: int) -> None:
        """A request reused `tokens` prompt tokens (the counters /metrics shows)."""
        if tokens:
            self.hits += 1
            self.cached_tokens += tokens

    def store(self, hashes: Sequence[bytes]) -> tuple[int, list[int]]:
        """Keeps a prompt's chain of blocks -> (first, slots): its blocks [first, first + n) are
        to be copied into these n pool slots (the blocks before `first` are held already; none
        when all are, or when the bound holds no more). Makes room by evicting others' blocks,
        never this chain's; `allocated` may grow by a segment (make it before the copy)."""
        first = self.held(hashes)
        self._touch(hashes[:first])  # the most recently used: what follows evicts others first
        n = min(len(hashes), self.capacity) - first
        slots = [self._take() for _ in range(max(n, 0))]
        for i, slot in enumerate(slots, first):
            h, parent = hashes[i], hashes[i - 1] if i else None
            self._slot[h], self._parent[h], self._children[h] = slot, parent, 0
            if parent is not None:
                self._children[parent] += 1
        self._touch(hashes[:first + len(slots)])
        return first, slots

    def _touch(self, chain: Sequence[bytes]) -> None:
        """A held run becomes the most recently used, its head last (more recent than its tail)."""
        for h in reversed(chain):
            self._slot.move_to_end(h)

    def _take(self) -> int:
        """A free slot: one left free, else a new segment's, else the least recently used
        block's (one that no held block extends: see the module's docstring)."""
        if not self._free and self.allocated < self.capacity:
            self._free = list(range(self.allocated + self.segment - 1, self.allocated - 1, -1))
            self.allocated += self.segment
        if self._free:
            return self._free.pop()
        h, slot = self._slot.popitem(last=False)
        if self._children.pop(h):
            raise AssertionError("the least recently used block is extended by another")
        parent = self._parent.pop(h)
        if parent is not None:
            self._children[parent] -= 1
        self.evictions += 1
        return slot

    def clear(self) -> None:
        """Drops every block and the pool's segments (the next `store` makes one anew)."""
        self._slot.clear()
        self._parent.clear()
        self._children.clear()
        self._free, self.allocated = [], 0
