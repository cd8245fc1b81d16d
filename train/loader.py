"""Which records make each training step, and the input pipeline that reads them.

Batches come from a deterministic plan (seed, epoch): records are grouped by bucketed length,
so a step's shapes come from a short ladder and jit compiles each shape once; a position
(epoch, index) is all that is needed to resume exactly.

Packing (`Loader(pack=True)`, `--pack`): a step's records, drawn without grouping by length,
go into as few rows of the step's length bucket as first-fit decreasing finds
(`data.pack_records`, `data.collate_packed`); segment ids keep attention inside each record,
each record's M-RoPE positions are those it has alone, its images and videos stay with it,
and the loss counts the same tokens, so a packed step computes what the unpacked one would.

The pipeline runs on Grain (`Loader.pipeline`): reading, preprocessing, bucketing, packing
and batching in worker processes (`workers`) or a background thread.

In a multi-process run every process follows the same plan, reads and preprocesses only its
share of each step's records (a contiguous part of every micro-batch's rows: the rows its
devices hold when the mesh lists devices process by process), and the processed rows are
exchanged once per step (`distributed.allgather_bytes`): the vision tower runs on one flat
patch layout for the whole batch, so every process builds the same step arrays, equal to a
single process's, and places only the parts its devices hold.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Callable, Iterator, Sequence

import grain
import jax
from absl import flags as absl_flags
import numpy as np

from qwen2vl_jax import distributed
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.inputs import bucket
from qwen2vl_jax.train.data import (Example, JsonlDataset, collate, collate_packed, pack_records, stack_micro,
                                    vision_bucket)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the data stream stands: the next step reads batch `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0


class BatchPlan:
    """Deterministic batches of record indices: per epoch, shuffle, group by bucketed length
    (`by_length`; packed runs mix lengths, which is what lets records share a row), cut into
    steps of `per_step` records (a short last batch is filled with None), shuffle the steps.
    The same (seed, epoch) always gives the same plan, and every epoch has the same number of
    steps (`steps_per_epoch`)."""

    def __init__(self, lengths: Sequence[int], per_step: int, seed: int = 0, by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.per_step = per_step
        self.seed = seed
        self.by_length = by_length
        self._cache: dict[int, list[list[int | None]]] = {}

    def epoch(self, e: int) -> list[list[int | None]]:
        if e not in self._cache:
            rng = np.random.default_rng([self.seed, e])
            order = rng.permutation(len(self.lengths))
            groups: dict[int, list[int]] = {}
            for i in order:
                groups.setdefault(bucket(int(self.lengths[i])) if self.by_length else 0, []).append(int(i))
            steps = []
            for key in sorted(groups):
                g = groups[key]
                for k in range(0, len(g), self.per_step):
                    chunk = g[k:k + self.per_step]
                    steps.append(chunk + [None] * (self.per_step - len(chunk)))
            self._cache = {e: [steps[i] for i in rng.permutation(len(steps))]}
        return self._cache[e]

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        """The same in every epoch: the groups' sizes do not depend on the shuffle."""
        return len(self.epoch(0))

    def advance(self, pos: Position) -> Position:
        nxt = Position(pos.epoch, pos.index + 1)
        return nxt if nxt.index < len(self.epoch(pos.epoch)) else Position(pos.epoch + 1, 0)


