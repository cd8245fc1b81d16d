"""`qwen2vl-serve`: the command line that loads a model and serves it (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from qwen2vl_jax import distributed, shell, xla_flags
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
    p.add_argument("--served-model-name", default=None, metavar="NAME[,NAME...]",
                   help="the model id the API reports, and other names a request may give as 'model' after a comma "
                        "(default: the folder name); a request naming another model gets 404")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--read-timeout", type=float, default=Settings.read_timeout,
                   help="seconds a client has to send a whole request, headers and body; slower ones get 408 "
                        "and are disconnected (default %(default)g)")
    p.add_argument("--max-connections", type=int, default=Settings.max_connections,
                   help="open connections served at once; more get 503 (default %(default)s)")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGIN[,ORIGIN...]",
                   help="web pages (e.g. https://app.example.com) allowed to call the API from a browser, with "
                        "CORS headers; '*' for any. Default: none, requests carrying an Origin header get 403")
    p.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                   help="Host header values answered ('*': any). Default: when --host is a loopback address, "
                        "localhost, 127.0.0.1, ::1 and --host (against DNS rebinding); otherwise any")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not log a line per request (method, path, status, milliseconds) on stderr")
    shell.add_model_arguments(p)
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
    p.add_argument("--prefill-chunk", type=int, default=0, metavar="TOKENS",
                   help="write a prompt into its decode slot at most this many tokens (and one image or video's "
                        "vision tower) between two decode steps, so a long or image-heavy prompt does not stall the "
                        "requests being decoded (e.g. 512; default 0: a whole prompt at once)")
    p.add_argument("--prefix-cache-gb", type=float, default=1.0, metavar="GB",
                   help="device memory for the keys and values of prompt prefixes reused by later requests with the "
                        "same tokens and images (multi-turn chats, shared system prompts), evicted least recently "
                        "used first (default %(default)g; 0: off)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--media-dir", default=None, help="folder that file:// images and videos may come from")
    p.add_argument("--allow-remote-media", action="store_true", help="let image_url parts fetch http(s) URLs")
    p.add_argument("--allow-private-media", action="store_true",
                   help="with --allow-remote-media: also fetch from loopback, private, link-local and reserved "
                        "addresses (refused by default, after DNS resolution and on every redirect)")
    p.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                   help="with --allow-remote-media: the only host names remote media may come from "
                        "(exact names; checked on every redirect)")
    p.add_argument("--preprocess-workers", type=int, default=None,
                   help="threads that read and resize media (default: one per core); requests waiting for "
                        "them count toward --max-queue")
    p.add_argument("--no-vision-warm-up", action="store_true",
                   help="skip compiling the vision tower for every image size at start-up (each size then "
                        "compiles on its first image)")
    p.add_argument("--no-grammar-warm-up", action="store_true",
                   help="skip compiling the grammar-masked programs and building the grammar engine at "
                        "start-up (the first request with a response_format or a forced tool call then "
                        "waits for them)")
    distributed.add_arguments(p)
    shell.add_version(p, PROG)
    return p


def _check_args(args) -> None:
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: no such folder")
    if args.media_dir is not None and not Path(args.media_dir).is_dir():
        raise InputError(f"--media-dir {args.media_dir}: no such folder")
    for flag, value, lo in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                            ("--max-images", args.max_images, 0), ("--max-tokens", args.max_tokens, 1),
                            ("--max-image-pixels", args.max_image_pixels, 1), ("--vision-cache", args.vision_cache, 0),
                            ("--prefill-chunk", args.prefill_chunk, 0), ("--prefix-cache-gb", args.prefix_cache_gb, 0),
                            ("--preprocess-workers", 1 if args.preprocess_workers is None else args.preprocess_workers, 1)):
        if value < lo:
            raise InputError(f"{flag} must be at least {lo} (got {value})")
    if args.port > 65535:
        raise InputError(f"--port must be at most 65535 (got {args.port})")
    if not args.request_timeout > 0 or not args.max_body_mb > 0:
        raise InputError("--request-timeout and --max-body-mb must be positive")
    if (args.allow_private_media or args.allowed_media_domains) and not args.allow_remote_media:
        raise InputError("--allow-private-media and --allowed-media-domains apply to remote media: "
                         "add --allow-remote-media")
    if args.max_video_frames is not None and args.max_video_frames < 2:
        raise InputError(f"--max-video-frames must be at least 2 (got {args.max_video_frames})")
    if not args.read_timeout > 0:
        raise InputError(f"--read-timeout must be positive (got {args.read_timeout:g})")
    if args.max_connections < 1:
        raise InputError(f"--max-connections must be at least 1 (got {args.max_connections})")
    if not model_names(args):
        raise InputError("--served-model-name: give at least one name")


def model_names(args) -> tuple[str, ...]:
    """--served-model-name's names (the first is the one replies report), else the folder's."""
    if args.served_model_name is None:
        return (Path(args.model).resolve().name,)
    return tuple(dict.fromkeys(n.strip() for n in args.served_model_name.split(",") if n.strip()))


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def network_settings(args) -> dict:
    """The Settings fields of the HTTP surface, from the flags (see docs/network.md)."""
    import ipaddress

    hosts: tuple[str, ...] | None = _split(args.allowed_hosts) or None
    if hosts is None:
        try:
            loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
        except ValueError:  # a host name: the operator chose it, any Host is answered
            loopback = False
        if loopback:  # a page on another site may rebind its name to this address
            hosts = tuple(dict.fromkeys((*LOOPBACK_NAMES, args.host)))
    names = model_names(args)
    return {"model_name": names[0], "model_aliases": names[1:], "read_timeout": args.read_timeout,
            "max_connections": args.max_connections, "allowed_origins": _split(args.allowed_origins),
            "allowed_hosts": hosts, "access_log": not args.no_access_log}


def _check_context(args) -> None:
    """--max-context against the model's context, from config.json, before the weights load."""
    if args.max_context is None:
        return
    try:
        from qwen2vl_jax.config import Qwen2VLConfig

        context = Qwen2VLConfig.from_hf(args.model).text.max_position_embeddings
    except Exception:  # the load reports a folder it cannot read
        return
    if not 2 <= args.max_context <= context:
        raise InputError(f"--max-context must be between 2 and the model's context of {context} "
                         f"(got {args.max_context})")


