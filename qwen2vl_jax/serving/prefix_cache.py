"""Prompt prefixes whose keys and values are kept on the device, so a request that starts the
same way (a multi-turn chat resending its history and images, a shared system prompt) skips
their prefill and their vision tower.

A prompt is hashed in blocks of BLOCK tokens, each hash chained to the one before and covering
the media (images, videos) whose placeholders fall in the block by their key: the hash of the
media's content and its resize settings, so the same tokens with another image (or the same
image at another pixel budget) are another prefix. After a request's prompt is in its row, the
row's full blocks are copied out as one entry (`Engine.save`); a later prompt whose first blocks
hash the same has the longest such run copied into its row (`Engine.restore`) and is prefilled
from there. The keys and values of slot j depend only on tokens [0, j] (M-RoPE positions too),
so any cached run is exact for any prompt that shares it.

An entry is the whole saved prefix of one prompt; an entry that is a prefix of a newer one is
dropped when the newer one is stored (the newer one answers both), so a conversation holds one
entry however many turns it has. Entries are evicted least recently used first to stay under
the byte bound. Only the scheduler's thread calls it; others read the counters.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Sequence

import numpy as np

BLOCK = 16  # tokens per hashed block: the granularity at which a prefix is found


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


@dataclasses.dataclass(eq=False)
class Entry:
    name: int  # what the device calls know it by (a multi-process run's followers too)
    saved: object  # the device arrays (`Engine.save`): at least `blocks` * BLOCK slots
    hashes: tuple[bytes, ...]
    nbytes: int

    @property
    def blocks(self) -> int:
        return len(self.hashes)


class PrefixCache:
    """Saved prompt prefixes under a byte bound, found by their blocks' hashes (LRU)."""

    def __init__(self, max_bytes: int, block: int = BLOCK):
        self.max_bytes, self.block = int(max_bytes), int(block)
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._index: dict[bytes, list[Entry]] = {}  # a block's hash -> the entries holding it (newest last)
        self._names = 0
        self.nbytes = 0
        self.hits = 0  # requests that reused a prefix
        self.cached_tokens = 0  # prompt tokens those requests did not prefill
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, hashes: Sequence[bytes]) -> tuple[Entry, int] | None:
        """The entry holding the longest run of these blocks, and that run's tokens (None: not
        even the first block is held). The entry becomes the most recently used."""
        found = None
        for i, h in enumerate(hashes):
            holders = self._index.get(h)
            if not holders:
                break
            found = (holders[-1], (i + 1) * self.block)
        if found is not None:
            self._entries.move_to_end(found[0].name)
        return found

    def record(self, tokens: int) -> None:
        """A request reused `tokens` prompt tokens (the counters /metrics shows)."""
        if tokens:
            self.hits += 1
            self.cached_tokens += tokens

    def holds(self, hashes: Sequence[bytes]) -> bool:
        """Every one of these blocks is held already."""
        return bool(hashes) and hashes[-1] in self._index

    def new_name(self) -> int:
        """A name no entry has had."""
        self._names += 1
        return self._names

    def add(self, name: int, hashes: Sequence[bytes], saved, nbytes: int) -> list[int]:
        """Stores a prefix of these blocks as `name` (`new_name`) -> the names of the entries
        dropped: prefixes of it, the least recently used ones past the bound, or this one when
        it is over the bound alone."""
        if nbytes > self.max_bytes or not hashes:
            return [name]
        entry = Entry(name, saved, tuple(hashes), int(nbytes))
        mine = set(entry.hashes)
        dropped = [old for old in dict.fromkeys(e for h in entry.hashes for e in self._index.get(h, ()))
                   if old.hashes[-1] in mine]  # wholly inside the new one
        for old in dropped:
            self._remove(old)
        for h in entry.hashes:
            self._index.setdefault(h, []).append(entry)
        self._entries[entry.name] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            old = next(iter(self._entries.values()))
            self._remove(old)
            self.evictions += 1
            dropped.append(old)
        return [old.name for old in dropped]

    def _remove(self, entry: Entry) -> None:
        del self._entries[entry.name]
        self.nbytes -= entry.nbytes
        for h in entry.hashes:
            holders = self._index[h]
            holders.remove(entry)
            if not holders:
                del self._index[h]

    def clear(self) -> list[int]:
        """Drops every entry -> their names."""
        names = list(self._entries)
        self._entries.clear()
        self._index.clear()
        self.nbytes = 0
        return names