class Loader:
    """Steps of batches from a dataset: arrays [A, B, ...] (A micro-batches of B rows, equal
    shapes within a step; with `pack`, R <= B rows that hold several records each) with the
    position after them.

    The input pipeline is a Grain dataset indexed by the run's global step (`pipeline`): the
    step's record indices come from the plan, `read_step` reads and preprocesses this
    process's share of them (images decoded and resized, videos sampled, text tokenized and
    labelled), and in a single-process run `assemble_step` buckets, packs and batches them
    too. With `workers` > 0 these run in that many Grain worker processes; with 0, in a thread
    of this process. Either way the next `prefetch` steps are made while the current one
    trains, in order, and a step's arrays depend only on (seed, step), so a run resumed at
    a position (the Orbax checkpoint holds it) reads exactly what an uninterrupted one would,
    with any number of workers.

    processes: (this process's index, the process count), default JAX's; each process reads
    its share of every step (`share`) and `exchange` (default `distributed.allgather_bytes`,
    called from the consuming thread, once per step in every process) brings the others',
    before the step is assembled the same way in every process."""

    def __init__(self, dataset: JsonlDataset, config: Qwen2VLConfig, batch_size: int, accum: int = 1,
                 seed: int = 0, prefetch: int = 2, *, pack: bool = False, workers: int = 0,
                 processes: tuple[int, int] | None = None,
                 exchange: Callable[[bytes], list[bytes]] | None = None):
        self.dataset = dataset
        self.config = config
        self.batch_size = batch_size
        self.accum = accum
        self.pack = pack
        self.workers = workers
        self.plan = BatchPlan(dataset.lengths, batch_size * accum, seed, by_length=not pack)
        self.prefetch = prefetch
        self.processes = processes or (jax.process_index(), jax.process_count())
        self.exchange = exchange or distributed.allgather_bytes

    def share(self, n: int) -> list[int]:
        """The places in a step's n = A * B record slots this process reads: in each
        micro-batch, a contiguous part of its B rows (the parts differ by at most one row)."""
        me, count = self.processes
        b = self.batch_size
        rows = np.array_split(np.arange(b), count)[me]
        return [k * b + int(r) for k in range(n // b) for r in rows]

    def step_batch(self, indices: Sequence[int | None]) -> tuple[dict, int]:
        """-> (arrays with a leading micro-batch axis, number of real tokens), every record
        read here."""
        return self.assemble([None if i is None else self._example(i) for i in indices])

    def assemble(self, exs: Sequence[Example | None]) -> tuple[dict, int]:
        """A step's examples (None: a filler row) -> (arrays [A, B, ...], real tokens)."""
        real = [e for e in exs if e is not None]
        length = bucket(max((len(e.input_ids) for e in real), default=1))
        if self.pack:
            return self.assemble_packed(real, length)
        rows = [exs[k * self.batch_size:(k + 1) * self.batch_size] for k in range(self.accum)]
        sizes = [vision_bucket(r, self.config.vision.merge_unit) for r in rows]
        sizes = None if all(z is None for z in sizes) else tuple(max(z[i] for z in sizes if z) for i in range(3))
        micro = [collate(r, self.config, length, sizes) for r in rows]
        return stack_micro(micro), sum(len(e.input_ids) for e in real)

    def assemble_packed(self, real: Sequence[Example], length: int) -> tuple[dict, int]:
        """The step's records packed into rows of `length` (`pack_records`), the rows split over
        the A micro-batches, R rows each: R on the ladder 1, 2, 3 ... 8, 10, 12 ... (`bucket`),
        at most B, so a step has a few shapes and never more rows than unpacked."""
        rows = [[real[i] for i in row] for row in pack_records([len(e.input_ids) for e in real], length)]
        per = min(self.batch_size, bucket(-(-len(rows) // self.accum), 1))
        groups = [rows[k * per:(k + 1) * per] for k in range(self.accum)]
        sizes = [vision_bucket([e for row in g for e in row], self.config.vision.merge_unit) for g in groups]
        sizes = None if all(z is None for z in sizes) else tuple(max(z[i] for z in sizes if z) for i in range(3))
        micro = [collate_packed(g, self.config, length, sizes, per) for g in groups]
        return stack_micro(micro), sum(len(e.input_ids) for e in real)

    def read_share(self, indices: Sequence[int | None]) -> dict[int, Example]:
        """This process's records of a step: slot -> example (filler slots and records that
        fail now are left out)."""
        mine = {}
        for j in self.share(len(indices)):
            if indices[j] is not None:
                ex = self._example(indices[j])
                if ex is not None:
                    mine[j] = ex
        return mine

    def gather(self, n: int, mine: dict[int, Example]) -> list[Example | None]:
        """Every process's share of a step -> its n examples in slot order."""
        if self.processes[1] == 1:
            return [mine.get(j) for j in range(n)]
        out: list[Example | None] = [None] * n
        for blob in self.exchange(_pack_examples(mine)):
            for j, ex in _unpack_examples(blob).items():
                out[j] = ex
        return out

    def _example(self, i: int) -> Example | None:
        """A record that passed the scan but fails now (a file changed on disk) becomes an
        empty row with a warning: an epoch never stops halfway."""
        try:
            return self.dataset.example(i)
        except InputError as e:
            rec = self.dataset.records[i]
            warnings.warn(f"{self.dataset.path.name} line {rec.line}: {e}; skipped this time", stacklevel=2)
            return None

    # ---------------------------------------------------------------- the Grain pipeline
    def position(self, step: int) -> Position:
        """The run's global data step -> (epoch, batch); every epoch has the same steps."""
        return Position(*divmod(step, self.plan.steps_per_epoch))

    def read_step(self, step: int) -> tuple[int, dict[int, Example], Position]:
        """Global data step -> (its record slots, this process's examples, the position after it)."""
        pos = self.position(step)
        indices = self.plan.epoch(pos.epoch)[pos.index]
        return len(indices), self.read_share(indices), self.position(step + 1)

    def assemble_step(self, item: tuple[int, dict[int, Example], Position]) -> tuple[dict, int, Position]:
        """`read_step`'s output of a single-process run -> (step arrays, real tokens, position after)."""
        n, mine, pos = item
        return (*self.assemble(self.gather(n, mine)), pos)

    def pipeline(self, start: Position) -> grain.IterDataset:
        """The Grain dataset of steps from `start` on (endless): (step arrays, tokens, position
        after) in a single-process run, else `read_step`'s output."""
        first = self.plan.steps_per_epoch * start.epoch + start.index
        steps = grain.MapDataset.range(first, sys.maxsize).map(self.read_step)
        if self.processes[1] == 1:
            steps = steps.map(self.assemble_step)
        stream = steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, self.prefetch)))
        if self.workers:
            if not absl_flags.FLAGS.is_parsed():  # Grain's worker pool reads its absl flags (defaults here)
                absl_flags.FLAGS.mark_as_parsed()
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=max(1, self.prefetch)))
        return stream

    def __call__(self, start: Position) -> Iterator[tuple[dict, int, Position]]:
        """Yields (step arrays, real tokens, position after this step) forever from `start`."""
        steps = iter(self.pipeline(start))
        try:
            for item in steps:
                if self.processes[1] == 1:
                    yield item
                else:
                    # Here, not in a reader: the exchange is a collective that every process must
                    # reach in the same order relative to the train steps.
                    n, mine, pos = item
                    yield (*self.assemble(self.gather(n, mine)), pos)
        finally:
            steps.close()  # stops the workers (or the reading thread)


_EXAMPLE_ARRAYS = ("input_ids", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _pack_examples(examples: dict[int, Example]) -> bytes:
    """slot -> Example as bytes (npz: "<slot>.<field>" arrays, no pickles)."""
    arrays = {}
    for j, ex in examples.items():
        arrays[f"{j}.line"] = np.array(ex.line)
        for name in _EXAMPLE_ARRAYS:
            value = getattr(ex, name)
            if value is not None:
                arrays[f"{j}.{name}"] = np.asarray(value)
    return distributed.pack_arrays(arrays)


def _unpack_examples(blob: bytes) -> dict[int, Example]:
    fields: dict[int, dict] = {}
    for key, value in distributed.unpack_arrays(blob).items():
        j, name = key.split(".", 1)
        fields.setdefault(int(j), {})[name] = value
    return {j: Example(**{k: v for k, v in f.items() if k != "line"}, line=int(f["line"])) for j, f in fields.items()}
