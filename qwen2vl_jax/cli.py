"""`qwen2vl-generate`: chat with a model about images, a video or plain text.

    qwen2vl-generate [--model DIR] [--image PATH]... [--video PATH]... --prompt TEXT
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
        [--mesh data=D,fsdp=F,tensor=T] [--json]

Streams the answer as it is generated; with --json prints one JSON object instead (`text`,
`token_ids`, ...). Bad input prints `error: <one line>` and exits with status 2. The sampling
defaults come from the model's generation_config.json; the flags override them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qwen2vl_jax.errors import InputError

# A small model shipped with the package (when present) serves when --model is left out.
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "demo"  # built by python -m qwen2vl_jax.train.demo


def _parser() -> argparse.ArgumentParser:
    have_default = (DEFAULT_MODEL / "config.json").is_file()
    p = argparse.ArgumentParser(
        prog="qwen2vl-generate",
        description="Answer a prompt about images, videos or plain text with Qwen2-VL (JAX). The answer is "
                    "printed as it is generated.",
        epilog="Sampling defaults come from the model's generation_config.json (greedy for the published "
               "Instruct models); --temperature > 0 turns sampling on, and --top-k/--top-p/--seed only act "
               "then. Videos need PyAV (pip install av). Bad input prints one 'error:' line and exits "
               "with status 2.")
    p.add_argument("--model", required=not have_default, default=str(DEFAULT_MODEL) if have_default else None,
                   help="a model folder (converted by qwen2vl-convert, or an HF checkpoint with tokenizer files)"
                        + ("; default: the small demo model shipped with the package" if have_default else ""))
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file; repeat for several images (they come before the prompt)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video file (sampled at 2 frames/s); repeat for several videos")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-new-tokens", type=int, default=None, help="at most this many new tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="HF's repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling, 0 .. 2**32-1 (default 0, so a run repeats itself)")
    p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                   help="shard over a device mesh (axes left out are 1; data takes the rest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and token_ids")
    return p


def _check_files(args) -> None:
    for kind, paths in (("image", args.image), ("video", args.video)):
        for path in paths:
            if Path(path).is_dir():
                raise InputError(f"--{kind} {path}: is a folder, not a file")
            if not Path(path).is_file():
                raise InputError(f"--{kind} {path}: no such file")
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: no such folder")
    if not args.prompt.strip():
        raise InputError("--prompt is empty")


def build_inputs(processor, prompt: str, images=(), videos=(), system: str | None = None) -> dict:
    """One user turn (images, then videos, then the text) through the chat template."""
    content = [{"type": "image", "image": str(p)} for p in images]
    content += [{"type": "video", "video": str(p)} for p in videos]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[str(p) for p in images] or None,
                     videos=[str(p) for p in videos] or None, return_tensors="np")


def _run(args) -> int:
    from qwen2vl_jax.sharding import make_mesh, maybe_initialize_distributed

    maybe_initialize_distributed()
    _check_files(args)
    import jax
    import numpy as np

    from qwen2vl_jax.chat import TextStream, turn_end_ids
    from qwen2vl_jax.model import Qwen2VL
    from qwen2vl_jax.processing import Processor

    mesh = make_mesh(args.mesh) if args.mesh else None
    processor = Processor.from_pretrained(args.model)
    model = Qwen2VL.from_pretrained(args.model, dtype=args.dtype, mesh=mesh)
    inputs = build_inputs(processor, args.prompt, args.image, args.video, args.system)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    settings["eos_token_ids"] = turn_end_ids(model, processor)
    gc = model.generation_config.replace(**settings)
    ignored = [f"--{k.replace('_', '-')}" for k in ("top_k", "top_p", "seed") if getattr(args, k) is not None]
    if gc.greedy and ignored:
        print(f"note: {', '.join(ignored)} only act when sampling, and these settings decode greedily "
              "(sampling needs --temperature > 0 and a --top-k other than 1)", file=sys.stderr)
    eos = set(gc.eos_token_ids)
    leader = jax.process_index() == 0

    if args.json:
        tokens = model.generate(**inputs, **settings)[0].tolist()
        if any(t in eos for t in tokens):
            tokens = tokens[: next(i for i, t in enumerate(tokens) if t in eos) + 1]
            finish = "eos"
        else:
            finish = "length"
        if leader:
            print(json.dumps({
                "text": processor.decode(tokens, skip_special_tokens=True),
                "token_ids": tokens,
                "prompt_tokens": int(np.asarray(inputs["attention_mask"]).sum()),
                "finish_reason": finish,
            }, ensure_ascii=False))
        return 0

    stream = TextStream(processor, sys.stdout if leader else None)
    for step_tokens in model.generate(**inputs, stream=True, **settings):
        token = int(step_tokens[0])
        if token in eos:
            break
        stream.push(token)
    stream.close()
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except InputError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(generate_main())