def listen_socket(host: str, port: int):
    """The server's socket, bound before the model loads so that a port in use is found at once.
    OSError (status 1) naming the flags."""
    from qwen2vl_jax.serving.connections import bind

    try:
        return bind(host, port)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port} (--host, --port): "
                               f"{e.strerror or e}") from None


def _raise_descriptor_limit(connections: int) -> None:
    """Lifts the soft limit on open files toward the hard one when --max-connections (plus the
    model's files and the server's own) needs more than it allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = connections + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                        hard))
    except (ImportError, ValueError, OSError):  # not on this platform, or not allowed: keep the limit
        pass


def _access_logging(enabled: bool) -> None:
    import logging

    logger = logging.getLogger("qwen2vl_jax.serving.access")
    if enabled and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _run(args) -> int:
    shell.quiet_libraries()
    _check_args(args)
    _check_context(args)
    xla_flags.for_model(args.model)  # before JAX starts its backend, which reads XLA_FLAGS once
    multi = distributed.initialize(args)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError("serving needs starlette and uvicorn: pip install 'qwen2vl-jax[serve]'") from None
    # The port is taken now, before a minute of loading and compiling, or the run ends at once.
    sock = listen_socket(args.host, args.port) if not multi or distributed.is_leader() else None
    _raise_descriptor_limit(args.max_connections)
    distributed.enable_compile_cache(args)  # after the bind: it imports JAX (seconds)

    from qwen2vl_jax.sharding import make_mesh
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.serving.app import build_service, create_app

    t0 = time.perf_counter()
    mesh = make_mesh(args.mesh) if args.mesh else None
    processor = Processor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    model = Qwen2VL.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, matmul=args.matmul,
                                    scan_layers=args.scan_layers, adapter=args.adapter,
                                    merge_adapter=args.merge_adapter)
    network = network_settings(args)
    name = network["model_name"]
    settings = Settings(api_key=args.api_key,
                        media_dir=Path(args.media_dir).resolve() if args.media_dir else None,
                        allow_remote_media=args.allow_remote_media, allow_private_media=args.allow_private_media,
                        allowed_media_domains=tuple(d.lower().rstrip(".") for d in args.allowed_media_domains or ()),
                        preprocess_workers=args.preprocess_workers, max_images=args.max_images,
                        max_video_frames=args.max_video_frames, max_image_pixels=args.max_image_pixels,
                        max_body_bytes=int(args.max_body_mb * 1024 * 1024), request_timeout=args.request_timeout,
                        max_queue=args.max_queue, default_max_tokens=args.max_tokens, **network)
    service = build_service(model, processor, max_batch=args.max_batch, max_context=args.max_context,
                            settings=settings, vision_cache_entries=args.vision_cache,
                            prefill_chunk=args.prefill_chunk, prefix_cache_gb=args.prefix_cache_gb,
                            warm_up_vision=not args.no_vision_warm_up, warm_up_grammar=not args.no_grammar_warm_up,
                            progress=_say if not multi or distributed.is_leader() else None)
    if multi:
        from qwen2vl_jax.serving.lockstep import follow

        if not distributed.is_leader():  # replay process 0's device calls until it stops
            import jax

            print(f"{PROG}: process {jax.process_index()} ready, following process 0", file=sys.stderr, flush=True)
            follow(model.engine, model.params)
            return 0
        service.batcher.slots.lead()
    from qwen2vl_jax.serving.connections import uvicorn_config

    host, port = args.host, sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    print(f"{PROG}: {name} ready in {time.perf_counter() - t0:.1f} s: {args.max_batch} slots of "
          f"{service.max_context} tokens, http://{url_host}:{port}/v1", file=sys.stderr, flush=True)
    _access_logging(settings.access_log)
    server = _server_class()(uvicorn_config(create_app(service), settings))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
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
