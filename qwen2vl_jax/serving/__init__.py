"""`qwen2vl-serve`: the OpenAI chat API over continuous batching.

    qwen2vl-serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--mesh ...] [--max-batch 16]
        [--max-context N] [--min-pixels N] [--max-pixels N] [--max-video-frames N]
        [--max-images N] [--api-key KEY] [--media-dir DIR] [--allow-remote-media]
        [--coordinator ADDR:PORT --num-processes N --process-id I] [--compile-cache DIR | --no-compile-cache]

Endpoints: POST /v1/chat/completions (OpenAI's schema; images as image_url parts, videos as
video/video_url parts naming local files; `stream: true` gives server-sent events ending in
`data: [DONE]`; a reply's grounding boxes come in pixels as `boxes` on its message), GET
/v1/models, GET /health, GET /metrics (Prometheus text), and a chat page at GET / (`page`).

Flow: the HTTP side (Starlette on uvicorn's event loop) checks the request, then reads its media
and renders and tokenizes the prompt on a pool of its own, and queues a `scheduler.Request`; one
thread runs the `scheduler.Batcher`, which takes vision features from its vision cache or the
vision tower, prefills the prompt, inserts it into a free row and steps every live row with the
engine's one decode step (the same compiled step offline generation runs), and hands tokens
back to the event loop, where they are detokenized, checked against stop strings and sent.

Past one host, run it once per process with the multi-process flags (`distributed`): process
0 serves HTTP and runs the batcher, the others replay its device calls (`lockstep`).

The modules, one job each (a request passes through them in this order):
  connections  the listening socket (bound before the model loads) and uvicorn's h11 protocol
            with a read deadline per request and a cap on open connections;
  app       the Starlette routes and the checks every request passes (Host, Origin, content
            type), `build_service`, `ServerThread`;
  schema    the JSON body checked field by field into `Parsed` (`settings`: what the flags
            set, and `ApiError`, the OpenAI error object);
  preprocess  the pools media and text-only requests are prepared on, counted by the queue,
            under the request's deadline;
  prompts   `Service`: media (`media`, `remote`), chat template and tokenizer -> the prompt and
            its vision inputs;
  scheduler  `Slots` over the engine (row and context buckets), `Batcher`, `Request`;
            `vision_cache` beside it, read and written by the batcher's thread only;
            `lockstep` for multi-process runs; `warmup` compiles what requests will run;
  stream    events -> text with stop strings, whole replies and server-sent events;
  page      the chat page (static/: HTML, CSS, plain JavaScript) over the same API;
  metrics   /metrics;
  cli       the command line.

Every bad request gets an OpenAI error object `{"error": {"message", "type", "param", "code"}}`
with a 4xx status, keeps its connection and touches no other request. What is exposed on a
network, and the flags that widen or narrow it, are in docs/network.md.
"""
