"""CORS for the per-case DICOMweb, so a viewer served from another origin can read images.

Off unless `cors.allow_origins` is set. Starlette's `CORSMiddleware` does the work, limited to
`/cases/{id}/dicom-web/...` and to the listed origins: preflight `OPTIONS` is answered there,
`Access-Control-Allow-Origin` is added to those answers, and every other path is untouched
(an `OPTIONS` elsewhere is still 405). Credentials (cookies) are not allowed cross-origin: an
external viewer sends the reviewer's bearer token in the `Authorization` header.
"""

from __future__ import annotations

import re

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

DICOMWEB_PATH = re.compile(r"^/cases/[^/]+/dicom-web(/|$)")
ALLOW_HEADERS = ["Authorization", "Accept", "Content-Type", "Cache-Control"]
EXPOSE_HEADERS = ["Warning", "Content-Location", "Content-Length", "Content-Type"]


class DicomwebCORSMiddleware:
    """`CORSMiddleware` on the DICOMweb paths only."""

    def __init__(self, app: ASGIApp, allow_origins: list[str], max_age: int) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=allow_origins,
            allow_methods=["GET", "HEAD", "OPTIONS"],
            allow_headers=ALLOW_HEADERS,
            expose_headers=EXPOSE_HEADERS,
            allow_credentials=False,
            max_age=max_age,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and DICOMWEB_PATH.match(scope["path"]):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
