"""Rendering pages: one Jinja2 environment (autoescape on for everything), the static files.

Jinja2 is imported with the first page rendered, not at start: a gateway that only takes
referrals and serves FHIR and DICOMweb never renders one (~1.8 MB RSS it would keep)."""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse

from fhir_gateway.web import session

if TYPE_CHECKING:
    from starlette.templating import Jinja2Templates

TEMPLATES = resources.files("fhir_gateway.web") / "templates"
STATIC = resources.files("fhir_gateway.web") / "static"
HTMX = "vendor/htmx-2.0.11.min.js"


@functools.cache
def templates() -> Jinja2Templates:
    """The pages' templates (built once, on first use)."""
    import jinja2
    from starlette.templating import Jinja2Templates

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return Jinja2Templates(env=env)


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    """The page `name` with the signed-in caller (if any) and the session's CSRF token."""
    who = getattr(request.state, "principal", None)
    base = {
        "request": request,
        "who": who,
        "csrf": session.csrf_token(request),
        "htmx": HTMX,
    }
    response: HTMLResponse = templates().TemplateResponse(
        request, name, {**base, **context}, status_code=status_code
    )
    response.headers["Cache-Control"] = "no-store"
    return response
