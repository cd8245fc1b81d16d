"""One sharding vocabulary for the whole model.

Modules name the axes of their activations with logical names (`shard(x, "batch", "seq",
"embed")`); a rules table maps logical names to mesh axes. Without an active mesh every call
here is a no-op, so the same code runs unsharded on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (or axes, or None for replicated)."""

    batch: str | tuple[str, ...] | None = ("data", "fsdp")
    seq: str | tuple[str, ...] | None = None
    embed: str | tuple[str, ...] | None = None
    heads: str | tuple[str, ...] | None = "tensor"
    kv_heads: str | tuple[str, ...] | None = "tensor"
    head_dim: str | tuple[str, ...] | None = None
    mlp: str | tuple[str, ...] | None = "tensor"
    vocab: str | tuple[str, ...] | None = "tensor"
    patches: str | tuple[str, ...] | None = None
    # Parameters: the "model" dimension of weights is split over fsdp.
    param_embed: str | tuple[str, ...] | None = "fsdp"

    def spec(self, *names: str | None) -> P:
        return P(*(None if n is None else getattr(self, n) for n in names))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar(
    "qwen2vl_mesh", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: ShardingRules | None = None):
    """Makes `shard()` constrain activations to `mesh` inside the block (at trace time)."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules or ShardingRules()))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, ShardingRules] | None:
    return _ACTIVE.get()


def shard(x: jax.Array, *names: str | None) -> jax.Array:
    """Constrains `x` to the logical axes `names`; does nothing without an active mesh."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec(*names)))
