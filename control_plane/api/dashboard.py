"""The dashboard: the single page and static files in control_plane/ui/, no build step."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
UI_HEADERS = {
    # Everything the page loads comes from here: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def ui_index(request: web.Request) -> web.StreamResponse:
    """The dashboard's single page."""
    if request.path == "/ui":
        raise web.HTTPFound("/ui/")
    return web.FileResponse(UI_DIR / "index.html", headers=UI_HEADERS)


def add_ui_routes(app: web.Application) -> None:
    """Serve the dashboard under /ui/."""
    app.router.add_get("/ui", ui_index)
    app.router.add_get("/ui/", ui_index)
    app.router.add_static("/ui/static/", UI_DIR, show_index=False, follow_symlinks=False)
