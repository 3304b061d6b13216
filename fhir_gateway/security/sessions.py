"""Browser sessions: a signed, HttpOnly cookie naming a signed-in reviewer or admin.

Why a cookie: the OHIF viewer at `/viewer` is served from our own origin, and the browser sends
a same-origin cookie with every DICOMweb request it makes (XHR and fetch), so the viewer reaches
`/cases/{id}/dicom-web` with the reviewer's session and no token ever appears in a URL, in
OHIF's configuration or in script-readable storage. The reviewer pages' sign-in (OIDC) calls
`issue()` once it knows who signed in; `POST /session` exchanges a bearer token for the same
cookie (tools, tests, the demo).

The cookie value is a compact JWT (HS256, PyJWT, key `<data_dir>/keys/session.key`, 0600) with
`sub`, `role`, `iat`, `exp` and a random `jti`. The cookie is `HttpOnly`, `SameSite=Lax`,
`Path=/`, and `Secure` when the public base URL is https. Sessions are honoured for safe methods
only (GET/HEAD, see `api/deps.get_reader`), so a cross-site form cannot use one to change
anything; pages that post forms add their own CSRF token.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from starlette.responses import Response

from fhir_gateway.errors import AuthError, ForbiddenError
from fhir_gateway.security.access import Principal
from fhir_gateway.security.auth import SESSION_KEY_FILE, VerifiedCache, session_key
from fhir_gateway.settings import Settings

COOKIE = "fg_session"
ISSUER = "urn:fhir-gateway:session"
AUDIENCE = "fhir-gateway-browser"
SESSION_ROLES = ("reviewer", "admin")  # partners' systems never get a browser session
# Cookies already verified, until they expire, per version of the key file (a replaced key
# refuses every cookie signed with the old one at once, as before).
_VERIFIED = VerifiedCache()


@dataclass(frozen=True)
class CookieSpec:
    """What `Response.set_cookie` needs."""

    value: str
    max_age: int
    secure: bool
    name: str = COOKIE
    httponly: bool = True
    samesite: str = "lax"
    path: str = "/"


def open_on(response: Response, settings: Settings, who: Principal) -> None:
    """Issue a session for `who` (`issue`) and set it as a cookie on `response`."""
    spec = issue(
        settings.data_dir,
        who,
        lifetime_s=settings.viewer.session_lifetime_s,
        secure=settings.base_url.startswith("https://"),
    )
    response.set_cookie(
        spec.name,
        spec.value,
        max_age=spec.max_age,
        path=spec.path,
        secure=spec.secure,
        httponly=spec.httponly,
        samesite="lax",
    )


def issue(data_dir: Path, who: Principal, *, lifetime_s: int, secure: bool) -> CookieSpec:
    """A session cookie for `who` (a reviewer or an admin).

    Raises:
        ForbiddenError: the caller's role may not hold a browser session.
    """
    if who.role not in SESSION_ROLES:
        raise ForbiddenError(f"role {who.role!r} may not open a browser session")
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": who.sub,
        "role": who.role,
        "iat": now,
        "exp": now + lifetime_s,
        "jti": secrets.token_hex(12),
    }
    token = jwt.encode(claims, session_key(data_dir), algorithm="HS256")
    return CookieSpec(value=token, max_age=lifetime_s, secure=secure)


def _cache_key(data_dir: Path, value: str) -> str | None:
    try:
        st = (data_dir / SESSION_KEY_FILE).stat()
    except OSError:
        return None
    return f"{data_dir}\0{st.st_ino}:{st.st_mtime_ns}:{st.st_size}\0{value}"


def cached(data_dir: Path, value: str) -> Principal | None:
    """The caller of a cookie `read` accepted before and not yet expired, else None."""
    key = _cache_key(data_dir, value)
    who: Principal | None = _VERIFIED.get(key) if key is not None else None
    return who


def read(data_dir: Path, value: str) -> Principal:
    """The signed-in caller of a session cookie (remembered until it expires: `cached`).

    Raises:
        AuthError: forged, expired or malformed cookie (the reason names no cookie content).
    """
    who = cached(data_dir, value)
    if who is not None:
        return who
    key = _cache_key(data_dir, value)
    try:
        claims = jwt.decode(
            value,
            session_key(data_dir),
            algorithms=["HS256"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "sub", "iss", "aud", "iat"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("session has expired; sign in again") from exc
    except jwt.PyJWTError as exc:
        raise AuthError(f"session cookie rejected: {type(exc).__name__}") from exc
    role = claims.get("role")
    if role not in SESSION_ROLES or not isinstance(claims.get("sub"), str):
        raise AuthError("session cookie names no reviewer or admin")
    who = Principal(sub=claims["sub"], role=role)
    if key is not None:
        _VERIFIED.put(key, float(claims["exp"]), who)
    return who
