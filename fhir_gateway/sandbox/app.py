"""A sandbox EHR: a FHIR R4 server with SMART Backend Services auth and fault injection.

It behaves like the real servers it stands in for (Epic, HAPI), not like our client hopes:
opaque `next` links backed by server-side state, `Bundle.total` sometimes absent, 400 for
unknown search parameters, 401/403 with OperationOutcome, tokens that expire, 429 with
`Retry-After`, 5xx bursts, conditional create (201/200/412) and If-Match updates (412), and an
asynchronous Bulk Data `$export` (`bulk.py`) with its own faults.
Every request is recorded in `SandboxState.log` so tests can assert what was really sent.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhir_gateway.errors import (
    AuthError,
    ForbiddenError,
    GatewayError,
    InputError,
    NotFoundError,
    operation_outcome,
)
from fhir_gateway.resources import Resource
from fhir_gateway.sandbox import bulk
from fhir_gateway.sandbox.repository import ResourceStore, load_folder
from fhir_gateway.security.smart_server import (
    OAuthError,
    RegisteredClient,
    ReplayCache,
    grant,
    permits,
    verify_client_assertion,
)

FHIR_JSON = "application/fhir+json"


@dataclass
class SandboxClient:
    """A registered backend-services client: its public JWKS and pre-authorised scopes."""

    client_id: str
    jwks: dict[str, Any]
    scopes: tuple[str, ...] = ("system/*.cruds",)


@dataclass
class Faults:
    """Fault injection; counters are over FHIR data requests (not discovery/token/metadata)."""

    latency_s: float = 0.0
    throttle_every: int = 0  # every Nth request answers 429
    retry_after: str = "1"  # seconds or an HTTP-date
    burst_start: int = 0  # first request number (1-based) of a 5xx burst; 0 = none
    burst_count: int = 0
    burst_status: int = 500
    paging_loop: bool = False  # the 2nd page's next link points back to the 1st page
    omit_total_every: int = 2  # Bundle.total absent on every Nth search (0 = always present)
    down: bool = False  # every request answers 503 with Retry-After (an outage)
    # Writes (POST/PUT) of these types answer 422 with this OperationOutcome text (business
    # rules or profile validation refusing the resource).
    reject_writes: dict[str, str] = field(default_factory=dict)
    # A write that succeeded is committed at once but answered this much later (a slow EHR;
    # lets a test kill the client after the EHR accepted and before it heard back).
    write_response_delay_s: float = 0.0
    # Bulk $export (BD-03/BD-04/BD-05): the first N kick-offs answer 429 + Retry-After (another
    # export is running); the first N status polls answer 500 with a transient OperationOutcome;
    # a non-empty `export_failure` makes status polls answer 500 with that fatal outcome; the
    # resources of `export_error_types` go to the error file instead of the output.
    export_kickoff_throttle: int = 0
    export_status_errors: int = 0
    export_failure: str = ""
    export_error_types: tuple[str, ...] = ()


@dataclass
class SandboxConfig:
    data_dir: Path | None = None
    clients: dict[str, SandboxClient] = field(default_factory=dict)
    require_auth: bool = True
    token_lifetime_s: int = 300
    page_size: int = 50
    max_page_size: int = 200
    everything: bool = True
    advertise_algs: tuple[str, ...] = ("RS384", "ES384")
    capabilities: tuple[str, ...] = (
        "client-confidential-asymmetric",
        "permission-v2",
        "permission-v1",
    )
    faults: Faults = field(default_factory=Faults)
    export_run_s: float = 1.0  # how long an $export job "runs" before its manifest is ready
    export_retry_after: str = "1"  # Retry-After on 202 status answers
    export_file_lines: int = 1000  # resources per NDJSON output file


@dataclass(frozen=True)
class LogEntry:
    t: float
    method: str
    path: str
    query: str
    status: int
    retry_after: str | None
    authorized: bool


@dataclass
class Grant:
    client_id: str
    scopes: frozenset[str]
    expires_at: float


class SandboxState:
    """Everything the sandbox holds: data, paging state, tokens, seen jtis, the request log."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.store = ResourceStore(load_folder(config.data_dir) if config.data_dir else [])
        self.log: list[LogEntry] = []
        self.lock = threading.Lock()
        self.counter = 0
        self.searches = 0
        self.pages: dict[str, tuple[list[tuple[str, str]], int, int]] = {}  # token -> state
        self.page_tokens: dict[tuple[str, int], str] = {}
        self.results: dict[str, list[tuple[str, str]]] = {}  # state id -> (type, id) list
        self.tokens: dict[str, Grant] = {}
        self.replay = ReplayCache()
        self.exports = bulk.ExportJobs()

    def register(self, client: SandboxClient) -> None:
        self.config.clients[client.client_id] = client

    def revoke_tokens(self) -> int:
        """Revoke every access token issued so far (key rotation, an admin's revocation)."""
        with self.lock:
            revoked = len(self.tokens)
            self.tokens.clear()
            return revoked

    def next_request_number(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


def create_sandbox_app(config: SandboxConfig) -> FastAPI:
    """The sandbox EHR as an ASGI app; FHIR base at `/fhir`, token endpoint at `/auth/token`."""
    state = SandboxState(config)
    app = FastAPI(title="fhir-gateway sandbox EHR", docs_url=None, redoc_url=None)
    app.state.sandbox = state

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> Response:
        headers = {"WWW-Authenticate": 'Bearer realm="sandbox"'} if exc.status_code == 401 else {}
        return _fhir(operation_outcome(exc.to_issue()), exc.status_code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        issue = {"severity": "error", "code": "not-supported", "diagnostics": str(exc.detail)}
        return _fhir(operation_outcome(issue), exc.status_code)

    @app.middleware("http")
    async def faults_and_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        faults = state.config.faults
        path = request.url.path
        counted = path.startswith("/fhir") and not (
            path.endswith("/metadata") or "/.well-known/" in path
        )
        response: Response | None = None
        if counted:
            if faults.latency_s:
                await asyncio.sleep(faults.latency_s)
            n = state.next_request_number()
            in_burst = faults.burst_start and (
                faults.burst_start <= n < faults.burst_start + faults.burst_count
            )
            rejected = faults.reject_writes.get(path.removeprefix("/fhir/").split("/")[0])
            if faults.down:
                issue = {"severity": "error", "code": "transient", "diagnostics": "unavailable"}
                response = _fhir(operation_outcome(issue), 503, {"Retry-After": faults.retry_after})
            elif rejected is not None and request.method in ("POST", "PUT"):
                issue = {"severity": "error", "code": "business-rule", "diagnostics": rejected}
                response = _fhir(operation_outcome(issue), 422)
            elif in_burst:
                issue = {"severity": "error", "code": "exception", "diagnostics": "injected fault"}
                response = _fhir(operation_outcome(issue), faults.burst_status)
            elif faults.throttle_every and n % faults.throttle_every == 0:
                issue = {"severity": "error", "code": "throttled", "diagnostics": "slow down"}
                response = _fhir(operation_outcome(issue), 429, {"Retry-After": faults.retry_after})
        if response is None:
            response = await call_next(request)
            if (
                counted
                and faults.write_response_delay_s
                and request.method in ("POST", "PUT")
                and response.status_code < 300
            ):
                await asyncio.sleep(faults.write_response_delay_s)
        state.log.append(
            LogEntry(
                t=time.time(),
                method=request.method,
                path=path,
                query=request.url.query,
                status=response.status_code,
                retry_after=response.headers.get("Retry-After"),
                authorized="authorization" in request.headers,
            )
        )
        return response

    @app.get("/fhir/.well-known/smart-configuration")
    def smart_configuration(request: Request) -> Response:
        origin = _origin(request)
        return JSONResponse(
            {
                "issuer": origin,
                "token_endpoint": f"{origin}/auth/token",
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": list(config.advertise_algs),
                "scopes_supported": ["system/*.rs", "system/*.read"],
                "capabilities": list(config.capabilities),
                "code_challenge_methods_supported": ["S256"],
            }
        )

    @app.post("/auth/token")
    async def token(request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        return _issue_token(state, form, f"{_origin(request)}/auth/token")

    @app.get("/fhir/metadata")
    def metadata(request: Request) -> Response:
        return _fhir(_capability_statement(state, _origin(request)))

    # Bulk Data $export: registered before the generic [type]/[id] routes they would match.

    @app.get("/fhir/Patient/$export")
    def export_patients(request: Request) -> Response:
        return _kick_off(state, request, None)

    @app.get("/fhir/Group/{group_id}/$export")
    def export_group(group_id: str, request: Request) -> Response:
        return _kick_off(state, request, group_id)

    @app.post("/fhir/Patient/$export")
    async def export_patients_post(request: Request) -> Response:
        return _kick_off(state, request, None, await _export_parameters(request))

    @app.post("/fhir/Group/{group_id}/$export")
    async def export_group_post(group_id: str, request: Request) -> Response:
        return _kick_off(state, request, group_id, await _export_parameters(request))

    @app.get("/fhir/$export-status/{job_id}")
    def export_status(job_id: str, request: Request) -> Response:
        return _export_status(state, request, job_id)

    @app.delete("/fhir/$export-status/{job_id}")
    def export_delete(job_id: str, request: Request) -> Response:
        grant = _authorize(state, request, None, "r")
        state.exports.delete(job_id, grant.client_id if grant else None)
        return Response(status_code=202)

    @app.get("/fhir/$export-files/{job_id}/{name}")
    def export_download(job_id: str, name: str, request: Request) -> Response:
        grant = _authorize(state, request, None, "r")  # requiresAccessToken = require_auth
        job = state.exports.get(job_id, grant.client_id if grant else None)
        if bulk.progress(job) < 1.0:
            raise NotFoundError("export is not complete")
        f = bulk.export_file(job, name)
        return StreamingResponse(bulk.iter_ndjson(state.store, f), media_type=bulk.NDJSON)

    @app.get("/fhir")
    def get_pages(request: Request) -> Response:
        _authorize(state, request, None, "s")
        token = request.query_params.get("_getpages")
        if token is None or token not in state.pages:
            raise InputError("unknown or expired paging state")
        return _fhir(_render_page(state, request, token))

    @app.get("/fhir/Patient/{patient_id}/$everything")
    def everything(patient_id: str, request: Request) -> Response:
        if not config.everything:
            raise InputError("operation $everything is not supported")
        grant = _authorize(state, request, "Patient", "r")
        found = state.store.compartment(patient_id)
        # `_type` (Patient-everything): comma-separated, may repeat; only those types.
        wanted = {t for v in request.query_params.getlist("_type") for t in v.split(",") if t}
        if wanted:
            found = [r for r in found if r["resourceType"] in wanted]
        allowed = [r for r in found if _permits(grant, r["resourceType"], "s")]
        withheld = len(found) - len(allowed)
        return _fhir(_start_search(state, request, allowed, _count(request, config), withheld))

    @app.get("/fhir/{resource_type}")
    def search_get(resource_type: str, request: Request) -> Response:
        params = list(request.query_params.multi_items())
        return _fhir(_search(state, request, resource_type, params))

    @app.post("/fhir/{resource_type}/_search")
    async def search_post(resource_type: str, request: Request) -> Response:
        params = parse_qsl((await request.body()).decode())
        params += list(request.query_params.multi_items())
        return _fhir(_search(state, request, resource_type, params))

    @app.get("/fhir/{resource_type}/{resource_id}")
    def read(resource_type: str, resource_id: str, request: Request) -> Response:
        _authorize(state, request, resource_type, "r")
        resource = state.store.get(resource_type, resource_id)
        # Content negotiation as servers do it: the client's first choice wins.
        first_choice = request.headers.get("accept", "*/*").split(",")[0].split(";")[0].strip()
        if resource_type == "Binary" and "json" not in first_choice:
            data = base64.b64decode(resource.get("data") or "")
            return Response(data, media_type=resource.get("contentType"))
        return _fhir(resource, 200, {"ETag": f'W/"{resource["meta"]["versionId"]}"'})

    @app.post("/fhir/{resource_type}")
    async def create(resource_type: str, request: Request) -> Response:
        _authorize(state, request, resource_type, "c")
        resource = await _body_resource(request, resource_type)
        cond = request.headers.get("if-none-exist")
        result = state.store.create(resource, parse_qsl(cond) if cond is not None else None)
        return _written(request, result.resource, result.status)

    @app.put("/fhir/{resource_type}/{resource_id}")
    async def update(resource_type: str, resource_id: str, request: Request) -> Response:
        _authorize(state, request, resource_type, "u")
        resource = await _body_resource(request, resource_type)
        if resource.get("id") != resource_id:
            raise InputError("resource id in the body does not match the URL")
        result = state.store.update(resource, request.headers.get("if-match"))
        return _written(request, result.resource, result.status)

    return app


# --- SMART token endpoint (SM-20..SM-23) --------------------------------------------------


def _issue_token(state: SandboxState, form: dict[str, str], token_url: str) -> Response:
    clients = {
        c.client_id: RegisteredClient(c.client_id, jwks=c.jwks, scopes=c.scopes)
        for c in state.config.clients.values()
    }
    try:
        client = verify_client_assertion(
            form, clients, token_url, replay=state.replay, algs=state.config.advertise_algs
        )
        granted = grant(form.get("scope", ""), client.scopes)
    except OAuthError as exc:
        return _oauth_error(exc.error, exc.description, exc.status)
    value = secrets.token_urlsafe(32)
    lifetime = state.config.token_lifetime_s
    state.tokens[value] = Grant(client.client_id, frozenset(granted), time.time() + lifetime)
    return JSONResponse(
        {
            "access_token": value,
            "token_type": "bearer",
            "expires_in": lifetime,
            "scope": " ".join(granted),
        },
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


def _oauth_error(error: str, description: str, status: int = 400) -> Response:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


def _permits(grant: Grant | None, resource_type: str, letter: str) -> bool:
    return grant is None or permits(grant.scopes, resource_type, letter)


def _authorize(
    state: SandboxState, request: Request, resource_type: str | None, letter: str
) -> Grant | None:
    """Check the bearer token and its scopes (401 without/expired, 403 outside scopes)."""
    if not state.config.require_auth:
        return None
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise AuthError("bearer token required")
    grant = state.tokens.get(header[7:].strip())
    if grant is None or grant.expires_at <= time.time():
        raise AuthError("access token invalid or expired")
    if resource_type is not None and not _permits(grant, resource_type, letter):
        raise ForbiddenError(f"token scopes do not permit {letter} on {resource_type}")
    return grant


# --- Bulk Data $export (BD-01..BD-07) ------------------------------------------------------


async def _export_parameters(request: Request) -> tuple[list[tuple[str, str]], set[str]]:
    """A POST kick-off's Parameters body (BD-01) as (name, value) pairs and patient ids."""
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise InputError("the $export Parameters body is not JSON") from exc
    return bulk.parameters_to_params(body)


def _kick_off(
    state: SandboxState,
    request: Request,
    group_id: str | None,
    posted: tuple[list[tuple[str, str]], set[str]] | None = None,
) -> Response:
    """BD-01/BD-03: 202 + Content-Location, or 429 while "another export runs" (a fault).
    `posted`: the parameters of a POST kick-off (else they are the query's)."""
    faults = state.config.faults
    if state.exports.next_kickoff() <= faults.export_kickoff_throttle:
        issue = {"severity": "error", "code": "throttled", "diagnostics": "an export is running"}
        return _fhir(operation_outcome(issue), 429, {"Retry-After": faults.retry_after})
    grant = _authorize(state, request, "Group" if group_id else "Patient", "r")
    prefer = request.headers.get("prefer", "")
    if "respond-async" not in prefer:
        raise InputError("$export requires Prefer: respond-async")
    if posted is None:
        export = bulk.parse_export_params(list(request.query_params.multi_items()), prefer)
    else:
        export = bulk.parse_export_params(posted[0], prefer, posted[1])
    job = bulk.start_export(
        state.store,
        state.exports,
        export,
        group_id=group_id,
        client_id=grant.client_id if grant else None,
        request_url=str(request.url),
        permits=lambda rtype: _permits(grant, rtype, "r"),
        run_s=state.config.export_run_s,
        file_lines=state.config.export_file_lines,
        error_types=faults.export_error_types,
    )
    location = f"{_origin(request)}/fhir/$export-status/{job.id}"
    return Response(status_code=202, headers={"Content-Location": location})


def _export_status(state: SandboxState, request: Request, job_id: str) -> Response:
    """BD-04/BD-05: 202 + X-Progress + Retry-After while running, 200 + manifest when done."""
    grant = _authorize(state, request, None, "r")
    job = state.exports.get(job_id, grant.client_id if grant else None)
    faults = state.config.faults
    if state.exports.next_status_poll() <= faults.export_status_errors:
        issue = {"severity": "error", "code": "transient", "diagnostics": "try again later"}
        return _fhir(operation_outcome(issue), 500)
    if faults.export_failure:
        issue = {"severity": "fatal", "code": "exception", "diagnostics": faults.export_failure}
        return _fhir(operation_outcome(issue), 500)
    job.status_polls += 1
    if bulk.progress(job) < 1.0:
        headers = {
            "X-Progress": bulk.progress_text(job),
            "Retry-After": state.config.export_retry_after,
        }
        return Response(status_code=202, headers=headers)
    body = bulk.manifest(job, f"{_origin(request)}/fhir", state.config.require_auth)
    return JSONResponse(body, headers={"Expires": _http_date(time.time() + 3600)})


def _http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


# --- search and paging (RS-20, RS-21) -----------------------------------------------------


def _search(
    state: SandboxState, request: Request, resource_type: str, params: list[tuple[str, str]]
) -> Resource:
    _authorize(state, request, resource_type, "s")
    found = state.store.search(resource_type, [(k, v) for k, v in params if k != "_count"])
    count = _count_of(dict(params).get("_count"), state.config)
    return _start_search(state, request, found, count, 0)


def _start_search(
    state: SandboxState, request: Request, found: list[Resource], count: int, withheld: int
) -> Resource:
    state_id = secrets.token_hex(12)
    with state.lock:
        state.searches += 1
        every = state.config.faults.omit_total_every
        omit_total = bool(every) and state.searches % every == 0
        state.results[state_id] = [(r["resourceType"], r["id"]) for r in found]
    token = _page_token(state, state_id, 0, count, omit_total, withheld)
    return _render_page(state, request, token, self_url=str(request.url))


def _page_token(
    state: SandboxState, state_id: str, offset: int, count: int, omit_total: bool, withheld: int
) -> str:
    with state.lock:
        token = state.page_tokens.get((state_id, offset))
        if token is None:
            token = secrets.token_urlsafe(16)
            state.page_tokens[(state_id, offset)] = token
            flags = [("omit_total", "1" if omit_total else "0"), ("withheld", str(withheld))]
            state.pages[token] = ([("state", state_id), *flags], offset, count)
        return token


def _render_page(
    state: SandboxState, request: Request, token: str, self_url: str | None = None
) -> Resource:
    meta, offset, count = state.pages[token]
    info = dict(meta)
    state_id, omit_total, withheld = info["state"], info["omit_total"] == "1", int(info["withheld"])
    ids = state.results[state_id]
    origin = _origin(request)
    base = f"{origin}/fhir"
    entries: list[Resource] = []
    for resource_type, resource_id in ids[offset : offset + count]:
        try:
            resource = state.store.get(resource_type, resource_id)
        except GatewayError:
            continue  # deleted since the search ran
        entries.append(
            {
                "fullUrl": f"{base}/{resource_type}/{resource_id}",
                "resource": resource,
                "search": {"mode": "match"},
            }
        )
    if withheld and offset == 0:
        issue = {
            "severity": "information",
            "code": "suppressed",
            "diagnostics": f"{withheld} resources withheld by access policy",
        }
        entries.append({"resource": operation_outcome(issue), "search": {"mode": "outcome"}})
    links = [{"relation": "self", "url": self_url or f"{base}?_getpages={token}"}]
    if offset + count < len(ids):
        nxt = _page_token(state, state_id, offset + count, count, omit_total, withheld)
        if state.config.faults.paging_loop and offset > 0:
            nxt = _page_token(state, state_id, 0, count, omit_total, withheld)
        links.append({"relation": "next", "url": f"{base}?_getpages={nxt}"})
    bundle: Resource = {"resourceType": "Bundle", "type": "searchset", "link": links}
    if not omit_total:
        bundle["total"] = len(ids)
    bundle["entry"] = entries
    return bundle


def _count(request: Request, config: SandboxConfig) -> int:
    return _count_of(request.query_params.get("_count"), config)


def _count_of(value: str | None, config: SandboxConfig) -> int:
    if value is None:
        return config.page_size
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"_count must be a positive integer, got {value!r}")
    return min(int(value), config.max_page_size)


# --- responses ----------------------------------------------------------------------------


def _capability_statement(state: SandboxState, origin: str) -> Resource:
    search_params = [
        {"name": n, "type": t}
        for n, t in (
            ("patient", "reference"),
            ("subject", "reference"),
            ("category", "token"),
            ("code", "token"),
            ("identifier", "token"),
            ("_lastUpdated", "date"),
        )
    ]
    types = sorted({*state.store.types(), "Patient", "Binary", "Task", "DiagnosticReport"})
    resources = []
    for t in types:
        entry: Resource = {
            "type": t,
            "interaction": [{"code": c} for c in ("read", "search-type", "create", "update")],
            "searchParam": search_params,
        }
        if t == "Patient" and state.config.everything:
            entry["operation"] = [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                }
            ]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-01-01",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "implementation": {"description": "fhir-gateway sandbox EHR", "url": f"{origin}/fhir"},
        "rest": [
            {
                "mode": "server",
                "security": {
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ]
                },
                "resource": resources,
            }
        ],
    }


async def _body_resource(request: Request, resource_type: str) -> Resource:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InputError("request body is not JSON") from exc
    if not isinstance(body, dict) or body.get("resourceType") != resource_type:
        raise InputError(f"request body is not a {resource_type}")
    return body


def _written(request: Request, resource: Resource, status: int) -> Response:
    version = resource["meta"]["versionId"]
    location = f"{_origin(request)}/fhir/{resource['resourceType']}/{resource['id']}"
    headers = {
        "Location": f"{location}/_history/{version}",
        "ETag": f'W/"{version}"',
        "Last-Modified": email.utils.format_datetime(
            datetime.fromisoformat(str(resource["meta"]["lastUpdated"]).replace("Z", "+00:00")),
            usegmt=True,
        ),
    }
    return _fhir(resource, status, headers)


def _fhir(body: Resource, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        body,
        status_code=status,
        headers=headers,
        media_type=f"{FHIR_JSON}; charset=utf-8",
    )


def _origin(request: Request) -> str:
    return str(request.base_url).rstrip("/")
