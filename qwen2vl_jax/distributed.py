"""Flags every command-line tool shares for runs past one process, and the compile cache.

    parser = argparse.ArgumentParser(...)
    distributed.add_arguments(parser)        # --coordinator, --num-processes, --process-id,
                                             # --compile-cache DIR, --no-compile-cache
    args = parser.parse_args()
    distributed.enable_compile_cache(args)   # before anything compiles
    distributed.initialize(args)             # before anything touches a device

Multi-process: one process per host (or, on one machine, per group of devices), all running
the same command. Each learns where the coordinator (process 0) listens, how many processes
there are and which one it is from the flags, else from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID. A cluster manager that JAX knows (Cloud TPU, SLURM,
Open MPI, Kubernetes) provides what is not given; without one, a missing or inconsistent value
is an InputError naming its flag and variable. QWEN2VL_DISTRIBUTED=1 alone asks for a
multi-process run with everything left to the cluster manager. On CPU, cross-process
collectives go through Gloo.

The compile cache: JAX's persistent compilation cache, on by default, in
$XDG_CACHE_HOME/qwen2vl-jax/jax-cache (~/.cache/... without XDG_CACHE_HOME, or
$JAX_COMPILATION_CACHE_DIR when that is set). `--compile-cache DIR` or QWEN2VL_COMPILE_CACHE=DIR
moves it; `--no-compile-cache` or QWEN2VL_COMPILE_CACHE=0 turns it off. A second run on the
same shapes then loads its programs from disk instead of compiling them.

JAX is imported when a function needs it, so a tool's --help and flag errors stay quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from qwen2vl_jax.errors import InputError, first_line

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_DISTRIBUTED = "QWEN2VL_DISTRIBUTED"  # "1": a multi-process run, the cluster manager says the rest
ENV_CACHE = "QWEN2VL_COMPILE_CACHE"  # 0/off: no cache; a folder: the cache there
ENV_JAX_CACHE = "JAX_COMPILATION_CACHE_DIR"  # JAX's own; the default folder when set
CACHE_SUBDIR = Path("qwen2vl-jax") / "jax-cache"
# Programs that compile faster than this are not worth a disk read (JAX's default is 1 s, which
# leaves out every program of a small model on CPU and most decode steps).
CACHE_MIN_COMPILE_S = 0.1

_OFF = ("0", "off", "false", "no", "none")
_ON = ("", "1", "on", "true", "yes")


# ---------------------------------------------------------------------------- flags
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the multi-process and compile-cache flags (in their own help group)."""
    g = parser.add_argument_group(
        "multi-process and compilation",
        "Run the same command once per process (per host); a cluster manager JAX knows (Cloud TPU, "
        "SLURM, Open MPI) fills in what is not given.")
    g.add_argument("--coordinator", default=None, metavar="ADDR:PORT",
                   help=f"where process 0 listens for the others (default: ${ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"how many processes run together (default: ${ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process's id, 0 .. N-1; process 0 prints and writes (default: ${ENV_PROCESS_ID})")
    g.add_argument("--compile-cache", default=None, metavar="DIR",
                   help=f"keep compiled programs in DIR (default: ${ENV_CACHE}, else "
                        f"$XDG_CACHE_HOME/{CACHE_SUBDIR} or ~/.cache/{CACHE_SUBDIR})")
    g.add_argument("--no-compile-cache", action="store_true",
                   help=f"compile everything afresh and keep nothing (as {ENV_CACHE}=0)")
    return parser


# ---------------------------------------------------------------------------- multi-process
@dataclasses.dataclass(frozen=True)
class Cluster:
    """What `jax.distributed.initialize` gets; None fields are left to the cluster manager."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None


def _int_value(flag: str, env: str, given, environ: Mapping[str, str]) -> int | None:
    if given is not None:
        return int(given)
    raw = environ.get(env, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{env}={raw!r} ({flag}) is not a whole number") from None


def _source(flag: str, env: str, from_flag: bool) -> str:
    return flag if from_flag else env


def cluster_manager() -> str | None:
    """The name of a cluster environment JAX detects by itself (SlurmCluster, GceTpuCluster,
    ...), or None. When JAX's detection cannot be asked, "unknown": JAX then decides."""
    try:
        from jax._src import clusters  # noqa: PLC0415 - JAX's own detection, private
        kinds = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):
        return "unknown"
    for kind in kinds:
        try:
            if kind.is_env_present():
                return kind.__name__
        except Exception:  # a detector that cannot tell (no metadata server, ...)
            continue
    return None


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
            detect=cluster_manager) -> Cluster | None:
    """The multi-process settings asked for by the flags and environment, checked; None for a
    single-process run. Raises InputError (one line naming the flags) for a bad or missing value."""
    environ = os.environ if environ is None else environ
    coord_flag = getattr(args, "coordinator", None)
    coordinator = coord_flag if coord_flag is not None else (environ.get(ENV_COORDINATOR, "").strip() or None)
    num = _int_value("--num-processes", ENV_NUM_PROCESSES, getattr(args, "num_processes", None), environ)
    pid = _int_value("--process-id", ENV_PROCESS_ID, getattr(args, "process_id", None), environ)
    asked = environ.get(ENV_DISTRIBUTED, "").strip().lower() not in _OFF + ("",)
    if coordinator is None and num is None and pid is None:
        return Cluster(None, None, None) if asked else None

    if coordinator is not None:
        where = _source("--coordinator", ENV_COORDINATOR, coord_flag is not None)
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"{where} {coordinator!r} is not ADDR:PORT (e.g. 10.0.0.2:1234 or localhost:1234)")
    if num is not None and num < 1:
        where = _source("--num-processes", ENV_NUM_PROCESSES, getattr(args, "num_processes", None) is not None)
        raise InputError(f"{where} must be at least 1, got {num}")
    if pid is not None and (pid < 0 or (num is not None and pid >= num)):
        where = _source("--process-id", ENV_PROCESS_ID, getattr(args, "process_id", None) is not None)
        limit = f"0 .. {num - 1}" if num is not None else "at least 0"
        raise InputError(f"{where} must be {limit}" + (f" for {num} processes" if num is not None else "")
                         + f", got {pid}")
    missing = [f"{flag} (or {env})" for flag, env, value in (
        ("--coordinator", ENV_COORDINATOR, coordinator), ("--num-processes", ENV_NUM_PROCESSES, num),
        ("--process-id", ENV_PROCESS_ID, pid)) if value is None]
    if missing and detect() is None:
        raise InputError(f"a multi-process run needs {', '.join(missing)}: no cluster manager (Cloud TPU, SLURM, "
                         "Open MPI) provides them here, so give --coordinator, --num-processes and --process-id")
    return Cluster(coordinator, num, pid)


