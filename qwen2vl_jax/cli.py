"""`qwen2vl-generate`: chat with a model about images, a video or plain text.

    qwen2vl-generate [--model DIR] [--image PATH]... [--video PATH]... --prompt TEXT
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
        [--mesh data=D,fsdp=F,tensor=T] [--json] [--draw-boxes OUT.png]
        [--coordinator ADDR:PORT --num-processes N --process-id I] [--compile-cache DIR | --no-compile-cache]

Streams the answer as it is generated (through `chat.chat`, as Python callers do); with --json
prints one JSON object instead (`text`, `token_ids`, `boxes`, ...): the answer's grounding boxes
(`grounding.boxes_for_images`) in pixels of the last image as it was given; `--draw-boxes` draws
them on it. Bad input prints `qwen2vl-generate: error: <one line>` and exits with status 2 (`shell.run`). The sampling
defaults come from the model's generation_config.json; the flags override them. Run once per
process for a multi-process mesh (`distributed`: the flags or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); only process 0 prints. Compiled programs are kept in the
compile cache (`distributed.enable_compile_cache`), so the next run on the same shapes starts sooner.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from qwen2vl_jax import distributed, grounding, shell, xla_flags
from qwen2vl_jax.config import DEMO_DIR as DEFAULT_MODEL  # served when --model is left out
from qwen2vl_jax.errors import InputError

PROG = "qwen2vl-generate"
# How this tool's user spells each generation setting, for messages about them.
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
         "top_k": "--top-k", "repetition_penalty": "--repetition-penalty", "seed": "--seed"}


def _parser() -> argparse.ArgumentParser:
    have_default = (DEFAULT_MODEL / "config.json").is_file()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Answer a prompt about images, videos or plain text with Qwen2-VL (JAX). The answer is "
                    "printed as it is generated.",
        epilog="Sampling defaults come from the model's generation_config.json (greedy for the published "
               "Instruct models); --temperature > 0 turns sampling on, and --top-k/--top-p/--seed only act "
               "then. Videos need PyAV (pip install av). Bad input prints one 'error:' line and exits "
               "with status 2; Ctrl-C exits with 130.")
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
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, and boxes (the answer's grounding boxes in pixels "
                        "of the last image)")
    p.add_argument("--draw-boxes", default=None, metavar="OUT.png",
                   help="write the last image with the answer's grounding boxes and labels drawn on it")
    shell.add_model_arguments(p)
    distributed.add_arguments(p)
    shell.add_version(p, PROG)
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
    if args.draw_boxes is not None:
        _check_drawing(args.draw_boxes, args.image)


def _check_drawing(out: str, images) -> None:
    """--draw-boxes OUT: an image to draw on, a folder to write into, a format PIL writes."""
    if not images:
        raise InputError(f"--draw-boxes {out}: needs an --image to draw the boxes on")
    path = Path(out)
    if path.is_dir():
        raise InputError(f"--draw-boxes {out}: is a folder; give a file name such as boxes.png")
    if not path.parent.is_dir():
        raise InputError(f"--draw-boxes {out}: no such folder {str(path.parent)!r}")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"--draw-boxes {out}: cannot write images of type {path.suffix or '(no extension)'!r}; "
                         "use .png or .jpg")


def _write_drawing(out: str, image_path: str, found: list[dict]) -> None:
    """The image with the boxes drawn, written whole or not at all."""
    from qwen2vl_jax.processing.image import load_image

    drawn = grounding.draw(load_image(image_path, "--image"), found)
    path = Path(out)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        drawn.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def build_messages(prompt: str, images=(), videos=(), system: str | None = None) -> list[dict]:
    """One user turn (images, then videos, then the text), after an optional system turn."""
    content = [{"type": "image", "image": str(p)} for p in images]
    content += [{"type": "video", "video": str(p)} for p in videos]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _run(args) -> int:
    xla_flags.for_model(args.model)  # before JAX starts its backend, which reads XLA_FLAGS once
    distributed.enable_compile_cache(args)
    distributed.initialize(args)
    _check_files(args)
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.chat import chat, turn_end_ids
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.sharding import make_mesh

    mesh = make_mesh(args.mesh) if args.mesh else None
    processor = Processor.from_pretrained(args.model)
    model = Qwen2VL.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, matmul=args.matmul,
                                    scan_layers=args.scan_layers, adapter=args.adapter,
                                    merge_adapter=args.merge_adapter)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    generation = model.generation_settings(names=FLAGS, eos_token_ids=turn_end_ids(model, processor), **settings)
    leader = distributed.is_leader()
    ignored = [FLAGS[k] for k in ("top_k", "top_p", "seed") if getattr(args, k) is not None]
    if generation.greedy and ignored and leader:
        print(f"note: {', '.join(ignored)} only act when sampling, and these settings decode greedily "
              "(sampling needs --temperature > 0 and a --top-k other than 1)", file=sys.stderr)
    messages = build_messages(args.prompt, args.image, args.video, args.system)
    reply = chat(model, processor, messages, out=sys.stdout if leader and not args.json else None, config=generation)
    if not leader:
        return 0
    found, problems = grounding.boxes_for_images(reply.text, [image_size(p) for p in args.image])
    if args.draw_boxes is not None:
        _write_drawing(args.draw_boxes, args.image[-1], found)
        print(f"note: drew {sum('box' in b for b in found)} boxes on {args.image[-1]} -> {args.draw_boxes}",
              file=sys.stderr)
    if args.json:
        print(json.dumps({
            "text": reply.text,
            "token_ids": reply.token_ids + ([reply.eos_token_id] if reply.eos_token_id is not None else []),
            "prompt_tokens": reply.prompt_tokens,
            "finish_reason": reply.finish_reason,
            "boxes": found,
            "box_problems": problems,
        }, ensure_ascii=False))
    return 0


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file, from its header."""
    with Image.open(path) as img:
        return img.size


def generate_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return shell.run(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(generate_main())
