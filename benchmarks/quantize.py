"""Parameter bytes of Qwen2-VL 2B/7B/72B in bfloat16, int8 and int4 (jax.eval_shape: nothing is
allocated), and what one chip of a v5e-8 (16 GiB of HBM each) holds of the 72B laid out with
tensor=8: its parameters and the room left, against an 8k-token bf16 KV cache.

    python benchmarks/quantize.py [--devices 8] [--mesh tensor=8] [--kv-tokens 8192] [--hbm-gib 16]

int8: every decoder linear (q, k, v, o, gate, up, down) with a scale per output channel;
int4: groups of 128 input rows with a scale and a zero point each; both with the output head
(and the embedding) in int8 and the vision tower in bf16 (qwen2vl_jax.quant).
"""

from __future__ import annotations

import argparse
import math
import sys

GIB = 1024**3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8, a v5e-8)")
    ap.add_argument("--mesh", default="tensor=8", help="the 72B's layout (default tensor=8)")
    ap.add_argument("--kv-tokens", type=int, default=8192)
    ap.add_argument("--hbm-gib", type=float, default=16.0, help="memory of one chip (v5e: 16 GiB)")
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    jax.config.update("jax_platforms", "cpu")
    import jax.numpy as jnp
    import numpy as np

    from qwen2vl_jax.config import PRESETS
    from qwen2vl_jax.engine import KVCache
    from qwen2vl_jax.modules.qwen2vl import init_shapes
    from qwen2vl_jax.params import flatten
    from qwen2vl_jax.quant.format import LINEARS, Scheme, float_leaf
    from qwen2vl_jax.quant.tree import abstract
    from qwen2vl_jax.sharding import ShardingRules, check_groups, make_mesh, param_shardings

    def nbytes(leaf) -> int:
        return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize

    schemes = {"bf16": None, "int8": Scheme.of("int8"), "int4": Scheme.of("int4")}
    trees = {}
    print(f"{'model':6s} {'scheme':6s} {'params GB':>10s} {'decoder linears GB':>19s} {'vs bf16':>8s}")
    for name in ("2b", "7b", "72b"):
        config = PRESETS[name]
        base = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), init_shapes(config))
        for label, scheme in schemes.items():
            tree = base if scheme is None else abstract(base, scheme)
            trees[name, label] = tree
            total = sum(nbytes(x) for x in jax.tree_util.tree_leaves(tree))
            linears = sum(nbytes(x) for p, x in flatten(tree).items() if LINEARS.match(float_leaf(p)))
            ref = sum(nbytes(x) for x in jax.tree_util.tree_leaves(base))
            print(f"{name:6s} {label:6s} {total / 1e9:10.2f} {linears / 1e9:19.2f} {total / ref:8.2f}")

    config = PRESETS["72b"]
    mesh = make_mesh(args.mesh)
    rules = ShardingRules()
    cache = KVCache.abstract(config.text, 1, args.kv_tokens, jnp.bfloat16)
    cache_sh = cache.shardings(mesh, rules)
    kv = sum(math.prod(s.shard_shape(x.shape)) * 2 for x, s in zip((*cache.k, *cache.v), (*cache_sh.k, *cache_sh.v)))
    print(f"\n72B on {args.devices} devices ({args.mesh}), per device; KV cache of {args.kv_tokens} tokens "
          f"(batch 1, bf16): {kv / GIB:.2f} GiB")
    print(f"{'scheme':6s} {'params GiB':>10s} {'+ KV GiB':>9s} {'of HBM GiB':>10s} {'fits':>5s}")
    for label in schemes:
        tree = trees["72b", label]
        shardings = param_shardings(tree, mesh, rules)
        per = max(sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                      for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings))), 0)
        try:
            check_groups(tree, shardings)
            note = ""
        except Exception as e:  # a group that tensor=8 would cut: say which
            note = f"  (refused: {str(e)[:120]}...)"
        fits = per + kv <= args.hbm_gib * GIB
        print(f"{label:6s} {per / GIB:10.2f} {(per + kv) / GIB:9.2f} {args.hbm_gib:10.1f} {'yes' if fits else 'no':>5s}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
