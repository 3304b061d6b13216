"""FastAPI dependencies: settings, store, the caller, and size-limited FHIR JSON bodies.

The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in a
worker thread, and a thread hop per dependency cost more than a small answer's own work. The
caller is taken from a token (or cookie) verified before without leaving the event loop; a new
one is verified in a worker thread (an external issuer's key set may need fetching).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from fhir_gateway.errors import (
    AuthError,
    ForbiddenError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from fhir_gateway.intake.validation import parse_json
from fhir_gateway.security import sessions
from fhir_gateway.security.access import Principal
from fhir_gateway.security.auth import TokenValidator
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store

INLINE_PARSE_BYTES = 32 * 1024  # bodies up to this size are parsed on the event loop
JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")


# Dependencies that do no blocking I/O are `async def`: FastAPI runs a plain `def` dependency
# in the thread pool, a hop that cost more CPU than the dependency itself.
async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("a bearer token is required")
    return token.strip()


def principal_of(request: Request) -> Principal:
    """The bearer token's caller, for code outside the dependency system (blocking: call it
    from a worker thread)."""
    validator: TokenValidator = request.app.state.tokens
    who = validator.validate(_bearer(request))
    request.state.principal = who
    return who


async def get_principal(request: Request) -> Principal:
    token = _bearer(request)
    validator: TokenValidator = request.app.state.tokens
    who = validator.cached(token)
    if who is None:  # validated on the event loop unless it may fetch an issuer's JWKS
        who = (
            await run_in_threadpool(validator.validate, token)
            if validator.may_block
            else validator.validate(token)
        )
    request.state.principal = who
    return who


SAFE_METHODS = ("GET", "HEAD")


async def get_reader(request: Request) -> Principal:
    """The caller of a read: a bearer token, or else (GET/HEAD only) the browser session cookie
    (`security.sessions`), which is how the same-origin viewer reaches the case's DICOMweb."""
    if request.headers.get("authorization"):
        return await get_principal(request)
    cookie = request.cookies.get(sessions.COOKIE)
    if cookie and request.method in SAFE_METHODS:
        settings: Settings = request.app.state.settings
        who = sessions.cached(settings.data_dir, cookie)
        if who is None:
            who = await run_in_threadpool(sessions.read, settings.data_dir, cookie)
        request.state.principal = who
        return who
    raise AuthError("a bearer token or a signed-in session is required")


def require_role(who: Principal, roles: tuple[str, ...]) -> Principal:
    """`who`, who must hold one of `roles`.

    Raises:
        ForbiddenError: another role.
    """
    if who.role not in roles:
        raise ForbiddenError(f"role {who.role!r} may not do this (needs {' or '.join(roles)})")
    return who


def role(*roles: str) -> Any:
    """Dependency: the caller, who must hold one of `roles`."""

    async def check(who: Annotated[Principal, Depends(get_principal)]) -> Principal:
        return require_role(who, roles)

    return Depends(check)


async def fhir_json_body(
    request: Request, _who: Annotated[Principal, Depends(get_principal)]
) -> Any:
    """The request body as parsed JSON, after content-type and size checks. The caller is
    authenticated first: no body of an unauthenticated caller is read.

    Raises:
        UnsupportedMediaTypeError, PayloadTooLargeError, ParseError: 415, 413, 400.
    """
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise UnsupportedMediaTypeError(
            f"Content-Type must be application/fhir+json, got {ctype or 'none'!r}"
        )
    settings: Settings = request.app.state.settings
    limit = settings.limits.max_json_bytes
    declared = request.headers.get("content-length")
    if (
        declared
        and declared.isascii()
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > limit)
    ):
        raise PayloadTooLargeError(f"body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    body, depth = b"".join(chunks), settings.limits.max_json_depth
    if size <= INLINE_PARSE_BYTES:  # a referral: parsing costs less than a thread hop
        return parse_json(body, max_depth=depth)
    # Parsed off the event loop: a big push must not stall other requests while it parses.
    return await run_in_threadpool(parse_json, body, max_depth=depth)


def reader_role(*roles: str) -> Any:
    """Dependency: the caller of a read (bearer or session), who must hold one of `roles`."""

    async def check(who: Annotated[Principal, Depends(get_reader)]) -> Principal:
        if who.role not in roles:
            raise ForbiddenError(f"role {who.role!r} may not do this (needs {' or '.join(roles)})")
        return who

    return Depends(check)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[Store, Depends(get_store)]
Body = Annotated[Any, Depends(fhir_json_body)]
EHR_OR_ADMIN = role("ehr", "admin")
ANY_ROLE = role("ehr", "reviewer", "admin")
STAFF = role("reviewer", "admin")
ADMIN = role("admin")
STAFF_READER = reader_role("reviewer", "admin")
