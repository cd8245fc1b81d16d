"""Qwen2-VL 2B / 7B / 72B on an 8-chip slice, on paper but compiled.

    python benchmarks/scale.py [--models 2b,7b,72b] [--parts prefill,decode,train]
                               [--batch 1] [--prompt 2048] [--new 512] [--weights bf16,int8,int4]
                               [--decoder scan,loop] [--train-batch 8] [--train-length 2048]
                               [--train-methods full,lora] [--fit-micro 4,2,1]

Nothing is allocated: the parameters, cache, decode state, train state and batches are
abstract shapes with their shardings, and each program is lowered and compiled by XLA for 8
simulated CPU devices with the same functions that run for real (`engine.Engine`'s prefill and
decode step, `train.loop.Trainer.step_function`). Per device it prints the parameter bytes,
the KV cache of `--batch` rows of `--prompt` + `--new` slots (the weights bf16, or with
`--weights int8,int4` also packed as `qwen2vl-convert --quantize` writes them), XLA's memory analysis
(arguments, temporaries, outputs; donated buffers counted once), whether it fits a device of a
v2-8 or v3-8 (one core: 8 or 16 GiB), a v5e (16 GiB), v4 (32 GiB) or v5p (95 GiB) chip, and the
seconds lowering + compiling took (wall, and the CPU time of the process, which a busy machine
does not inflate). A row's mesh says how many such devices it takes: fsdp=1 one, fsdp=4 four
(a v4-8), otherwise eight (a v5e-8, a whole v2-8 / v3-8).

The meshes are what a v5e-8 / v4-8 user picks: inference tensor-parallel as far as the KV heads
allow (2B: 2 KV heads, 7B: 4, 72B: 8), with fsdp over the rest; training FSDP over all 8 chips
(params, gradients and AdamW state in float32, the forward in bfloat16, every block
rematerialised, the vocabulary logits made 2048 tokens at a time); `--train-methods lora` adds
LoRA rows (rank-16 adapters on the decoder's projections and the merger, stage 3's labels, the
base frozen and held as the trainer holds it: bfloat16, the compute dtype, or packed int8/int4
for QLoRA; the adapters and their AdamW state float32) on the meshes of LORA_ROWS: one device,
a v4-8's 4 chips, 8 devices. Every train row names the micro-batch one device computes (rows of
the batch axis a device holds x tokens); a one-device row is compiled again at each
`--fit-micro` row count: the micro-batches `--batch-size R --accum N` with `--remat` trains on
one chip, so the one whose peak fits shows. Last come the asked fits (ASKED), yes or no by floor
and by peak at each micro-batch. Bytes are XLA's CPU
figures: a TPU compile lays out (and fuses) differently, so read them as the size of the
problem per chip, not as a TPU's exact peak. In particular XLA:CPU has no bfloat16 matrix
multiply: it converts bf16 weights to float32 copies, which its temporaries include (a TPU
multiplies bf16 directly). So each chip column says two things, "floor/peak": whether the
resident floor (parameters + optimizer state + KV cache) fits, and whether XLA:CPU's whole
peak fits. A TPU's peak lies between the two.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen2vl_jax.config import PRESETS  # noqa: E402
from qwen2vl_jax.errors import InputError  # noqa: E402
from qwen2vl_jax.engine import Engine, KVCache, RowSettings  # noqa: E402
from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule, init_shapes  # noqa: E402
from qwen2vl_jax.params import flatten, stack_layers  # noqa: E402
from qwen2vl_jax.quant.format import Scheme  # noqa: E402
from qwen2vl_jax.quant.tree import abstract as packed_shapes  # noqa: E402
from qwen2vl_jax.sampling import GenerationConfig  # noqa: E402
from qwen2vl_jax.sharding import ShardingRules, check_groups, make_mesh, named_sharding, param_shardings  # noqa: E402
from qwen2vl_jax.lora.layer import A as LORA_A, B as LORA_B, SCALE as LORA_SCALE  # noqa: E402
from qwen2vl_jax.lora.tree import DEFAULT_TARGETS, TRAINABLE as LORA_TRAINABLE, attach, target_kernels  # noqa: E402
from qwen2vl_jax.train import loop, stages  # noqa: E402

GiB = 1024 ** 3
# HBM per device: a v5e, v4 or v5p chip, or one core of a v2-8 / v3-8 (Colab's TPU: 8 cores, each
# its own JAX device). A v4-8 is 4 chips (two cores each, one JAX device per chip).
CHIPS = {"v2": 8 * GiB, "v3": 16 * GiB, "v5e": 16 * GiB, "v4": 32 * GiB, "v5p": 95 * GiB}
INFER_MESH = {"2b": "fsdp=4,tensor=2", "7b": "fsdp=2,tensor=4", "72b": "tensor=8"}
TRAIN_MESH = {"2b": "fsdp=8", "7b": "fsdp=8", "72b": "fsdp=8"}
# --train-methods lora: (method, mesh) rows. fsdp=1: one v5e chip, or one core of a v2-8/v3-8;
# fsdp=8: a v5e-8, or a whole v2-8/v3-8; fsdp=4: a v4-8 (4 chips of 32 GiB).
LORA_ROWS = {"2b": (("lora", "fsdp=1"), ("lora", "fsdp=8")),
             "7b": (("lora", "fsdp=1"), ("qlora-int8", "fsdp=1"), ("qlora-int4", "fsdp=1"), ("lora", "fsdp=8")),
             "72b": (("qlora-int8", "fsdp=8"), ("qlora-int4", "fsdp=8"), ("qlora-int8", "fsdp=4"),
                     ("qlora-int4", "fsdp=4"))}
# What is asked to fit (issue 29): (model as the table names it, mesh, device memory, where).
ASKED = (("2b lora", "fsdp=1", 16 * GiB, "one 16 GiB chip (v5e, a v3-8 core)"),
         ("7b qlora-int8", "fsdp=1", 16 * GiB, "one 16 GiB chip"),
         ("7b qlora-int4", "fsdp=1", 16 * GiB, "one 16 GiB chip"),
         ("72b qlora-int8", "fsdp=8", 16 * GiB, "a v5e-8"),
         ("72b qlora-int4", "fsdp=8", 16 * GiB, "a v5e-8"))


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest)."""
    total = {}
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        for d in x.sharding.device_set:
            total[d] = total.get(d, 0) + int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
    return max(total.values())


def abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    args, temp, out, alias = (int(m.argument_size_in_bytes), int(m.temp_size_in_bytes),
                              int(m.output_size_in_bytes), int(m.alias_size_in_bytes))
    return {"arguments": args, "temporaries": temp, "outputs": out, "peak": args + temp + out - alias}


def compile_timed(fn, *args, **kw):
    """-> (compiled, (wall seconds, CPU seconds of this process)) of lowering + compiling."""
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = fn.lower(*args, **kw).compile()
    return compiled, (time.perf_counter() - t0, time.process_time() - c0)


# ---------------------------------------------------------------------------- inference
def inference(name: str, batch: int, prompt: int, new: int, parts: set[str], weights: str = "bf16",
              scan: bool = True) -> list[dict]:
    config = PRESETS[name]
    mesh_spec, rules = INFER_MESH[name], ShardingRules()
    dtype = jnp.bfloat16
    # stored in the compute dtype, as from_pretrained(dtype=bfloat16) loads them
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), init_shapes(config))
    if weights != "bf16":  # the packed tree `qwen2vl-convert --quantize` writes (scales float32)
        params = packed_shapes(params, Scheme.of(weights))
        try:
            check_groups(params, param_shardings(params, make_mesh(mesh_spec), rules))
        except InputError:  # a tensor split would cut 4-bit groups: split the rows' other dimension
            mesh_spec = "fsdp=8"
    if scan:  # the scanned decoder takes its layers stacked
        params = stack_layers(params)
    mesh = make_mesh(mesh_spec)
    layout = param_shardings(params, mesh, rules)
    params = abstract(params, layout)
    # built for TPU: the programs a slice compiles, not this host's CPU kernels (packed matmuls, cuDNN)
    engine = Engine(Qwen2VLModule(config, dtype, scan_layers=scan, backend="tpu"), mesh, rules, params_sharding=layout)
    slots = prompt + new
    cache = KVCache.abstract(config.text, batch, slots, dtype, stacked=scan)
    cache = abstract(cache, cache.shardings(mesh, rules))
    base = {"model": name if weights == "bf16" else f"{name} {weights}", "mesh": mesh_spec,
            "decoder": "scan" if scan else "loop",
            "layers": config.text.num_hidden_layers, "params": per_device_bytes(params),
            "kv_cache": per_device_bytes(cache)}

    def put(shape, dt, *axes):
        return jax.ShapeDtypeStruct(shape, dt, sharding=named_sharding(mesh, rules, shape, *axes))

    inputs = {"input_ids": put((batch, prompt), jnp.int32, "batch"),
              "positions": put((3, batch, prompt), jnp.int32, None, "batch"),
              "mask": put((batch, prompt), jnp.bool_, "batch"),
              "pos_offset": put((batch,), jnp.int32, "batch")}
    # an offline batch's settings: one row each, one key for the batch
    settings = jax.tree_util.tree_map(lambda x: put(np.shape(x), np.asarray(x).dtype),
                                      RowSettings.repeat(GenerationConfig(max_new_tokens=new), batch))
    rows = []
    # (..., slots, greedy, logprobs, allow): greedy rows, no logprobs, no token mask
    compiled, seconds = compile_timed(engine.program("prefill"), params, inputs, None, settings, slots, True, False,
                                      None)
    if "prefill" in parts:
        rows.append({**base, "part": f"prefill {batch}x{prompt}", **memory(compiled), "compile_s": seconds})
    if "decode" in parts:
        state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       engine.program("prefill").eval_shape(params, inputs, None, settings, slots,
                                                                            True, False, None)[0],
                                       compiled.output_shardings[0])
        step, seconds = compile_timed(engine.program("step"), params, state, batch, slots, True, False, None)
        rows.append({**base, "part": f"decode step {batch}x{slots}", **memory(step), "compile_s": seconds})
    return rows