_initialized: Cluster | None = None


def initialize(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> bool:
    """Joins the multi-process run the flags or environment ask for (`resolve`); -> True when
    this is one (then call it before anything touches a device). Calling it again is a no-op."""
    global _initialized
    cluster = resolve(args, environ)
    if cluster is None:
        return False
    if _initialized is not None:
        return True
    import jax  # noqa: PLC0415

    if str(jax.config.jax_cpu_collectives_implementation or "none").lower() == "none":
        # CPU devices of different processes talk through Gloo (without it, no cross-process
        # collective runs on CPU); GPU and TPU backends ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                                   process_id=cluster.process_id)
    except ValueError as e:  # what a cluster manager could not fill in
        raise InputError(f"multi-process run: {first_line(e)} (give --coordinator, --num-processes and "
                         "--process-id)") from None
    except RuntimeError as e:
        if "before" in str(e) or "already" in str(e):  # a caller's bug: devices used first
            raise
        where = cluster.coordinator or "the cluster's coordinator"
        raise InputError(f"could not join the multi-process run at {where} as process {cluster.process_id} of "
                         f"{cluster.num_processes}: {first_line(e)}") from None
    _initialized = cluster
    _native_stdout_to_stderr()
    return True


def _native_stdout_to_stderr() -> None:
    """Points file descriptor 1 at stderr and gives Python's sys.stdout a descriptor of its own
    on the real stdout. The collectives' native code (Gloo prints "... connected to N peer ranks")
    writes to descriptor 1; without this, that chatter lands inside a tool's JSON output."""
    try:
        if sys.stdout is None or sys.stdout.fileno() != 1:
            return  # stdout already replaced (a test's capture, an embedding application)
    except (AttributeError, OSError, ValueError):
        return
    sys.stdout.flush()
    kept = os.dup(1)
    os.dup2(2, 1)
    line_buffered = getattr(sys.stdout, "line_buffering", False)
    sys.stdout = open(kept, "w", buffering=1 if line_buffered else -1, encoding=sys.stdout.encoding,  # noqa: SIM115
                      errors=sys.stdout.errors, closefd=True)


def is_leader() -> bool:
    """True in process 0, the one that prints and writes (and in a single-process run)."""
    import jax  # noqa: PLC0415

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing to wait for alone)."""
    import jax  # noqa: PLC0415

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def allgather_bytes(blob: bytes) -> list[bytes]:
    """Every process's `blob`, in process order (a device all-gather; call it from the same
    thread at the same point in every process). Alone: [blob]."""
    import jax  # noqa: PLC0415

    if jax.process_count() == 1:
        return [blob]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(blob)], np.int64))).reshape(-1)
    width = 1 << max(6, int(sizes.max() - 1).bit_length())  # a power of two: few shapes to compile
    padded = np.zeros((width,), np.uint8)
    padded[:len(blob)] = np.frombuffer(blob, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), width)
    return [every[i, :int(n)].tobytes() for i, n in enumerate(sizes)]


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """name -> array as bytes (numpy's .npz format, no pickles)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------- compile cache
def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/qwen2vl-jax/jax-cache, else
    ~/.cache/qwen2vl-jax/jax-cache."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_JAX_CACHE, "").strip():
        return Path(environ[ENV_JAX_CACHE].strip()).expanduser()
    base = environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / CACHE_SUBDIR


def compile_cache_dir(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """(the cache folder or None for no cache, where that came from: the flag, the variable or
    "" for the default)."""
    environ = os.environ if environ is None else environ
    if getattr(args, "no_compile_cache", False):
        return None, "--no-compile-cache"
    given = getattr(args, "compile_cache", None)
    if given is not None:
        if not str(given).strip():
            raise InputError("--compile-cache needs a folder (--no-compile-cache turns the cache off)")
        return Path(given).expanduser(), "--compile-cache"
    value = environ.get(ENV_CACHE, "").strip()
    if value.lower() in _OFF:
        return None, ENV_CACHE
    if value.lower() not in _ON:
        return Path(value).expanduser(), f"{ENV_CACHE}="
    return default_cache_dir(environ), ""


def enable_compile_cache(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Path | None:
    """Turns JAX's persistent compilation cache on in the folder `compile_cache_dir` picks
    (call it before anything compiles); -> the folder, or None when it is off. A folder the
    user named that cannot be made is an InputError; the default one is skipped with a note."""
    folder, source = compile_cache_dir(args, environ)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
    except OSError as e:
        why = e.strerror or str(e)
        if source:
            name = f"{source}{folder}" if source.endswith("=") else f"{source} {folder}"
            raise InputError(f"{name}: cannot use it as the compile cache ({why})") from None
        print(f"note: compile cache off: cannot use {folder} ({why}); --compile-cache DIR picks another folder",
              file=sys.stderr)
        return None
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    return folder
