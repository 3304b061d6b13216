"""SMART Backend Services as a server (SMART App Launch 2.2; STANDARDS SM-20..SM-23): client
assertion checks, jti replay cache, JWKS cache and v1/v2 system scopes.

Shared by the gateway's own token endpoint (partners authenticating to us) and the sandbox EHR,
so both enforce the same rules: RFC 7523 claims, `aud` = the token URL, `exp` at most 5 minutes
ahead, a `jti` never seen before for that client, exactly one registered key matching
`kid` + `kty` of an accepted `alg` (RS384, ES384). Every failure is `invalid_client`.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import jwt
import requests
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from fhir_gateway.store import Store
from fhir_gateway.store.models import SmartJti, utcnow

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALG_KTY = {"RS384": "RSA", "ES384": "EC"}
V1_LETTERS = {"read": "rs", "write": "cud", "*": "cruds"}
MAX_ASSERTION_LIFETIME_S = 300
CLOCK_SKEW_S = 5


class OAuthError(Exception):
    """An OAuth 2.0 error response (RFC 6749 §5.2): `error` code, description, HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True)
class RegisteredClient:
    """A backend client: its keys (inline JWKS or a JWKS URL) and pre-authorised scopes."""

    client_id: str
    jwks: Mapping[str, Any] | None = None
    jwks_url: str | None = None
    scopes: tuple[str, ...] = ()
    partner_id: str | None = None


class ReplayGuard(Protocol):
    def check_and_add(self, client_id: str, jti: str, exp: float, now: float) -> bool:
        """False when (client, jti) was seen before and has not expired."""
        ...


