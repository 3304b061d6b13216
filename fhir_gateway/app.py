"""The FastAPI application: routers, error handling, store and (optionally) worker threads."""

from __future__ import annotations

import ctypes
import fcntl
import gc
import json
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import structlog
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
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
    documents,
    fhir,
    ops,
    reports,
    smart,
    stow,
    subscriptions,
    upload_links,
    uploads,
    viewer,
)
from fhir_gateway.api.cors import DicomwebCORSMiddleware
from fhir_gateway.api.deps import ADMIN, StoreDep
from fhir_gateway.api.observe import AccessMiddleware
from fhir_gateway.api.responses import add_error_handlers
from fhir_gateway.casebundle import normalise
from fhir_gateway.intake import hosted, validation
from fhir_gateway.logging import configure_logging
from fhir_gateway.security.access import Principal
from fhir_gateway.security.auth import TokenValidator
from fhir_gateway.security.client_keys import JWKS_CACHE_CONTROL, published_jwks
from fhir_gateway.settings import Settings, ensure_data_dir
from fhir_gateway.store import Store, open_store
from fhir_gateway.web import app as web

log = structlog.get_logger(__name__)


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(count: int) -> bool:
    """At most `count` glibc malloc arenas in this process (0: leave glibc's default).

    glibc gives each thread that allocates its own arena, up to 8 per core; memory a thread
    frees stays in its arena for that thread, so the job workers and the request threads
    each kept their own high-water mark (big case: 231 -> 223 MB peak RSS with 2). An operator's
    MALLOC_ARENA_MAX (or GLIBC_TUNABLES) wins. False when nothing was set (another libc)."""
    if (
        count <= 0
        or "MALLOC_ARENA_MAX" in os.environ
        or "arena_max" in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to limit this way
        return False
    return bool(libc.mallopt(M_ARENA_MAX, count))


def _preload(jobs: bool) -> None:
    """Start-up work aside from requests: the FHIR model classes intake validates (imported
    lazily, they cost the first referral ~0.1 s; +6 MB RSS), with job workers what the first
    normalisation would load (the unit factor table), then the heap as it stands (imports, code
    tables: ~190,000 objects that live as long as the process) moved out of the
    cyclic collector's reach (`gc.freeze`), so the full collections a big case's
    normalisation triggers scan only what the case allocated (they were ~40% of a
    5,000-resource build's time)."""
    validation.preload(hosted.HOSTED_TYPES)
    if jobs:
        normalise.preload()
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    workers: int = 0,
    configure_logs: bool = True,
    migrate: bool = True,
    job_process_lock: Path | None = None,
) -> FastAPI:
    """Build the service. `workers` > 0 runs that many job worker threads beside the API;
    with `job_process_lock` (one of several `serve` processes) only in the process that holds
    an flock of that file. `migrate=False`: the schema was brought up to date before."""
    settings = settings or Settings()
    if configure_logs:
        configure_logging(settings.log_format, settings.log_level)
    limit_malloc_arenas(settings.malloc_arena_max)  # before the worker and request threads
    ensure_data_dir(settings)  # ConfigError, one line, if it cannot be written
    _ = settings.partners  # fail at startup, not on the first request, if the file is bad

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_store = store is None
        app.state.store = store or open_store(
            settings.db_url, key_dir=settings.data_dir / "keys", migrate=migrate
        )
        _prepare_routes(app)
        running: list[jobs.Worker] = []
        held = _job_process(job_process_lock) if workers and job_process_lock else None
        if workers and (job_process_lock is None or held is not None):
            job_handlers.register_all()
            running = jobs.start_worker_threads(app.state.store, settings, workers)
            log.info("serve.jobs.start", threads=workers, pid=os.getpid())
        # What the first referral and normalisation would build, built now, aside.
        threading.Thread(
            target=_preload, args=(bool(running),), name="preload", daemon=True
        ).start()
        try:
            yield
        finally:
            jobs.stop_workers(running)
            if held is not None:
                os.close(held)  # the next process to start may run them
            if own_store:
                app.state.store.dispose()

    # redirect_slashes off: Starlette's `/cases/` -> `/cases` redirect builds its Location
    # from the Host header; a URL with a stray slash is simply not found.
    # OpenAPI pages are off: FastAPI would serve them to anyone. `api_docs` adds them for admins.
    app = FastAPI(
        title="fhir-gateway",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.tokens = TokenValidator(settings.auth, settings.data_dir)
    if store is not None:
        app.state.store = store
    if settings.cors.allow_origins:
        app.add_middleware(
            DicomwebCORSMiddleware,
            allow_origins=settings.cors.allow_origins,
            max_age=settings.cors.max_age_s,
        )
    app.add_middleware(AccessMiddleware)
    if settings.trusted_proxies:
        # Outside the access middleware, so the access log shows the client the proxy reports.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    add_error_handlers(app)
    app.include_router(fhir.transaction_router)  # first: the busiest route, matched first
    app.include_router(smart.router)  # before /fhir/{type}
    app.include_router(audit.router)
    app.include_router(subscriptions.router)  # before /fhir/{type}
    app.include_router(communications.router)
    app.include_router(fhir.router)
    app.include_router(cases.router)
    app.include_router(reports.router)
    app.include_router(bundle.router)
    app.include_router(dicomweb.router)
    app.include_router(documents.router)
    app.include_router(stow.router)
    app.include_router(uploads.router)
    app.include_router(upload_links.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    web.install(app, settings)  # the reviewer workspace at /app
    app.include_router(viewer.router)
    viewer.mount_viewer(app, settings)

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

    if settings.api_docs:
        add_api_docs(app)
    return app


def _prepare_routes(app: FastAPI) -> None:
    """Have FastAPI build every included router's routes (dependency graphs, pydantic type
    adapters) now, not in the first request that reaches each router: a path no route takes,
    matched against all of them. The first referral was ~0.2 s of route building (the first
    requests under load ~0.8 s of CPU, seen by py-spy as "dependency resolution" and
    "route matching" in a whole-run profile of bench_intake)."""
    scope = {"type": "http", "path": "/\x00", "method": "GET", "headers": [], "app": app}
    scope |= {"query_string": b"", "root_path": ""}
    for route in app.router.routes:
        route.matches(scope)


def serve_process_app() -> FastAPI:
    """The app of one of `serve --processes N`'s processes; uvicorn imports it by name in each.
    Settings come from the environment `serve` set up (data dir, public base URL, job worker
    threads); `serve` migrated the schema and made the keys before starting any of them."""
    settings = Settings()
    return create_app(
        settings,
        workers=settings.jobs.workers,
        migrate=False,
        job_process_lock=settings.data_dir / JOB_PROCESS_LOCK,
    )


JOB_PROCESS_LOCK = ".serve-jobs.lock"


def _job_process(path: Path) -> int | None:
    """An open file descriptor holding the flock of `path` when this process is the one that
    runs the job workers; None when another live process holds it. The kernel releases it when
    the process exits, so a restarted process takes over."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def add_api_docs(app: FastAPI) -> None:
    """`/openapi.json`, `/docs` and `/redoc` for admins (bearer token). The pages embed the
    schema, so the browser needs no second authenticated request."""

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json(who: Principal = ADMIN) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def swagger(who: Principal = ADMIN) -> HTMLResponse:
        return HTMLResponse(_DOCS_PAGE.format(spec=_script_json(app.openapi()), ui=_SWAGGER))

    @app.get("/redoc", include_in_schema=False)
    def redoc(who: Principal = ADMIN) -> HTMLResponse:
        return HTMLResponse(_DOCS_PAGE.format(spec=_script_json(app.openapi()), ui=_REDOC))


def _script_json(value: object) -> str:
    return json.dumps(value).replace("<", "\\u003c")  # cannot close the <script> element


_DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fhir-gateway API</title></head>
<body><div id="ui"></div><script>const spec = {spec};</script>{ui}</body></html>
"""
_SWAGGER = """<link rel="stylesheet"
 href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({spec: spec, dom_id: "#ui"});</script>"""
_REDOC = """<script src="https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"></script>
<script>Redoc.init(spec, {}, document.getElementById("ui"));</script>"""
