"""`qwen2vl-serve`: the OpenAI chat API over continuous batching.

    qwen2vl-serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--mesh ...] [--max-batch 16]
        [--max-context N] [--min-pixels N] [--max-pixels N] [--max-video-frames N]
        [--max-images N] [--api-key KEY] [--media-dir DIR] [--allow-remote-media]
        [--coordinator ADDR:PORT --num-processes N --process-id I] [--compile-cache DIR | --no-compile-cache]

Endpoints: POST /v1/chat/completions (OpenAI's schema; images as image_url parts, videos as
video/video_url parts naming local files; `stream: true` gives server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).

Flow: the HTTP side (Starlette on uvicorn's event loop) checks the request, reads the media and
renders the prompt with the package's chat template and processor (in a worker thread), looks
each image up in the vision cache, and queues a `batching.Request`; one thread runs the
`batching.Batcher` (vision tower, prefill, one decode step for all slots) and hands tokens back
to the event loop, where they are detokenized, checked against stop strings and sent.

Past one host, run it once per process with the multi-process flags (`distributed`): process
0 serves HTTP and runs the batcher, the others replay its device calls (`batching.Lockstep`).

The modules, one job each (a request passes through them in this order):
  settings  the flags' settings and `ApiError` (the OpenAI error object);
  schema    the JSON body checked field by field into `Parsed`;
  media     images and videos read from data: URIs, --media-dir or remote URLs;
  prompts   `Service`: media, chat template and tokenizer -> the prompt and its vision inputs;
  app       the Starlette routes and the checks every request passes (Host, Origin, content
            type), `build_service`, `ServerThread`;
  connections  the listening socket (bound before the model loads) and uvicorn's h11 protocol
            with a read deadline per request and a cap on open connections;
  stream    events -> text with stop strings, whole replies and server-sent events;
  metrics   /metrics;
  cli       the command line.

Every bad request gets an OpenAI error object `{"error": {"message", "type", "param", "code"}}`
with a 4xx status, keeps its connection and touches no other request. What is exposed on a
network, and the flags that widen or narrow it, are in docs/network.md.
"""