class DbReplayCache:
    """jti values seen per client in the database (SM-21): one row per (client, jti) under a
    primary key, inserted or refused in one transaction, so every process on the database
    shares it, it survives a restart, and of two concurrent uses of one assertion exactly one
    wins. Expired rows are purged on the way."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def check_and_add(self, client_id: str, jti: str, exp: float, now: float) -> bool:
        digest = hashlib.sha256(jti.encode("utf-8")).hexdigest()
        expires = datetime.fromtimestamp(exp, UTC)
        try:
            with self._store.session() as s:
                s.execute(delete(SmartJti).where(SmartJti.expires_at <= utcnow()))
                s.add(SmartJti(client_id=client_id, jti_sha256=digest, expires_at=expires))
                s.flush()
        except IntegrityError:
            return False
        return True


@dataclass
class ReplayCache:
    """jti values seen per client until their assertion expires (SM-21), in this process only
    (the sandbox EHR's; the gateway uses `DbReplayCache`)."""

    _seen: dict[tuple[str, str], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check_and_add(self, client_id: str, jti: str, exp: float, now: float) -> bool:
        """False when (client, jti) was seen before and has not expired."""
        with self._lock:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
            if (client_id, jti) in self._seen:
                return False
            self._seen[(client_id, jti)] = exp
            return True


class JwksCache:
    """JWKS fetched by URL, kept no longer than the response's Cache-Control allows (SM-21)."""

    def __init__(
        self,
        session: requests.Session | None = None,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session or requests.Session()
        self._timeout = timeout_s
        self._clock = clock
        self._cache: dict[str, tuple[float, Mapping[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, url: str) -> Mapping[str, Any]:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(url)
            if hit is not None and hit[0] > now:
                return hit[1]
        try:
            resp = self._session.get(url, timeout=self._timeout)
            resp.raise_for_status()
            jwks = resp.json()
        except (requests.RequestException, ValueError) as exc:
            raise OAuthError(
                "invalid_client", "the client's JWKS URL could not be read", 401
            ) from exc
        if not isinstance(jwks, dict):
            raise OAuthError("invalid_client", "the client's JWKS is not a JSON object", 401)
        max_age = _max_age(resp.headers.get("Cache-Control", ""))
        if max_age > 0:
            with self._lock:
                self._cache[url] = (now + max_age, jwks)
        return jwks


def _max_age(cache_control: str) -> float:
    directives = [d.strip().lower() for d in cache_control.split(",")]
    if any(d in ("no-store", "no-cache") for d in directives):
        return 0.0
    for d in directives:
        if d.startswith("max-age="):
            try:
                return max(0.0, float(d.split("=", 1)[1]))
            except ValueError:
                return 0.0
    return 0.0


def verify_client_assertion(
    form: Mapping[str, str],
    clients: Mapping[str, RegisteredClient],
    token_url: str,
    *,
    replay: ReplayGuard,
    jwks_cache: JwksCache | None = None,
    algs: Iterable[str] = ("RS384", "ES384"),
    now: float | None = None,
) -> RegisteredClient:
    """Check a `client_credentials` token request with a `private_key_jwt` assertion.

    Raises:
        OAuthError: `unsupported_grant_type`, `invalid_request` or `invalid_client`.
    """
    if form.get("grant_type") != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
    assertion = form.get("client_assertion")
    if form.get("client_assertion_type") != ASSERTION_TYPE or not assertion:
        raise OAuthError("invalid_request", "client_assertion (jwt-bearer) is required")
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise OAuthError("invalid_client", "client_assertion is not a JWT", 401) from exc
    alg, kid = header.get("alg"), header.get("kid")
    client = clients.get(str(unverified.get("iss")))
    if client is None:
        raise OAuthError("invalid_client", "unknown client", 401)
    if alg not in ALG_KTY or alg not in set(algs):
        raise OAuthError("invalid_client", f"alg {alg!r} is not accepted", 401)
    if header.get("jku") and header["jku"] != client.jwks_url:
        raise OAuthError("invalid_client", "jku does not match the registered JWKS URL", 401)
    jwks = (
        client.jwks
        if client.jwks is not None
        else ((jwks_cache or JwksCache()).get(client.jwks_url) if client.jwks_url else {})
    )
    keys = [
        k
        for k in jwks.get("keys", [])
        if isinstance(k, dict) and k.get("kid") == kid and k.get("kty") == ALG_KTY[alg]
    ]
    if len(keys) != 1:
        raise OAuthError(
            "invalid_client",
            f"{len(keys)} registered keys match kid {kid!r}; exactly one must",
            401,
        )
    try:
        claims = jwt.decode(
            assertion,
            jwt.PyJWK(keys[0], algorithm=alg).key,
            algorithms=[alg],
            audience=token_url,
            issuer=client.client_id,
            leeway=CLOCK_SKEW_S,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
    except jwt.PyJWTError as exc:
        raise OAuthError(
            "invalid_client", f"client_assertion rejected: {type(exc).__name__}", 401
        ) from exc
    now = time.time() if now is None else now
    if claims["sub"] != client.client_id:
        raise OAuthError("invalid_client", "sub must equal iss (the client_id)", 401)
    if float(claims["exp"]) - now > MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S:
        raise OAuthError("invalid_client", "exp is more than 5 minutes ahead", 401)
    if not replay.check_and_add(client.client_id, str(claims["jti"]), float(claims["exp"]), now):
        raise OAuthError("invalid_client", "jti was used before (replay)", 401)
    return client


class RateLimiter:
    """Token buckets per key (a client id, an address): `burst` requests at once, refilled at
    `per_minute` a minute. In this process's memory: with several gateway processes each
    enforces its own share (documented)."""

    MAX_KEYS = 10_000

    def __init__(
        self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> float | None:
        """Spend one request of `key`: None if allowed, else the seconds until one is."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                self._prune(now)
                return None
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate if self._rate > 0 else 3600.0

    def _prune(self, now: float) -> None:
        if len(self._buckets) <= self.MAX_KEYS:
            return
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self._rate >= 1]
        for key in full:
            del self._buckets[key]


def retry_after_header(seconds: float) -> str:
    """`Retry-After` in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def parse_scope(scope: str) -> tuple[str, str] | None:
    """`system/Type.rs` (v2) or `system/Type.read` (v1) -> (Type, letters); else None."""
    if not scope.startswith("system/") or "." not in scope:
        return None
    resource_type, perm = scope[len("system/") :].split("?")[0].rsplit(".", 1)
    letters = V1_LETTERS.get(perm, perm)
    if not letters or any(ch not in "cruds" for ch in letters):
        return None
    return resource_type, letters


def scope_allowed(scope: str, allowed: Iterable[str]) -> bool:
    """Is `scope` within one of the pre-authorised `allowed` scopes?"""
    want = parse_scope(scope)
    if want is None:
        return False
    for a in allowed:
        have = parse_scope(a)
        if have and have[0] in ("*", want[0]) and set(want[1]) <= set(have[1]):
            return True
    return False


def grant(requested: str, allowed: Iterable[str]) -> list[str]:
    """The requested scopes cut down to what is pre-authorised (SM-22: granted ⊆ registered).

    A v2 request for more than is allowed is granted the allowed part
    (`system/Task.cruds` against `system/Task.rs` gives `system/Task.rs`); a v1 scope is granted
    whole or not at all.

    Raises:
        OAuthError: `invalid_scope` when nothing is.
    """
    allowed = tuple(allowed)
    granted: list[str] = []
    for scope in requested.split():
        if scope_allowed(scope, allowed):
            granted.append(scope)
            continue
        want = parse_scope(scope)
        if want is None or scope.rsplit(".", 1)[-1] in V1_LETTERS:
            continue
        letters = set()
        for a in allowed:
            have = parse_scope(a)
            if have and have[0] in ("*", want[0]):
                letters |= set(want[1]) & set(have[1])
        if letters:
            granted.append(f"system/{want[0]}.{''.join(c for c in 'cruds' if c in letters)}")
    if not granted:
        raise OAuthError("invalid_scope", "none of the requested scopes is authorised")
    return granted


def permits(scopes: Iterable[str], resource_type: str, letter: str) -> bool:
    """Does a token with `scopes` permit interaction `letter` (c, r, u, d, s) on the type?"""
    for scope in scopes:
        parsed = parse_scope(scope)
        if parsed and parsed[0] in ("*", resource_type) and letter in parsed[1]:
            return True
    return False
