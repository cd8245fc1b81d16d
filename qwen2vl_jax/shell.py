"""The one command-line shell of qwen2vl-generate, -convert, -export and -train.

    def main(argv=None) -> int:
        args = parser().parse_args(argv)          # argparse's own errors: "PROG: error: ...", 2
        return shell.run("qwen2vl-convert", lambda: work(args))

`run` calls `main()` with Ctrl-C and SIGTERM handled by `interrupts.installed()` (SIGTERM, a
job's time limit, unwinds like Ctrl-C, so the work cleans up on the way out), and turns what
escapes into one line on stderr and an exit status, the same for every tool:

    InputError (CheckpointError too)   PROG: error: <the message's first line>      2
    OSError (disk full, permissions)   PROG: error: <strerror>: <file>              1
    KeyboardInterrupt                  PROG: <interrupted(e), or "interrupted">    130
    BrokenPipeError (`... | head`)     nothing; stdout goes to /dev/null           141

`main()` returning None is status 0. Anything else escapes as a traceback: it is a bug.
Every tool's parser also gets `--version` from `add_version`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from typing import Callable

from qwen2vl_jax import interrupts
from qwen2vl_jax.errors import InputError, first_line

DISTRIBUTION = "qwen2vl-jax"  # the name pip knows the package by
EXIT_INPUT = 2  # as argparse exits on a bad flag
EXIT_OS = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def run(prog: str, main: Callable[[], int | None], *,
        interrupted: Callable[[KeyboardInterrupt], str] | None = None) -> int:
    """Runs `main()` as the body of the command-line tool `prog` -> its exit status (see the
    module doc). `interrupted(e)` says what a Ctrl-C left behind, e.g. "interrupted; nothing
    was written"; it is printed after "PROG: "."""
    try:
        with interrupts.installed():
            try:
                status = main()
            except Exception:
                interrupts.check()  # an error an interrupt caused (inside Orbax, say) is the interrupt
                raise
    except InputError as e:
        _say(prog, f"error: {first_line(e)}")
        return EXIT_INPUT
    except KeyboardInterrupt as e:
        _quiet_abandoned_work()
        what = interrupted(e) if interrupted is not None else None
        _say(prog, what or "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away: stop quietly, as other command-line tools do, and keep Python's
        # final flush of stdout from failing again at exit.
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except OSError as e:  # disk full, permissions, a folder that vanished
        _say(prog, f"error: {os_error_line(e)}")
        return EXIT_OS
    return 0 if status is None else int(status)


def os_error_line(e: OSError) -> str:
    """One line for an OSError: 'No space left on device: /runs/out/params' (strerror and the
    file when it has them), else its message's first line."""
    if e.strerror:
        files = [str(f) for f in (e.filename, e.filename2) if f is not None]
        what = f"{e.strerror}: {' -> '.join(files)}" if files else e.strerror
    else:
        what = first_line(e)
    return " ".join(what.split()) or type(e).__name__


def add_version(parser: argparse.ArgumentParser, prog: str) -> None:
    """Gives a tool's parser `--version`, which prints `PROG VERSION` (the installed
    qwen2vl-jax's version) and exits 0, as every tool of the package does."""
    parser.add_argument("--version", action="version", version=f"{prog} {version()}",
                        help="print the version and exit")


def version() -> str:
    """The installed qwen2vl-jax's version (pyproject.toml's), or 'unknown' when the package
    runs from a checkout that was never installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def quiet_libraries() -> None:
    """Keeps TensorFlow's C++ logging (via Orbax) and absl's warnings out of a tool's stderr;
    call it before JAX or Orbax is imported."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.ERROR)



def _say(prog: str, text: str) -> None:
    try:
        print(f"{prog}: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # no stderr left to tell
        pass


def _quiet_abandoned_work() -> None:
    """A second Ctrl-C can cut an Orbax read short; what it leaves pending is reported by
    asyncio and the warnings module at exit, as noise after the one line that matters."""
    import logging
    import warnings

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured, closed)
        pass


def add_model_arguments(p) -> None:
    """The flags every tool that loads a model for inference takes (qwen2vl-generate, -serve):
    mesh, dtype, matmul precision, the scanned decoder, a LoRA adapter."""
    p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                   help="shard over a device mesh (axes left out are 1; data takes the rest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--matmul", choices=["f32", "bf16"], default=None,
                   help="products of 64 rows or more (vision tower, prefill): f32, or bf16 inputs with f32 "
                        "accumulation, about 2x faster on CPUs with bf16 dot instructions "
                        "(default: $QWEN2VL_MATMUL, else f32)")
    p.add_argument("--scan-layers", action="store_true",
                   help="run the decoder's layers as one scanned layer: compiling no longer grows with depth "
                        "(72B compiles about as fast as 2B), for large models on accelerators")
    p.add_argument("--adapter", default=None, metavar="PATH",
                   help="a PEFT LoRA adapter folder (qwen2vl-train --lora-rank's OUT/adapter, or peft's) "
                        "applied over the model; the base weights stay as stored")
    p.add_argument("--merge-adapter", action="store_true",
                   help="add the adapter into the float weights once at load (no per-token cost)")
