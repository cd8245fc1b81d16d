"""Multi-process serving: process 0 schedules, every other process replays its device calls.

Each jitted call must run on every process of the mesh as one program, in the same order. The
`Leader` wraps the runner's device calls (`engine.Engine`: empty, encode, prefill, insert,
step, extend, save, restore) on process 0: each is first sent to the others (its name, a few numbers as JSON, its host
arrays as .npz, through an all-gather of bytes), then made. The others `follow`: they receive
each call and make it on their own runner with the same arguments. A saved prompt prefix
(prefix caching) is known by a name: every process keeps its own part of it under that name
until process 0 says it is dropped.
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

    def save(self, state, row: int, slots: int, name: int):
        self.lockstep.send("save", row=int(row), slots=int(slots), name=int(name))
        return self.engine.save(state, row, slots)

    def restore(self, state, saved, row: int, length: int, name: int | None):
        self.lockstep.send("restore", row=int(row), length=int(length), name=name)
        return self.engine.restore(state, saved, row, length)

    def drop(self, names: list[int]) -> None:
        self.lockstep.send("drop", names=[int(n) for n in names])

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
    saved: dict[int, object] = {}  # the prompt prefixes process 0 keeps, by name
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
        elif op == "save":
            saved[meta["name"]] = engine.save(state, meta["row"], meta["slots"])
        elif op == "restore":
            name = meta["name"]
            state = engine.restore(state, None if name is None else saved[name], meta["row"], meta["length"])
        elif op == "drop":
            for name in meta["names"]:
                saved.pop(name, None)
        elif op != "ping":
            raise RuntimeError(f"process 0 sent an unknown call {op!r}")
