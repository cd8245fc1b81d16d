"""Multi-process serving: process 0 schedules, every other process replays its device calls.

Each jitted call must run on every process of the mesh as one program, in the same order. The
`Leader` wraps the runner's device calls (`engine.Engine`: empty, encode, prefill, insert,
step, extend, pool, save, restore) on process 0: each is first sent to the others (its name, a few numbers as
JSON, its host arrays as .npz, through an all-gather of bytes), then made. The others `follow`:
they receive each call and make it on their own runner with the same arguments. The prefix
cache's pool is a list of segments known by their index: every process makes, writes and
reads its own part of segment i when process 0 does (process 0 alone keeps the index of what
the pool holds).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from qwen2vl_jax import distributed
from qwen2vl_jax.decode_state import RowSettings
from qwen2vl_jax.sampling import GenerationConfig


class Lockstep:
    """The channel from process 0 to the others."""

    def send(self, op: str, arrays: dict | None = None, **meta) -> None:
        header = json.dumps({"op": op, **meta}).encode()
        blob = len(header).to_bytes(4, "little") + header + distributed.pack_arrays(arrays or {})
        distributed.allgather_bytes(blob)

    def receive(self) -> tuple[str, dict, dict]:
        blob = distributed.allgather_bytes(b"")[0]
        n = int.from_bytes(blob[:4], "little")
        meta = json.loads(blob[4:4 + n])
        return meta.pop("op"), meta, distributed.unpack_arrays(blob[4 + n:])


def to_host(features: jax.Array) -> np.ndarray:
    """Device features as a host array; split over processes, every process gathers them
    (a collective: process 0 and its followers all make it)."""
    if not features.is_fully_addressable:
        from jax.experimental import multihost_utils  # multi-process runs only

        return np.asarray(multihost_utils.process_allgather(features, tiled=True))
    return np.asarray(jax.device_get(features))


def _flat(prefix: str, tree) -> dict:
    return {f"{prefix}{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


def _unflat(prefix: str, arrays: dict, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return jax.tree_util.tree_unflatten(treedef, [arrays[f"{prefix}{i}"] for i in range(len(leaves))])


_BATCH_KEYS = ("input_ids", "positions", "mask", "pos_offset")


class Leader:
    """The runner's device calls, each sent to the followers before it is made (process 0)."""

    def __init__(self, engine, lockstep: Lockstep | None = None):
        self.engine, self.lockstep = engine, lockstep or Lockstep()

    def empty(self, rows: int, slots: int):
        self.lockstep.send("empty", rows=rows, slots=slots)
        return self.engine.empty(rows, slots)

    def encode(self, params, vision: dict):
        self.lockstep.send("encode", vision)
        return self.engine.encode(params, vision)

    def prefill(self, params, batch: dict, features, settings: RowSettings, slots: int, greedy: bool | None = None,
                *, logprobs: bool = False, allow=None):
        extra = {} if features is None else {"features": np.asarray(features)}
        if allow is not None:
            extra["allow"] = allow
        self.lockstep.send("prefill", {**batch, **extra, **_flat("settings", settings)}, slots=slots, greedy=greedy,
                           logprobs=logprobs)
        return self.engine.prefill(params, batch, features, settings, slots, greedy, logprobs=logprobs, allow=allow)

    def insert(self, state, prefix, row: int, pack: bool = True, source: int | None = None):
        self.lockstep.send("insert", row=int(row), pack=pack, source=None if source is None else int(source))
        return self.engine.insert(state, prefix, row, pack, source)

    def step(self, params, state, greedy: bool | None = None, rows: int | None = None, context: int | None = None,
             *, logprobs: bool = False, allow=None):
        self.lockstep.send("step", None if allow is None else {"allow": allow}, greedy=greedy, rows=rows,
                           context=context, logprobs=logprobs)
        return self.engine.step(params, state, greedy, rows, context, logprobs=logprobs, allow=allow)

    def extend(self, params, state, chunk: dict, features, settings: RowSettings, context: int,
               greedy: bool | None = None, *, logprobs: bool = False, allow=None):
        extra = {} if features is None else {"features": np.asarray(features)}
        if allow is not None:
            extra["allow"] = allow
        chunk_arrays = {f"chunk_{k}": np.asarray(v) for k, v in chunk.items()}
        self.lockstep.send("extend", {**chunk_arrays, **extra, **_flat("settings", settings)}, context=context,
                           greedy=greedy, logprobs=logprobs)
        return self.engine.extend(params, state, chunk, features, settings, context, greedy, logprobs=logprobs,
                                  allow=allow)

    def pool(self, blocks: int, block: int, index: int):
        self.lockstep.send("pool", blocks=int(blocks), block=int(block), index=int(index))
        return self.engine.pool(blocks, block)

    def save(self, state, pool, row: int, blocks, slots, index: int):
        self.lockstep.send("save", {"blocks": np.asarray(blocks), "slots": np.asarray(slots)}, row=int(row),
                           index=int(index))
        return self.engine.save(state, pool, row, blocks, slots)

    def restore(self, state, pool, row: int, length: int, blocks, slots, index: int | None):
        arrays = None if index is None else {"blocks": np.asarray(blocks), "slots": np.asarray(slots)}
        self.lockstep.send("restore", arrays, row=int(row), length=int(length), index=index)
        return self.engine.restore(state, pool, row, length, blocks, slots)

    def ping(self) -> None:
        """Followers wait inside a collective: an idle leader keeps it short."""
        self.lockstep.send("ping")

    def stop(self) -> None:
        self.lockstep.send("stop")


