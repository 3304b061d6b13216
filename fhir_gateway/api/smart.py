"""SMART Backend Services for partners calling us (SM-20..SM-22): discovery, token endpoint,
token introspection. Partners register a client (JWKS URL or file) in the partners file."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fhir_gateway.api.deps import ANY_ROLE, SettingsDep
from fhir_gateway.api.responses import audit_refused
from fhir_gateway.errors import ConfigError
from fhir_gateway.security.access import Principal
from fhir_gateway.security.auth import TokenValidator, issue_access_token
from fhir_gateway.security.smart_server import (
    ALG_KTY,
    DbReplayCache,
    JwksCache,
    OAuthError,
    RateLimiter,
    RegisteredClient,
    grant,
    retry_after_header,
    verify_client_assertion,
)
from fhir_gateway.settings import Settings

router = APIRouter(tags=["smart"])
log = structlog.get_logger(__name__)
MAX_FORM_BYTES = 64 * 1024
SCOPES_SUPPORTED = [
    "system/Task.cruds",
    "system/ServiceRequest.crs",
    "system/Patient.crs",
    "system/*.c",
    "system/Task.read",
    "system/Task.write",
]
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _token_url(settings: Settings) -> str:
    return f"{settings.base_url}/auth/token"


@router.get("/fhir/.well-known/smart-configuration")
def smart_configuration(settings: SettingsDep) -> JSONResponse:
    """SMART discovery on our FHIR base (SM-20), absolute URLs."""
    base = settings.base_url
    return JSONResponse(
        {
            "issuer": base,
            "token_endpoint": _token_url(settings),
            "introspection_endpoint": f"{base}/auth/introspect",
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": sorted(ALG_KTY),
            "scopes_supported": SCOPES_SUPPORTED,
            "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1"],
            "code_challenge_methods_supported": ["S256"],
        }
    )


async def _form(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise OAuthError("invalid_request", "the request is too large")
    try:
        return dict(parse_qsl(body.decode("utf-8"), strict_parsing=False))
    except UnicodeDecodeError as exc:
        raise OAuthError("invalid_request", "the body is not UTF-8") from exc


def registered_clients(settings: Settings) -> dict[str, RegisteredClient]:
    clients: dict[str, RegisteredClient] = {}
    for partner in settings.partners.partners:
        c = partner.client
        if c is None:
            continue
        jwks: dict[str, Any] | None = None
        if c.jwks_file is not None:
            try:
                jwks = json.loads(c.jwks_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"partner {partner.id}: cannot read its JWKS file") from exc
        clients[c.client_id] = RegisteredClient(
            c.client_id,
            jwks=jwks,
            jwks_url=c.jwks_url,
            scopes=tuple(c.scopes),
            partner_id=partner.id,
        )
    return clients


def _too_many(who: str, wait_s: float) -> JSONResponse:
    """429 with `Retry-After` and an OAuth error body (RFC 6749 §5.2 shape; RFC 6585)."""
    log.warning("smart.token.rate_limited", limit=who, retry_after_s=round(wait_s, 1))
    body = {
        "error": "temporarily_unavailable",
        "error_description": f"too many token requests from this {who}; retry later",
    }
    return JSONResponse(
        body, status_code=429, headers=NO_STORE | {"Retry-After": retry_after_header(wait_s)}
    )


def _limits(request: Request, settings: Settings) -> tuple[RateLimiter, RateLimiter]:
    state = request.app.state
    if not hasattr(state, "smart_limits"):
        a = settings.auth
        state.smart_limits = (
            RateLimiter(a.token_requests_per_minute_per_address, a.token_burst_per_address),
            RateLimiter(a.token_requests_per_minute_per_client, a.token_burst_per_client),
        )
    limits: tuple[RateLimiter, RateLimiter] = state.smart_limits
    return limits


@router.post("/auth/token")
async def token(request: Request, settings: SettingsDep) -> JSONResponse:
    """client_credentials with a private_key_jwt assertion -> a short-lived access token.

    Rate limited per address (every request) and per client (verified requests): 429 with
    `Retry-After`. Assertion jtis are remembered in the database (replay after a restart, or
    at another process, is refused)."""
    state = request.app.state
    if not hasattr(state, "smart_replay"):
        state.smart_replay, state.smart_jwks = DbReplayCache(state.store), JwksCache()
    by_address, by_client = _limits(request, settings)
    wait = by_address.take(request.client.host if request.client else "unknown")
    if wait is not None:
        return _too_many("address", wait)
    try:
        form = await _form(request)
        clients = registered_clients(settings)
        client = await run_in_threadpool(
            verify_client_assertion,
            form,
            clients,
            _token_url(settings),
            replay=state.smart_replay,
            jwks_cache=state.smart_jwks,
        )
        wait = by_client.take(client.client_id)
        if wait is not None:
            return _too_many("client", wait)
        scopes = grant(form.get("scope", ""), client.scopes)
    except OAuthError as exc:
        await audit_refused(request, exc.status)  # 401 invalid_client: one row per request
        return JSONResponse(exc.body(), status_code=exc.status, headers=NO_STORE)
    lifetime = settings.auth.access_token_lifetime_s
    value = issue_access_token(
        settings.data_dir,
        client_id=client.client_id,
        partner_id=client.partner_id or "",
        scopes=scopes,
        lifetime_s=lifetime,
        audience=settings.auth.audience,
    )
    return JSONResponse(
        {
            "access_token": value,
            "token_type": "bearer",
            "expires_in": lifetime,
            "scope": " ".join(scopes),
        },
        headers=NO_STORE,
    )


@router.post("/auth/introspect")
async def introspect(request: Request, who: Principal = ANY_ROLE) -> JSONResponse:
    """RFC 7662 token introspection (US Core 7+ asks for it), for authenticated callers."""
    try:
        form = await _form(request)
    except OAuthError as exc:
        return JSONResponse(exc.body(), status_code=exc.status, headers=NO_STORE)
    validator: TokenValidator = request.app.state.tokens
    return JSONResponse(validator.introspect(form.get("token", "")), headers=NO_STORE)