# ---------------------------------------------------------------------------- training
def lora_shapes(config, rank: int = 16) -> dict:
    """ShapeDtypeStructs of a fresh adapter (as lora.tree.init_adapter makes it) on the decoder's
    projections and the merger."""
    shapes = init_shapes(config)
    flat = flatten(shapes)
    out = {}
    for path in target_kernels(shapes, DEFAULT_TARGETS + "|^visual/merger/mlp_[02]/kernel$"):
        head = path.rpartition("/")[0]
        n_in, n_out = flat[path].shape
        out[f"{head}/{LORA_A}"] = jax.ShapeDtypeStruct((n_in, rank), jnp.float32)
        out[f"{head}/{LORA_B}"] = jax.ShapeDtypeStruct((rank, n_out), jnp.float32)
        out[f"{head}/{LORA_SCALE}"] = jax.ShapeDtypeStruct((), jnp.float32)
    return out


def training(name: str, batch: int, length: int, scan: bool = True, method: str = "full",
             mesh_spec: str | None = None) -> dict:
    """method: full (stage 2, every weight), lora (rank-16 adapters on the decoder and merger over
    the float base), qlora-int8 / qlora-int4 (the same over the packed base)."""
    config = PRESETS[name]
    mesh_spec = mesh_spec or TRAIN_MESH[name]
    chips = int(np.prod([int(x.split("=")[1]) for x in mesh_spec.split(",")]))
    mesh = make_mesh(mesh_spec, devices=jax.devices()[:chips])
    params, stage = init_shapes(config), stages.get_stage(2)
    if method != "full":
        if method.startswith("qlora-"):
            params = packed_shapes(params, Scheme.of(method.split("-")[1]))
        params, stage = attach(params, lora_shapes(config)), stages.get_stage(3, train=(LORA_TRAINABLE,))
    if scan:
        params = stack_layers(params)
    trainer = loop.Trainer(config, stage, 1000, mesh=mesh, remat=True, compute_dtype=jnp.bfloat16,
                           scan_layers=scan, backend="tpu")
    state = trainer.abstract_state(params)
    arrays = {"input_ids": np.zeros((1, batch, length), np.int32), "attention_mask": np.zeros((1, batch, length), bool),
              "labels": np.zeros((1, batch, length), np.int32), "positions": np.zeros((1, 3, batch, length), np.int32)}
    placed = abstract(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), arrays),
                      trainer.batch_shardings(arrays))
    compiled, seconds = compile_timed(trainer.step_function(state), state, placed)
    rows = batch // max(1, mesh.shape["data"] * mesh.shape["fsdp"])  # the rows of the batch axis a device holds
    return {"model": name if method == "full" else f"{name} {method}", "mesh": mesh_spec,
            "layers": config.text.num_hidden_layers, "decoder": "scan" if scan else "loop",
            "part": f"train {batch}x{length}, {rows}x{length}/dev", "micro": rows,
            "params": per_device_bytes(state.params),
            "opt_state": per_device_bytes(state.opt_state), "kv_cache": 0, **memory(compiled), "compile_s": seconds}


