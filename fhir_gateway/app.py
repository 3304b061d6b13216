"""The FastAPI application: routers, error handling, store and (optionally) worker threads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from fhir_gateway import job_handlers, jobs
from fhir_gateway.api import (
    admin,
    audit,
    bundle,
    cases,
    communications,
    dicomweb,
    fhir,
    ops,
    reports,
    smart,
    subscriptions,
)
from fhir_gateway.api.deps import StoreDep
from fhir_gateway.api.observe import AccessMiddleware
from fhir_gateway.api.responses import add_error_handlers
from fhir_gateway.logging import configure_logging
from fhir_gateway.security.auth import TokenValidator
from fhir_gateway.security.client_keys import JWKS_CACHE_CONTROL, published_jwks
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store, open_store


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    workers: int = 0,
    configure_logs: bool = True,
) -> FastAPI:
    """Build the service. `workers` > 0 runs that many job worker threads beside the API."""
    settings = settings or Settings()
    if configure_logs:
        configure_logging(settings.log_format, settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _ = settings.partners  # fail at startup, not on the first request, if the file is bad

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_store = store is None
        app.state.store = store or open_store(settings.db_url, key_dir=settings.data_dir / "keys")
        running: list[jobs.Worker] = []
        if workers:
            job_handlers.register_all()
            running = jobs.start_worker_threads(app.state.store, settings, workers)
        try:
            yield
        finally:
            jobs.stop_workers(running)
            if own_store:
                app.state.store.dispose()

    app = FastAPI(title="fhir-gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.tokens = TokenValidator(settings.auth, settings.data_dir)
    if store is not None:
        app.state.store = store
    app.add_middleware(AccessMiddleware)
    if settings.trusted_proxies:
        # Outside the access middleware, so the access log shows the client the proxy reports.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    add_error_handlers(app)
    app.include_router(smart.router)  # before /fhir/{type}
    app.include_router(audit.router)
    app.include_router(subscriptions.router)  # before /fhir/{type}
    app.include_router(communications.router)
    app.include_router(fhir.router)
    app.include_router(cases.router)
    app.include_router(reports.router)
    app.include_router(bundle.router)
    app.include_router(dicomweb.router)
    app.include_router(admin.router)
    app.include_router(ops.router)

    @app.get("/.well-known/jwks.json", tags=["ops"])
    def jwks() -> JSONResponse:
        """Public keys of our SMART client keys, for partners to register (SM-04)."""
        return JSONResponse(
            published_jwks(settings.partners), headers={"Cache-Control": JWKS_CACHE_CONTROL}
        )

    @app.get("/health", tags=["ops"])
    def health(db: StoreDep) -> dict[str, str]:
        """Liveness and database reachability; no auth, no PHI."""
        with db.session() as s:
            s.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
