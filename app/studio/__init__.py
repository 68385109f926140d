"""racm3 Studio: the web page served at `/` and `/studio`.

Plain HTML, CSS and JavaScript shipped inside the package (`static/`), with no CDN and no
build step, so it works offline and from a non-editable install. The page calls only the
public API, as any other client does.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript",
               ".svg": "image/svg+xml"}
# Browsers revalidate (ETag), so a page from an upgraded server is seen at once.
NO_CACHE = {"Cache-Control": "no-cache"}


class _NotFound(ApiError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


def build_studio_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    assets = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in MEDIA_TYPES}

    @router.get("/")
    @router.get("/studio")
    async def studio() -> FileResponse:
        return FileResponse(assets["index.html"], media_type="text/html", headers=NO_CACHE)

    @router.get("/studio/static/{name}")
    async def asset(name: str) -> FileResponse:
        path = assets.get(name)  # only the shipped files: no path ever reaches the disk
        if path is None:
            raise _NotFound(f"no studio file {name!r}")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)

    return router
