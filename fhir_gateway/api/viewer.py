"""The OHIF viewer at `/viewer` (same origin as the per-case DICOMweb) and the browser session
it reads images with (`POST /session`, `DELETE /session`; `security/sessions.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from fhir_gateway.api.deps import SettingsDep, get_principal
from fhir_gateway.errors import NotFoundError
from fhir_gateway.security import sessions
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings
from fhir_gateway.viewer import MOUNT

log = structlog.get_logger(__name__)
router = APIRouter(tags=["viewer"])


class ViewerFiles(StaticFiles):
    """OHIF's built files; a path without a file extension that is not a file is one of the
    single-page app's routes (`/viewer/viewer?...`) and gets `index.html`."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory=directory, check_dir=False)
        self.root = directory

    async def check_config(self) -> None:
        if not (self.root / "index.html").is_file():
            raise NotFoundError(
                "the viewer is not installed: run `fhir-gateway viewer install` "
                "(see README, The image viewer)"
            )

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except StarletteHTTPException as exc:
            if exc.status_code != 404 or Path(path).suffix:
                raise
            return await super().get_response("index.html", scope)


def mount_viewer(app: FastAPI, settings: Settings) -> None:
    """Serve `settings.viewer_dir` at `/viewer` (404 with instructions until installed)."""
    app.mount(MOUNT, ViewerFiles(settings.viewer_dir), name="viewer")


@router.post("/session", status_code=204)
def open_session(
    request: Request,
    settings: SettingsDep,
    who: Annotated[Principal, Depends(get_principal)],
) -> Response:
    """Exchange the caller's bearer token for a browser session cookie (reviewers, admins)."""
    response = Response(status_code=204)
    sessions.open_on(response, settings, who)
    log.info("session.opened", role=who.role)
    return response


@router.delete("/session", status_code=204)
def close_session() -> Response:
    """Sign the browser out: the session cookie is removed."""
    response = Response(status_code=204)
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="lax")
    return response
