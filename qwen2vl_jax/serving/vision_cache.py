"""The vision tower's output per image, kept so a repeated image skips the tower.

Keys are the caller's hash of the image bytes and its resize settings (a new pixel budget is a
new key). The scheduler's thread is the only one that reads and writes it: a request arrives
with its pixels and key, and the scheduler looks the key up before it runs the tower. Other
threads only read the counters (metrics).
"""

from __future__ import annotations

import collections

import numpy as np


class VisionCache:
    """A bounded LRU map: key -> (grid_thw int[1, 3], merged features [n, D] on the host).
    `get` counts hits and misses. Bounded by entries and by the features' bytes."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 1 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, grid_thw: np.ndarray, features: np.ndarray) -> None:
        if features.nbytes > self.max_bytes or self.max_entries < 1:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1].nbytes
        self._items[key] = (np.asarray(grid_thw).reshape(1, 3), features)
        self._bytes += features.nbytes
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes

    def __len__(self) -> int:
        return len(self._items)
