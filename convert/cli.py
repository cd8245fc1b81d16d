"""`qwen2vl-convert` and `qwen2vl-export`: thin wrappers over convert.py and export.py.

Bad input prints `qwen2vl-convert: error: <one line>` (or `qwen2vl-export: ...`) to stderr and
exits 2, with nothing written; see qwen2vl_jax.shell for the other exit statuses. Success
prints `wrote OUT` on stdout, --quiet or not (--quiet hides the progress bar, on stderr).
"""

from __future__ import annotations

import argparse
import sys

from qwen2vl_jax import shell

CONVERT_PROG, EXPORT_PROG = "qwen2vl-convert", "qwen2vl-export"

CONVERT_HELP = """\
Convert a Hugging Face Qwen2-VL checkpoint (Qwen2-VL-2B/7B/72B-Instruct, as published or as
saved by transformers 5) into a qwen2vl-jax folder: config.json, the tokenizer and processor
files, and an Orbax checkpoint of the params under params/. Load it with
qwen2vl_jax.Qwen2VL.from_pretrained(OUT_DIR) or qwen2vl-generate --model OUT_DIR.

Tensors are streamed one layer at a time, so memory stays near one copy of the output.
OUT_DIR is written to a hidden temporary sibling and renamed at the end: a failed or
interrupted conversion leaves no OUT_DIR (Ctrl-C or SIGTERM stops once the layer being
written is done; a second Ctrl-C stops at once). The checkpoint is checked against config.json
(names, shapes, missing and unmapped tensors; all problems in one error) before anything
is written.

GPTQ (AutoGPTQ v1, 4 or 8 bit) and AWQ (GEMM) checkpoints are kept packed as they are, with
their zero points and act-order; --quantize int8|int4 packs a float checkpoint."""

EXPORT_HELP = """\
Export a qwen2vl-jax folder MODEL_DIR (the OUT_DIR of qwen2vl-convert, or the --out of
qwen2vl-train) back to a Hugging Face checkpoint folder HF_DIR: config.json, the tokenizer
and processor files, and safetensors weights in the published naming (visual.*,
model.layers.*, lm_head.*), sharded with an index when larger than --max-shard-size. transformers.Qwen2VLForConditionalGeneration.from_pretrained(HF_DIR)
loads it. Written to a temporary sibling and renamed at the end, like qwen2vl-convert."""


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=CONVERT_PROG, description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("hf_dir", metavar="HF_DIR",
                   help="HF checkpoint folder (config.json, *.safetensors with an optional "
                        "model.safetensors.index.json, tokenizer files); if no such local folder exists, "
                        "a hub repo id such as Qwen/Qwen2-VL-2B-Instruct, downloaded with huggingface_hub")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="folder to create; must not exist or be empty (see --force), and must not be inside HF_DIR")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="dtype the float params are stored in (default: bfloat16, the published weights' dtype; "
                        "float32 doubles the size and is what parity tests use). Given for a GPTQ or AWQ "
                        "checkpoint, it dequantizes the packed layers to float; without it they stay packed")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="store the decoder's linear layers quantized, weight-only: int8 with a scale per output "
                        "channel, or int4 with a scale and zero point per group of 128 input rows; the output "
                        "head (or the tied embedding) is int8 in both, the vision tower stays float. "
                        "Loaders read the folder as it is")
    p.add_argument("--force", action="store_true",
                   help="replace an existing non-empty OUT_DIR (the old one is removed only after the new "
                        "one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the final 'wrote OUT_DIR' line stays)")
    shell.add_version(p, CONVERT_PROG)
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=EXPORT_PROG, description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a qwen2vl-jax folder written by qwen2vl-convert or training")
    p.add_argument("hf_dir", metavar="HF_DIR", help="HF checkpoint folder to create; must not exist or be empty "
                                                    "(see --force), and must not be inside MODEL_DIR")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="dtype of the written weights (default: the dtype the params are stored in)")
    p.add_argument("--adapter", default=None, metavar="PATH",
                   help="a PEFT LoRA adapter folder (from qwen2vl-train --lora-rank, or peft) merged into the "
                        "written weights: W + alpha / r * B A")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default: 5GB, as transformers); "
                        "bigger checkpoints are split into model-0000i-of-0000n.safetensors plus an index")
    p.add_argument("--force", action="store_true",
                   help="replace an existing non-empty HF_DIR (the old one is removed only after the new "
                        "one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the final 'wrote HF_DIR' line stays)")
    shell.add_version(p, EXPORT_PROG)
    return p


def _nothing_written(_: KeyboardInterrupt) -> str:
    # Both write into a temporary sibling that is removed on the way out (convert.staging).
    return "interrupted; nothing was written"


def convert_main(argv: list[str] | None = None) -> int:
    args = _convert_parser().parse_args(argv)

    def go():
        shell.quiet_libraries()
        from qwen2vl_jax.convert.convert import convert_checkpoint

        from qwen2vl_jax.processing.tokenizer import Qwen2Tokenizer

        out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, quantize=args.quantize,
                                 force=args.force, progress=not args.quiet)
        print(f"wrote {out}")  # the result, on stdout even with --quiet (which hides the progress)
        if not Qwen2Tokenizer.present(out):
            print(f"note: the checkpoint had no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
                  f"copy them into {out} before generating with it", file=sys.stderr)

    return shell.run(CONVERT_PROG, go, interrupted=_nothing_written)


def export_main(argv: list[str] | None = None) -> int:
    args = _export_parser().parse_args(argv)

    def go():
        shell.quiet_libraries()
        from qwen2vl_jax.convert.export import export_checkpoint, parse_size

        shard_bytes = parse_size(args.max_shard_size, "--max-shard-size")
        out = export_checkpoint(args.model_dir, args.hf_dir, dtype=args.dtype, force=args.force,
                                max_shard_size=shard_bytes, progress=not args.quiet, adapter=args.adapter)
        print(f"wrote {out}")

    return shell.run(EXPORT_PROG, go, interrupted=_nothing_written)


if __name__ == "__main__":
    sys.exit(convert_main())
