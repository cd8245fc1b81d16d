"""The chat page at `/`: three static files of the package (static/index.html, page.css,
page.js), no build step and nothing fetched from elsewhere. The page talks to this server's own
`/v1/chat/completions` (streamed), with the API key the user types when the server has one, and
draws the reply's grounding boxes (the `boxes` field) over the image.

The files are read once, when the app is built; only these names are served. Their policy lets
them load nothing but themselves and talk to nothing but this server."""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"
TYPES = {"index.html": "text/html; charset=utf-8", "page.css": "text/css; charset=utf-8",
         "page.js": "text/javascript; charset=utf-8"}
HEADERS = {
    # images the user picks are shown from data: URIs; everything else comes from here
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def routes() -> list:
    """Starlette routes for `/` and `/static/NAME`."""
    from starlette.responses import Response
    from starlette.routing import Route

    files = {name: (STATIC / name).read_bytes() for name in TYPES}

    def serve(name: str) -> Response:
        return Response(files[name], media_type=TYPES[name], headers=HEADERS)

    async def index(request):
        return serve("index.html")

    async def static(request):
        name = request.path_params["name"]
        if name not in files or name == "index.html":
            from starlette.exceptions import HTTPException

            raise HTTPException(404)
        return serve(name)

    return [Route("/", index, methods=["GET"]), Route("/static/{name}", static, methods=["GET"])]
