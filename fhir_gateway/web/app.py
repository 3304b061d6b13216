"""Mounting the workspace on the gateway: the session cookie, the routers, static files, and
error pages in HTML for /app (the JSON API keeps its OperationOutcome)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

from fhir_gateway.errors import AuthError, ConfigError, GatewayError, UpstreamError
from fhir_gateway.security.auth import web_session_key
from fhir_gateway.settings import Settings
from fhir_gateway.web import pages, session, signin, upload
from fhir_gateway.web.render import STATIC, render


def _is_page(request: Request) -> bool:
    path = request.url.path
    return path == "/app" or path.startswith("/app/")


def install(app: FastAPI, settings: Settings) -> None:
    """Add the workspace to `app` (after the API's error handlers are in place)."""
    app.add_middleware(
        SessionMiddleware,
        secret_key=web_session_key(settings.data_dir),
        **session.session_options(settings),
    )
    app.include_router(signin.router)
    app.include_router(pages.router)
    app.include_router(upload.router)
    app.mount("/app/static", StaticFiles(directory=str(STATIC)), name="app-static")
    api_gateway: Any = app.exception_handlers[GatewayError]
    api_validation: Any = app.exception_handlers[RequestValidationError]

    async def gateway_error(request: Request, exc: Exception) -> Response:
        answer: Response = await api_gateway(request, exc)  # audit and log as for the API
        if not _is_page(request):
            return answer
        assert isinstance(exc, GatewayError)
        if type(exc) is AuthError and request.method == "GET":
            return RedirectResponse("/app/sign-in", status_code=303)
        message = exc.message
        if exc.status_code >= 500 and not isinstance(exc, UpstreamError | ConfigError):
            message = "internal error; see the gateway log for the request id"
        return render(
            request,
            "error.html",
            {"status": exc.status_code, "message": message},
            status_code=exc.status_code,
        )

    async def validation_error(request: Request, exc: Exception) -> Response:
        if not _is_page(request):
            answer: Response = await api_validation(request, exc)
            return answer
        return render(
            request,
            "error.html",
            {"status": 400, "message": "the request is not one this page takes"},
            status_code=400,
        )

    app.exception_handlers[GatewayError] = gateway_error
    app.exception_handlers[RequestValidationError] = validation_error
