"""`qwen2vl-serve`: the command line that loads a model and serves it (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from qwen2vl_jax import distributed, shell
from qwen2vl_jax.config import DEMO_DIR as DEFAULT_MODEL
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.serving.settings import Settings

PROG = "qwen2vl-serve"


# ---------------------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    have_default = (DEFAULT_MODEL / "config.json").is_file()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve Qwen2-VL (JAX) over the OpenAI chat API, with continuous batching.",
        epilog="Endpoints: POST /v1/chat/completions, GET /v1/models, /health, /metrics. Images come as "
               "image_url parts (base64 data: URIs; file:// inside --media-dir; http(s) with "
               "--allow-remote-media), videos as video_url parts naming files inside --media-dir.")
    p.add_argument("--model", required=not have_default, default=str(DEFAULT_MODEL) if have_default else None,
                   help="a model folder (converted by qwen2vl-convert, or an HF checkpoint with tokenizer files)"
                        + ("; default: the small demo model shipped with the package" if have_default else ""))
    p.add_argument("--served-model-name", default=None, help="the model id the API reports (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
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
    p.add_argument("--max-batch", type=int, default=16, help="decode slots: requests decoded together (default 16)")
    p.add_argument("--max-context", type=int, default=None,
                   help="cache slots per request: prompt + generated tokens (default: the model's context, at most 4096)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429 (default 64)")
    p.add_argument("--min-pixels", type=int, default=None, help="resize smaller images up to this many pixels")
    p.add_argument("--max-pixels", type=int, default=None, help="resize larger images down to this many pixels")
    p.add_argument("--max-image-pixels", type=int, default=Settings.max_image_pixels,
                   help="refuse images larger than this before decoding them (default %(default)s)")
    p.add_argument("--max-video-frames", type=int, default=None, help="sample at most this many frames per video")
    p.add_argument("--max-images", type=int, default=8, help="images allowed in one request (default 8)")
    p.add_argument("--max-tokens", type=int, default=Settings.default_max_tokens,
                   help="max_tokens when a request gives none (default %(default)s, capped by the context)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    p.add_argument("--vision-cache", type=int, default=256, help="images whose features are cached (default 256; 0: off)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--media-dir", default=None, help="folder that file:// images and videos may come from")
    p.add_argument("--allow-remote-media", action="store_true", help="let image_url parts fetch http(s) URLs")
    distributed.add_arguments(p)
    return p


def _check_args(args) -> None:
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: no such folder")
    if args.media_dir is not None and not Path(args.media_dir).is_dir():
        raise InputError(f"--media-dir {args.media_dir}: no such folder")
    for flag, value, lo in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                            ("--max-images", args.max_images, 0), ("--max-tokens", args.max_tokens, 1),
                            ("--max-image-pixels", args.max_image_pixels, 1), ("--vision-cache", args.vision_cache, 0)):
        if value < lo:
            raise InputError(f"{flag} must be at least {lo} (got {value})")
    if args.port > 65535:
        raise InputError(f"--port must be at most 65535 (got {args.port})")
    if not args.request_timeout > 0 or not args.max_body_mb > 0:
        raise InputError("--request-timeout and --max-body-mb must be positive")
    if args.max_video_frames is not None and args.max_video_frames < 2:
        raise InputError(f"--max-video-frames must be at least 2 (got {args.max_video_frames})")


def _run(args) -> int:
    shell.quiet_libraries()
    _check_args(args)
    distributed.enable_compile_cache(args)
    multi = distributed.initialize(args)
    from qwen2vl_jax.sharding import make_mesh

    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError("serving needs starlette and uvicorn: pip install 'qwen2vl-jax[serve]'") from None

    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.serving.app import build_service, create_app

    t0 = time.perf_counter()
    mesh = make_mesh(args.mesh) if args.mesh else None
    processor = Processor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    model = Qwen2VL.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, matmul=args.matmul,
                                    scan_layers=args.scan_layers)
    name = args.served_model_name or Path(args.model).resolve().name
    settings = Settings(model_name=name, api_key=args.api_key,
                        media_dir=Path(args.media_dir).resolve() if args.media_dir else None,
                        allow_remote_media=args.allow_remote_media, max_images=args.max_images,
                        max_video_frames=args.max_video_frames, max_image_pixels=args.max_image_pixels,
                        max_body_bytes=int(args.max_body_mb * 1024 * 1024), request_timeout=args.request_timeout,
                        max_queue=args.max_queue, default_max_tokens=args.max_tokens)
    service = build_service(model, processor, max_batch=args.max_batch, max_context=args.max_context,
                            settings=settings, vision_cache_entries=args.vision_cache)
    if multi:
        from qwen2vl_jax.batching import Lockstep

        if not distributed.is_leader():  # replay process 0's device calls until it stops
            import jax

            print(f"{PROG}: process {jax.process_index()} ready, following process 0", file=sys.stderr, flush=True)
            service.batcher.slots.follow(model.params)
            return 0
        service.batcher.slots.lockstep = Lockstep()
    print(f"{PROG}: {name} ready in {time.perf_counter() - t0:.1f} s: {args.max_batch} slots of "
          f"{service.max_context} tokens, http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server = _server_class()(uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning"))
    server.run()
    if not server.started:
        raise InputError(f"cannot listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopped by Ctrl-C or SIGTERM as a normal end: uvicorn shuts down
        gracefully and would then raise the signal again, which the shell would report as an
        interruption after the shutdown already happened."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    return Server


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return shell.run(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
