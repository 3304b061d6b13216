"""The workspace session: who is signed in, and the CSRF token every form carries.

The session is Starlette's signed cookie (itsdangerous; key in the data dir): HttpOnly,
SameSite=Lax, Secure when the public base URL is https. It holds the caller's subject and role
and the CSRF token, never a clinical value.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import Request

from fhir_gateway.errors import AuthError, ForbiddenError, PayloadTooLargeError
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings

COOKIE = "fhir_gateway_session"
MAX_FORM_BYTES = 1024 * 1024
WORKSPACE_ROLES = ("reviewer", "admin")


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def sign_in(request: Request, who: Principal, via: str) -> None:
    """A fresh session for `who` (nothing of the previous one survives, not even its CSRF)."""
    if who.role not in WORKSPACE_ROLES:
        raise ForbiddenError(f"role {who.role!r} may not use the workspace")
    request.session.clear()
    request.session.update(
        {"sub": who.sub, "role": who.role, "via": via, "csrf": secrets.token_urlsafe(32)}
    )


def principal(request: Request) -> Principal:
    """The signed-in caller. Raises AuthError (the pages answer with the sign-in page)."""
    sub, role = request.session.get("sub"), request.session.get("role")
    if not isinstance(sub, str) or role not in WORKSPACE_ROLES:
        raise AuthError("sign in to use the workspace")
    who = Principal(sub=sub, role=str(role))
    request.state.principal = who
    return who


async def form(request: Request) -> dict[str, str]:
    """The posted form (urlencoded, size-limited), after the CSRF check.

    Raises:
        PayloadTooLargeError; ForbiddenError when the CSRF token is missing or wrong.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise PayloadTooLargeError(f"form of {declared} bytes is over the limit")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PayloadTooLargeError("form is over the limit")
    fields = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    sent = fields.pop("csrf", None) or request.headers.get("x-csrf-token")
    expected = request.session.get("csrf")
    if not sent or not isinstance(expected, str) or not hmac.compare_digest(sent, expected):
        raise ForbiddenError("the form's CSRF token is missing or does not match the session")
    return fields


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def dev_sign_in_allowed(settings: Settings, request: Request | None = None) -> bool:
    """The dev sign-in works only with the dev issuer on, a loopback public base URL, and (per
    request) a browser on loopback."""
    if not (settings.web.dev_sign_in and settings.auth.dev_issuer):
        return False
    if not _loopback(urlsplit(settings.base_url).hostname):
        return False
    if request is not None:
        client = request.client.host if request.client else None
        return _loopback(client)
    return True


def session_options(settings: Settings) -> dict[str, Any]:
    return {
        "session_cookie": COOKIE,
        "max_age": settings.web.session_max_age_s,
        "same_site": "lax",
        "https_only": settings.base_url.lower().startswith("https://"),
    }
