"""The reference web app for the person's side: static files, served like any other client's.

The page holds no secrets and gets no special access: it asks for a bearer token and talks to
the public JSON API and the event stream, as a product's own frontend would.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# The page and its files change with each release; a short cache keeps a deploy visible.
CACHE = {"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}

router = APIRouter(include_in_schema=False)


@router.get("/app")
async def web_app() -> FileResponse:
    """The reference web app (it asks for a token; the token stays in the browser tab)."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=CACHE)


@router.get("/app/")
async def web_app_slash(request: Request) -> RedirectResponse:
    query = f"?{request.url.query}" if request.url.query else ""
    return RedirectResponse(f"/app{query}", status_code=308)


def install(app: FastAPI) -> None:
    """Serve the app at /app and its script and styles at /app/static."""
    app.include_router(router)
    app.mount("/app/static", StaticFiles(directory=STATIC), name="webapp-static")
