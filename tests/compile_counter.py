"""Counting XLA compilations, so tests can show that a new shape inside a bucket costs none."""

from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def count_compiles():
    """`with count_compiles() as c: ...; c["n"]`: backend compilations inside the block."""
    counter = {"n": 0}

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counter["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
