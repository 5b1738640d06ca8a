"""``GET /dashboard``: a live page of the swarm, as health.petals.dev shows Petals' swarm.

The page is public and holds no data: its script (static/dashboard.js) polls ``GET /v1/swarm``
every two seconds with the API key the user gives it (``?key=`` or its field, kept in the
browser's localStorage), so it shows exactly what that key may see, and nothing without one on a
gateway that needs one. Its three files are package data served from memory: no CDN, nothing
fetched from elsewhere. Records are written by arbitrary peers, so the script writes their strings
as text only, and the page's Content-Security-Policy allows no script, style or connection but
this origin's: a model name or ban reason can never run as code.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException, Response

router = APIRouter(include_in_schema=False)

_STATIC = files(__package__) / "static"
_PAGE = (_STATIC / "index.html").read_bytes()
_ASSETS = {  # what the page loads, by the relative name it uses
    "dashboard.js": ((_STATIC / "dashboard.js").read_bytes(), "text/javascript; charset=utf-8"),
    "dashboard.css": ((_STATIC / "dashboard.css").read_bytes(), "text/css; charset=utf-8"),
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the page's address may carry ?key= until its script removes it
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("/dashboard")
async def dashboard() -> Response:
    """The page; unauthenticated like /health (the data it shows needs the key)."""
    return Response(_PAGE, media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/dashboard/{name}")
async def dashboard_asset(name: str) -> Response:
    """The page's script and style sheet."""
    if name not in _ASSETS:
        raise HTTPException(404, f"no dashboard file {name!r}")
    content, media_type = _ASSETS[name]
    return Response(content, media_type=media_type, headers=_HEADERS)
