"""Bearer JWTs for callers: the embedded dev issuer (HS256, key in the data dir) and, for
production, an external issuer validated against its JWKS.

Roles: `ehr` (partner systems pushing referrals; the token names its partner), `reviewer`,
`admin`. The dev key is generated on first use with mode 0600 and never logged.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import jwt
from cachetools import TLRUCache

from fhir_gateway.errors import AuthError, ConfigError
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import AuthSettings

ROLES = ("ehr", "reviewer", "admin")
DEV_ISSUER = "urn:fhir-gateway:dev-issuer"
DEV_KEY_FILE = Path("keys") / "dev-jwt.key"
SMART_ISSUER = "urn:fhir-gateway:smart"  # access tokens our token endpoint issues to partners
SMART_KEY_FILE = Path("keys") / "access-token.key"
SESSION_KEY_FILE = Path("keys") / "session.key"  # the viewer's session cookie (JWT)
WEB_SESSION_KEY_FILE = Path("keys") / "web-session.key"  # the workspace's signed cookie
SMART_CLAIMS = ["exp", "sub", "iss", "aud", "scope", "partner"]
# A verified token is remembered (by its exact text) until it expires, but at most this long:
# the issuer's key set is re-read about as often (PyJWKClient's own cache lifespan).
VERIFIED_MAX_AGE_S = 300
VERIFIED_MAX_TOKENS = 4096


class VerifiedCache:
    """Tokens already verified, each with what it verified to, until its `exp` (and at most
    `max_age_s`): a viewer sends the same token with every request, and verifying it again
    costs more than the rest of a small DICOMweb answer. Only successes are kept; an expired
    entry is never returned (time-to-use per entry: cachetools' `TLRUCache`). Thread-safe."""

    def __init__(self, maxsize: int = VERIFIED_MAX_TOKENS, max_age_s: float = VERIFIED_MAX_AGE_S):
        self._max_age_s = max_age_s
        self._cache: TLRUCache[str, tuple[float, Any]] = TLRUCache(
            maxsize, self._until, timer=time.time
        )
        self._lock = threading.Lock()

    def _until(self, _key: str, value: tuple[float, Any], now: float) -> float:
        return min(value[0], now + self._max_age_s)

    def get(self, token: str) -> Any | None:
        with self._lock:
            found = self._cache.get(token)
        # TLRUCache drops entries when their time is up; checked again here at the second.
        return found[1] if found is not None and time.time() < found[0] else None

    def put(self, token: str, exp: float, value: Any) -> None:
        if exp > time.time():
            with self._lock:
                self._cache[token] = (exp, value)


def dev_key(data_dir: Path) -> bytes:
    """The dev issuer's HS256 key, created (0600) on first use."""
    return _secret_key(data_dir / DEV_KEY_FILE)


def smart_key(data_dir: Path) -> bytes:
    """The key our token endpoint signs partners' access tokens with (HS256, 0600)."""
    return _secret_key(data_dir / SMART_KEY_FILE)


def session_key(data_dir: Path) -> bytes:
    """The key browser session cookies are signed with (HS256, 0600; `security.sessions`)."""
    return _secret_key(data_dir / SESSION_KEY_FILE)


def issue_access_token(
    data_dir: Path,
    *,
    client_id: str,
    partner_id: str,
    scopes: list[str],
    lifetime_s: int,
    audience: str,
) -> str:
    """A short-lived access token for a partner's backend client (SM-22; no refresh token)."""
    now = int(time.time())
    claims = {
        "iss": SMART_ISSUER,
        "sub": client_id,
        "aud": audience,
        "role": "ehr",
        "partner": partner_id,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + lifetime_s,
        "jti": secrets.token_hex(12),
    }
    return jwt.encode(claims, smart_key(data_dir), algorithm="HS256")


def web_session_key(data_dir: Path) -> str:
    """The key the workspace signs its session cookies with (0600, created on first use)."""
    return _secret_key(data_dir / WEB_SESSION_KEY_FILE).decode()


def _secret_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            time.sleep(0.05)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def mint_dev_token(
    data_dir: Path,
    *,
    role: str,
    sub: str,
    partner: str | None = None,
    ttl_s: int = 3600,
    audience: str = "fhir-gateway",
) -> str:
    """A token from the embedded dev issuer (for the demo, tests and local use)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    if role == "ehr" and not partner:
        raise ConfigError("an ehr token must name its partner (--partner)")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": DEV_ISSUER,
        "sub": sub,
        "aud": audience,
        "role": role,
        "iat": now,
        "exp": now + ttl_s,
        "jti": secrets.token_hex(8),
    }
    if partner:
        claims["partner"] = partner
    return jwt.encode(claims, dev_key(data_dir), algorithm="HS256")


class TokenValidator:
    """Validates bearer tokens into a `Principal`."""

    def __init__(self, cfg: AuthSettings, data_dir: Path) -> None:
        self.cfg = cfg
        self._dev_key = dev_key(data_dir) if cfg.dev_issuer else None
        self._smart_key = smart_key(data_dir)
        self._jwks = jwt.PyJWKClient(cfg.jwks_url, cache_keys=True) if cfg.jwks_url else None
        if cfg.jwks_url and not cfg.issuer:
            raise ConfigError("auth.jwks_url needs auth.issuer")
        self._verified = VerifiedCache()

    def cached(self, token: str) -> Principal | None:
        """The caller of a token verified before and not yet expired, else None (no I/O: the
        event loop may ask)."""
        who: Principal | None = self._verified.get(token)
        return who

    @property
    def may_block(self) -> bool:
        """Whether `validate` may fetch over the network (an external issuer's JWKS)."""
        return self._jwks is not None

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 view of a token: `{"active": false}` for any token we would refuse."""
        try:
            who = self.validate(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except AuthError:
            return {"active": False}
        out: dict[str, Any] = {
            "active": True,
            "sub": who.sub,
            "exp": claims.get("exp"),
            "iss": claims.get("iss"),
            "token_type": "bearer",
            "role": who.role,
        }
        if who.scopes is not None:
            out["scope"] = " ".join(sorted(who.scopes))
            out["client_id"] = who.sub
        if who.partner_id:
            out["partner"] = who.partner_id
        return out

    def validate(self, token: str) -> Principal:
        """Raises AuthError (401) for any bad token; the reason names no token content.

        A token verified before is answered from `cached` until its `exp`."""
        who = self.cached(token)
        if who is not None:
            return who
        who, exp = self._verify(token)
        self._verified.put(token, exp, who)
        return who

    def _verify(self, token: str) -> tuple[Principal, float]:
        """The caller and the token's expiry (every accepted token has a required `exp`)."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError("bearer token is not a JWT") from exc
        issuer = unverified.get("iss")
        try:
            if issuer == SMART_ISSUER:
                claims = jwt.decode(
                    token,
                    self._smart_key,
                    algorithms=["HS256"],
                    audience=self.cfg.audience,
                    issuer=SMART_ISSUER,
                    options={"require": ["exp", "sub", "iss", "aud", "scope", "partner"]},
                )
                return Principal(
                    sub=claims["sub"],
                    role="ehr",
                    partner_id=claims["partner"],
                    scopes=frozenset(str(claims["scope"]).split()),
                ), float(claims["exp"])
            if issuer == DEV_ISSUER and self._dev_key is not None:
                if header.get("alg") != "HS256":
                    raise AuthError("dev tokens are HS256")
                claims = jwt.decode(
                    token,
                    self._dev_key,
                    algorithms=["HS256"],
                    audience=self.cfg.audience,
                    issuer=DEV_ISSUER,
                    options={"require": ["exp", "sub", "iss", "aud"]},
                )
            elif self._jwks is not None and issuer == self.cfg.issuer:
                key = self._jwks.get_signing_key_from_jwt(token)
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=["RS256", "RS384", "ES256", "ES384", "PS256"],
                    audience=self.cfg.audience,
                    issuer=self.cfg.issuer,
                    options={"require": ["exp", "sub", "iss"]},
                )
            else:
                raise AuthError("token issuer is not trusted")
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("bearer token has expired") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"bearer token rejected: {type(exc).__name__}") from exc
        role = claims.get(self.cfg.role_claim)
        if isinstance(role, list):
            role = next((r for r in ("admin", "reviewer", "ehr") if r in role), None)
        if role not in ROLES:
            raise AuthError("token carries no known role")
        sub = claims.get(self.cfg.subject_claim)
        if not isinstance(sub, str) or not sub:
            raise AuthError("token carries no subject")
        partner = claims.get(self.cfg.partner_claim)
        if role == "ehr" and not isinstance(partner, str):
            raise AuthError("ehr token names no partner")
        who = Principal(sub=sub, role=role, partner_id=partner if role == "ehr" else None)
        return who, float(claims["exp"])