def follow(engine, params, lockstep: Lockstep | None = None) -> None:
    """In a process other than 0: make process 0's device calls as they come until it stops.
    Warm up first exactly as process 0 did (`Batcher.warm_up`)."""
    lockstep = lockstep or Lockstep()
    like = RowSettings.of([GenerationConfig()])
    state = prefix = None
    pool: dict[int, object] = {}  # the prefix cache's pool segments, by index
    while True:
        op, meta, a = lockstep.receive()
        if op == "stop":
            return
        if op == "empty":
            state = engine.empty(meta["rows"], meta["slots"])
        elif op == "encode":  # gathered to the host as process 0 gathers it
            to_host(engine.encode(params, a))
        elif op == "prefill":
            prefix, _ = engine.prefill(params, {k: a[k] for k in _BATCH_KEYS}, a.get("features"),
                                       _unflat("settings", a, like), meta["slots"], meta["greedy"],
                                       logprobs=meta["logprobs"], allow=a.get("allow"))
        elif op == "insert":
            state = engine.insert(state, prefix, meta["row"], meta["pack"], meta["source"])
        elif op == "step":
            state, _ = engine.step(params, state, meta["greedy"], meta["rows"], meta["context"],
                                   logprobs=meta["logprobs"], allow=a.get("allow"))
        elif op == "extend":
            chunk = {k[len("chunk_"):]: v for k, v in a.items() if k.startswith("chunk_")}
            state, _ = engine.extend(params, state, chunk, a.get("features"), _unflat("settings", a, like),
                                     meta["context"], meta["greedy"], logprobs=meta["logprobs"], allow=a.get("allow"))
        elif op == "pool":
            pool[meta["index"]] = engine.pool(meta["blocks"], meta["block"])
        elif op == "save":
            i = meta["index"]
            pool[i] = engine.save(state, pool[i], meta["row"], a["blocks"], a["slots"])
        elif op == "restore":
            i = meta["index"]
            state = engine.restore(state, None if i is None else pool[i], meta["row"], meta["length"], a.get("blocks"),
                                   a.get("slots"))
        elif op != "ping":
            raise RuntimeError(f"process 0 sent an unknown call {op!r}")
