"""Rendering pages: one Jinja2 environment (autoescape on for everything), the static files."""

from __future__ import annotations

from importlib import resources
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from starlette.templating import Jinja2Templates

from fhir_gateway.web import session

TEMPLATES = resources.files("fhir_gateway.web") / "templates"
STATIC = resources.files("fhir_gateway.web") / "static"
HTMX = "vendor/htmx-2.0.11.min.js"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates = Jinja2Templates(env=_env)


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
    response: HTMLResponse = templates.TemplateResponse(
        request, name, {**base, **context}, status_code=status_code
    )
    response.headers["Cache-Control"] = "no-store"
    return response
