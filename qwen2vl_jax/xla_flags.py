"""XLA flags that must be in XLA_FLAGS before JAX starts its backends.

XLA reads XLA_FLAGS once, when JAX makes its first backend (the first array, `jax.devices()`,
`jax.distributed.initialize`); a change after that does nothing. So these are set by the
command-line tools first thing (`for_model`), never from inside a loader, and a Python program
sets them itself before its first JAX call (see `for_model`).

The flag: XLA's concurrency-optimised CPU scheduler keeps every decoder layer's temporaries
live at once. A quantized prefill on CPU then holds each layer's dequantized weights in one
temporary, page-faulted afresh on every call, which costs memory and time well beyond the
float model's. Float models decode faster with the scheduler on, so it is turned off only for
a quantized folder, and only on the jaxlib versions it was checked on (an unknown flag in
XLA_FLAGS stops JAX).
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from qwen2vl_jax.checkpoint import is_converted, read_scheme

SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_FLAG_VERSIONS = ((0, 10),)


def jaxlib_version() -> tuple[int, ...]:
    """(major, minor) of the installed jaxlib; () when it cannot be read."""
    try:
        return tuple(int(x) for x in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


def sequential_cpu_schedule() -> bool:
    """Adds `--xla_cpu_enable_concurrency_optimized_scheduler=false` to XLA_FLAGS unless XLA_FLAGS
    names that flag already (the user's own setting stays) or this jaxlib is not one the flag is
    known for. Returns whether it was added. It only edits the environment: call it before JAX
    starts its backends, or it has no effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG in flags or jaxlib_version() not in SCHEDULER_FLAG_VERSIONS:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{SCHEDULER_FLAG}=false".strip()
    return True


def for_model(folder: str | Path) -> bool:
    """Sets the XLA flags that suit the model in `folder` (a quantized converted folder turns
    the concurrency-optimised CPU scheduler off); returns whether XLA_FLAGS changed. The
    command-line tools call it before JAX starts; a Python program that loads a quantized
    folder on CPU calls it (or sets XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false")
    before its first JAX call. A folder that is missing or not converted changes nothing (the
    loader reports what is wrong with it)."""
    folder = Path(folder)
    if not folder.is_dir() or not is_converted(folder) or read_scheme(folder) is None:
        return False
    return sequential_cpu_schedule()
