"""Counting XLA compilations, so tests can show that a new shape inside a bucket costs none;
and the switch for the session's persistent compilation cache (conftest.py), which a counted
block turns off: a program read back from the cache is no backend compilation."""

from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def persistent_compile_cache(folder):
    """Inside the block JAX's persistent compilation cache is `folder` (None: off), with every
    program cached whatever its compile time; afterwards, what it was."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None if folder is None else str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()  # the cache opens its folder once: open the new one
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()


@contextlib.contextmanager
def count_compiles():
    """`with count_compiles() as c: ...; c["n"]`: backend compilations inside the block (with
    the persistent compilation cache off, so a program new to this process is compiled and
    counted even when another test compiled the same one)."""
    counter = {"n": 0}

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counter["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with persistent_compile_cache(None):
            yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
