"""The resident training state of full fine-tuning, LoRA and QLoRA per model size, from the
parameter shapes alone (nothing is allocated or compiled).

    python benchmarks/train_state.py [--models 2b,7b,72b] [--rank 16]
                                     [--targets DEFAULT|REGEX] [--merger] [--compute-dtype float32]

What the trainer holds between steps (train/loop.py): every trained floating parameter as a
float32 master copy, the frozen base of a LoRA run in the compute dtype (`loop.held_dtype`:
bfloat16 with `--compute-dtype bfloat16`) and full training's frozen parameters in float32,
packed integer weights and their scales as stored (QLoRA on a `qwen2vl-convert --quantize` folder),
and for each trained parameter AdamW's two float32 moments; a step adds its gradients (float32,
trained parameters only) and the activations, which depend on the batch, --remat and the
mesh and are not counted here (benchmarks/scale.py compiles whole steps). The LoRA adapters are
rank --rank on the decoder's q/k/v/o and gate/up/down projections, plus the merger with
--merger. Prints one table, GiB over all chips (divide by the chips of an FSDP mesh).
"""

from __future__ import annotations

import argparse
import sys

GiB = 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="2b,7b,72b")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default=None, help="the adapted kernels' regex (default: the decoder's projections)")
    p.add_argument("--merger", action="store_true", help="adapt the merger's two linears too")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the run's --compute-dtype: the dtype a LoRA run holds its frozen float base in")
    args = p.parse_args(argv)

    import numpy as np

    from qwen2vl_jax.config import PRESETS
    from qwen2vl_jax.lora.tree import DEFAULT_TARGETS, target_kernels
    from qwen2vl_jax.modules.qwen2vl import init_shapes
    from qwen2vl_jax.params import flatten
    from qwen2vl_jax.quant.format import RUNTIME_PARTS, Scheme
    from qwen2vl_jax.quant.tree import abstract as packed_shapes

    pattern = (args.targets or DEFAULT_TARGETS) + ("|^visual/merger/mlp_[02]/kernel$" if args.merger else "")

    def held(tree, frozen: int = 4) -> int:
        """Bytes of a frozen base as the trainer holds it: floats in `frozen` bytes (a packed
        layer's scales in float32), packed integers as stored."""
        def one(path, x):
            if not np.issubdtype(x.dtype, np.floating):
                return np.dtype(x.dtype).itemsize
            return 4 if path.rpartition("/")[2] in RUNTIME_PARTS else frozen
        return sum(int(np.prod(x.shape)) * one(k, x) for k, x in flatten(tree).items())

    base = 2 if args.compute_dtype == "bfloat16" else 4  # a LoRA run's frozen floats

    print(f"resident training state, GiB over all chips (activations and gradients not counted); "
          f"LoRA rank {args.rank} on {pattern}; compute {args.compute_dtype}")
    head = f"{'model':6} {'params':>8} {'method':14} {'trained':>9} {'weights':>8} {'AdamW':>8} {'state':>8}"
    print(head)
    print("-" * len(head))
    for name in args.models.split(","):
        shapes = init_shapes(PRESETS[name])
        flat = flatten(shapes)
        total = sum(int(np.prod(x.shape)) for x in flat.values())
        lora = sum(args.rank * sum(flat[k].shape) for k in target_kernels(shapes, pattern))
        rows = [("full", total, held(shapes))]
        rows.append(("LoRA", lora, held(shapes, base) + 4 * lora))
        for w in ("int8", "int4"):
            rows.append((f"QLoRA {w}", lora, held(packed_shapes(shapes, Scheme.of(w)), base) + 4 * lora))
        for method, trained, weights in rows:
            opt = 8 * trained
            print(f"{name:6} {total / 1e9:7.2f}B {method:14} {trained / 1e6:8.1f}M {weights / GiB:8.1f} "
                  f"{opt / GiB:8.1f} {(weights + opt) / GiB:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