# ---------------------------------------------------------------------------- the table
def gib(n: int) -> str:
    return f"{n / GiB:7.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="2b,7b,72b")
    p.add_argument("--parts", default="prefill,decode,train")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--prompt", type=int, default=2048, help="prompt bucket (tokens)")
    p.add_argument("--new", type=int, default=512, help="cache slots after the prompt")
    p.add_argument("--weights", default="bf16",
                   help="comma list of bf16, int8, int4: the inference rows' weights (int8/int4: packed as "
                        "qwen2vl-convert --quantize writes them)")
    p.add_argument("--decoder", default="scan",
                   help="comma list of scan (the decoder's layers as one scanned layer: compile time "
                        "independent of depth) and loop (one traced copy per layer)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-length", type=int, default=2048)
    p.add_argument("--fit-micro", default="4,2,1",
                   help="comma list of rows: each one-device LoRA row is compiled again at each (empty: not)")
    p.add_argument("--train-methods", default="full",
                   help="comma list of full (stage 2 on TRAIN_MESH) and lora (the LoRA and QLoRA rows of "
                        "LORA_ROWS: 2B/7B on one chip and on 8, 72B QLoRA on 8 and on a v4-8's 4)")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    decoders = args.decoder.split(",")
    if set(decoders) - {"scan", "loop"}:
        p.error(f"--decoder {args.decoder!r}: give scan, loop or both")
    rows = []
    for name in args.models.split(","):
        for decoder in decoders:
            scan = decoder == "scan"
            for weights in args.weights.split(",") if parts & {"prefill", "decode"} else ():
                rows += inference(name, args.batch, args.prompt, args.new, parts, weights, scan)
                print(f"# {name} {weights} {decoder} inference compiled", file=sys.stderr, flush=True)
            if "train" in parts and "full" in args.train_methods.split(","):
                rows.append(training(name, args.train_batch, args.train_length, scan))
                print(f"# {name} {decoder} training compiled", file=sys.stderr, flush=True)
            if "train" in parts and "lora" in args.train_methods.split(","):
                for method, mesh_spec in LORA_ROWS.get(name, ()):
                    rows.append(training(name, args.train_batch, args.train_length, scan, method, mesh_spec))
                    print(f"# {name} {method} {mesh_spec} {decoder} training compiled", file=sys.stderr, flush=True)
                    # one device: the smaller micro-batches `--accum` trains with, for the one whose peak fits
                    for micro in [int(x) for x in args.fit_micro.split(",") if x] if mesh_spec == "fsdp=1" else ():
                        if micro >= args.train_batch:
                            continue
                        rows.append(training(name, micro, args.train_length, scan, method, mesh_spec))
                        print(f"# {name} {method} {mesh_spec} {decoder} training at {micro} rows compiled",
                              file=sys.stderr, flush=True)
    print(f"per device, GiB, on simulated devices (jax {jax.__version__}, XLA CPU); floor = params + opt + kv; "
          f"peak = arguments + temporaries + outputs - donated; fits: floor/peak on a device of "
          + ", ".join(f"{c} ({n // GiB} GiB)" for c, n in CHIPS.items()))
    chips = " ".join(f"{c:7}" for c in CHIPS)
    head = (f"{'model':15} {'layers':>6} {'decoder':7} {'mesh':16} {'program':30} {'params':>7} {'opt':>7} {'kv':>7} "
            f"{'floor':>7} {'args':>7} {'temp':>7} {'out':>7} {'peak':>7}  {chips} {'compile_s':>9} {'cpu_s':>7}")
    print(head)
    print("-" * len(head))
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    for r in rows:
        floor = r["params"] + r.get("opt_state", 0) + r["kv_cache"]
        fits = " ".join(f"{yes(floor <= cap) + '/' + yes(r['peak'] <= cap):7}" for cap in CHIPS.values())
        print(f"{r['model']:15} {r['layers']:6d} {r['decoder']:7} {r['mesh']:16} {r['part']:30} {gib(r['params'])} "
              f"{gib(r.get('opt_state', 0))} {gib(r['kv_cache'])} {gib(floor)} {gib(r['arguments'])} "
              f"{gib(r['temporaries'])} {gib(r['outputs'])} {gib(r['peak'])}  {fits} "
              f"{r['compile_s'][0]:9.1f} {r['compile_s'][1]:7.1f}")
    asked = [(a, [r for r in rows if (r["model"], r["mesh"]) == a[:2]]) for a in ASKED]
    if any(found for _, found in asked):
        print("\nasked fits, per device: floor, and XLA:CPU's peak at each micro-batch compiled")
    for (model, mesh_spec, cap, where), found in asked:
        if not found:
            continue
        floor = found[0]["params"] + found[0]["opt_state"]
        peaks = ", ".join(f"{r['micro']}x{args.train_length}: {r['peak'] / GiB:.2f} {yes(r['peak'] <= cap)}"
                          for r in found)
        print(f"{model} on {where} ({mesh_spec}): floor {floor / GiB:.2f} {yes(floor <= cap)}; peak {peaks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
