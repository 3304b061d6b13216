"""SMART Backend Services client (SMART App Launch 2.2.0): discovery, JWT assertion, tokens.

STANDARDS.md §4.1 (SM-01..SM-14). Also the key helpers behind `fhir-gateway keys new` and the
public JWKS the service serves at `/.well-known/jwks.json` (SM-04).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urljoin

import jwt
import requests
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from connectors._http import Http, origin
from fhir_gateway.errors import (
    ConfigError,
    TokenError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)

log = structlog.get_logger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300  # SM-07: exp no more than 5 minutes in the future
RENEW_MARGIN_S = 60.0  # SM-10 [D]: renew when less than 60 s remain

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KeyKind = Literal["RSA", "EC"]


# --- discovery (SM-01..SM-03) -------------------------------------------------------------


@dataclass(frozen=True)
class SmartConfiguration:
    """The parts of `.well-known/smart-configuration` a backend-services client needs."""

    token_endpoint: str
    grant_types_supported: tuple[str, ...]
    capabilities: frozenset[str]
    signing_algs: tuple[str, ...]
    auth_methods: tuple[str, ...]
    scopes_supported: tuple[str, ...]

    @classmethod
    def from_json(cls, doc: Any, base_url: str) -> SmartConfiguration:
        """Parse the discovery document; a relative `token_endpoint` is resolved against base.

        Raises:
            UpstreamRejectedError: not a JSON object, no token_endpoint, or no client_credentials.
        """
        if not isinstance(doc, dict) or not isinstance(doc.get("token_endpoint"), str):
            raise UpstreamRejectedError(
                "SMART configuration has no token_endpoint", system="smart", url=base_url
            )
        grants = tuple(_strings(doc.get("grant_types_supported")))
        if grants and "client_credentials" not in grants:
            raise UpstreamRejectedError(
                "SMART configuration does not offer the client_credentials grant",
                system="smart",
                url=base_url,
            )
        return cls(
            token_endpoint=urljoin(base_url.rstrip("/") + "/", doc["token_endpoint"]),
            grant_types_supported=grants,
            capabilities=frozenset(_strings(doc.get("capabilities"))),
            signing_algs=tuple(
                _strings(doc.get("token_endpoint_auth_signing_alg_values_supported"))
            ),
            auth_methods=tuple(_strings(doc.get("token_endpoint_auth_methods_supported"))),
            scopes_supported=tuple(_strings(doc.get("scopes_supported"))),
        )


def smart_configuration_url(base_url: str) -> str:
    """SM-01: the path is appended to the FHIR base even when the base has a path."""
    return base_url.rstrip("/") + "/.well-known/smart-configuration"


def discover(http: Http, base_url: str) -> SmartConfiguration:
    """GET and parse `[base]/.well-known/smart-configuration` (JSON whatever the Accept)."""
    response = http.request(
        "GET", smart_configuration_url(base_url), headers={"Accept": "application/json"}
    )
    try:
        doc = response.json()
    except ValueError as exc:
        raise UpstreamRejectedError(
            "SMART configuration is not JSON", system=http.system, url=response.url
        ) from exc
    return SmartConfiguration.from_json(doc, base_url)


def build_scopes(
    resource_types: Iterable[str], capabilities: Iterable[str], access: str = "rs"
) -> str:
    """SM-13: `system/<Type>.rs` (permission-v2) or `system/<Type>.read` (permission-v1 only).

    `access` uses v2 letters in `cruds` order; v1 can only say `read` (r, s) and `write` (c, u, d).
    """
    caps = set(capabilities)
    letters = "".join(ch for ch in "cruds" if ch in access)
    if "permission-v2" in caps or "permission-v1" not in caps:
        suffixes = [letters]
    else:
        suffixes = []
        if set(letters) & set("rs"):
            suffixes.append("read")
        if set(letters) & set("cud"):
            suffixes.append("write")
    return " ".join(f"system/{t}.{s}" for t in dict.fromkeys(resource_types) for s in suffixes)


# --- keys and assertions (SM-04..SM-07) ---------------------------------------------------


def generate_private_key(kind: KeyKind = "RSA") -> PrivateKey:
    """A new RSA-3072 (RS384) or EC P-384 (ES384) private key."""
    if kind == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ec.generate_private_key(ec.SECP384R1())


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, kind: KeyKind = "RSA") -> PrivateKey:
    """Generate a key and write it as PEM readable by the owner only (mode 0600)."""
    key = generate_private_key(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_key_pem(key))
    return key


def load_private_key(path: Path) -> PrivateKey:
    """Read a PEM private key (RSA or EC).

    Raises:
        ConfigError: unreadable, or not an RSA/EC private key.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read private key {path.name}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path.name} is neither an RSA nor an EC private key")
    return key


def public_jwk(key: PrivateKey, kid: str | None = None) -> dict[str, Any]:
    """The public JWK of a key (SM-04: kty, kid, n/e or crv/x/y; alg and use for clarity)."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        jwk["alg"] = "RS384"
    else:
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        jwk["alg"] = "ES384"
    jwk["kid"] = kid or jwk_thumbprint(jwk)
    jwk["use"] = "sig"
    jwk.pop("key_ops", None)
    return jwk


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): a stable, unique `kid`."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def jwks(keys: Iterable[PrivateKey]) -> dict[str, Any]:
    """A JWK Set of the public halves of `keys` (never private members)."""
    return {"keys": [public_jwk(k) for k in keys]}


def choose_alg(key: PrivateKey, advertised: Iterable[str]) -> str:
    """SM-05: RS384 for RSA keys, ES384 for EC keys, if the server accepts it.

    Raises:
        ConfigError: the server advertises algorithms and ours is not among them.
    """
    alg = "RS384" if isinstance(key, rsa.RSAPrivateKey) else "ES384"
    offered = list(advertised)
    if offered and alg not in offered:
        raise ConfigError(f"server accepts {offered}, our key signs {alg}: register another key")
    return alg


def client_assertion(
    key: PrivateKey,
    *,
    client_id: str,
    token_endpoint: str,
    alg: str,
    kid: str,
    now: float,
    lifetime_s: int = MAX_ASSERTION_LIFETIME_S,
) -> str:
    """SM-06/07: a signed JWT, iss = sub = client_id, aud = token endpoint, exp <= now + 300."""
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "exp": int(now) + min(lifetime_s, MAX_ASSERTION_LIFETIME_S),
        "iat": int(now),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


# --- tokens (SM-08..SM-12) -----------------------------------------------------------------


@dataclass(frozen=True)
class AccessToken:
    value: str
    expires_at: float  # on the provider's clock
    scope: frozenset[str]
    lifetime_s: float = MAX_ASSERTION_LIFETIME_S


class SmartTokenProvider:
    """Backend-services access tokens for one FHIR server, cached and renewed before expiry.

    Thread-safe: parallel searches share one token. `invalidate()` makes the next `token()`
    fetch a new one (the FHIR client calls it once on a 401, SM-10).
    """

    def __init__(
        self,
        http: Http,
        base_url: str,
        *,
        client_id: str,
        key: PrivateKey,
        resource_types: Iterable[str],
        kid: str | None = None,
        token_endpoint: str | None = None,
        access: str = "rs",
        scopes: Iterable[str] = (),
        renew_margin_s: float = RENEW_MARGIN_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self.base_url = base_url
        self.client_id = client_id
        self._key = key
        self._kid = kid or public_jwk(key)["kid"]
        self._types = list(resource_types)
        self._token_endpoint = token_endpoint
        self._access = access
        self._scopes = " ".join(scopes)  # registered scopes; empty: built from resource_types
        self._renew_margin_s = renew_margin_s
        self._clock = clock
        self._lock = threading.Lock()
        self._token: AccessToken | None = None
        self._config: SmartConfiguration | None = None
        self.tokens_issued = 0

    @property
    def configuration(self) -> SmartConfiguration:
        if self._config is None:
            self._config = discover(self._http, self.base_url)
        return self._config

    @property
    def granted_scope(self) -> frozenset[str]:
        return self._token.scope if self._token else frozenset()

    def token(self) -> str:
        """A valid access token (a cached one unless it is about to expire)."""
        with self._lock:
            token = self._token
            if token is None or self._expiring(token):
                token = self._token = self._fetch()
            return token.value

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def auth(self) -> SmartBearerAuth:
        """A requests auth hook sending this provider's token to its own server only."""
        return SmartBearerAuth(self, self.base_url)

    def _expiring(self, token: AccessToken) -> bool:
        # A short-lived token is renewed at half its life, not on every call.
        margin = min(self._renew_margin_s, token.lifetime_s / 2)
        return token.expires_at - self._clock() <= margin

    def _fetch(self) -> AccessToken:
        config = self.configuration
        endpoint = self._token_endpoint or config.token_endpoint
        alg = choose_alg(self._key, config.signing_algs)
        scope = self._scopes or build_scopes(self._types, config.capabilities, self._access)
        attempt, waited = 0, 0.0
        while True:
            attempt += 1
            now = self._clock()
            # Each attempt signs a new assertion: a resent one would be a replayed jti (SM-21).
            assertion = client_assertion(
                self._key,
                client_id=self.client_id,
                token_endpoint=endpoint,
                alg=alg,
                kid=self._kid,
                now=now,
            )
            try:
                response = self._http.request(
                    "POST",
                    endpoint,
                    data={
                        "grant_type": "client_credentials",
                        "scope": scope,
                        "client_assertion_type": CLIENT_ASSERTION_TYPE,
                        "client_assertion": assertion,
                    },
                    headers={"Accept": "application/json"},
                    idempotent=False,  # retried here, with a new assertion
                    accept_status=(400, 401, 403),
                )
                break
            except UpstreamUnavailableError as exc:
                wait = self._http.retry_wait(exc, attempt, waited)
                if wait is None:
                    raise
                self._http.sleep(wait)
                waited += wait
        body = _json_object(response)
        if response.status_code >= 400 or "access_token" not in body:
            error = str(body.get("error") or "invalid_response")
            description = body.get("error_description")
            log.warning("smart.token.refused", status=response.status_code, error=error)
            raise TokenError(
                f"token endpoint refused client {self.client_id}: {error}"
                + (f" ({description})" if isinstance(description, str) else ""),
                error=error,
                description=description if isinstance(description, str) else None,
                system=self._http.system,
                url=endpoint,
                status=response.status_code,
            )
        if str(body.get("token_type", "")).lower() != "bearer":
            raise TokenError(
                f"token endpoint issued token_type {body.get('token_type')!r}, not bearer",
                error="unsupported_token_type",
                system=self._http.system,
                url=endpoint,
                status=response.status_code,
            )
        expires_in = float(body.get("expires_in") or MAX_ASSERTION_LIFETIME_S)
        granted = frozenset(str(body.get("scope") or scope).split())
        self.tokens_issued += 1
        log.info("smart.token.issued", expires_in=expires_in, scopes=len(granted))
        return AccessToken(str(body["access_token"]), now + expires_in, granted, expires_in)


class _HasToken(Protocol):
    def token(self) -> str: ...


class SmartBearerAuth(requests.auth.AuthBase):
    """SM-12: adds `Authorization: Bearer` only for requests to the token's own origin.

    A request to any other origin goes out without it (and without any Authorization header
    a caller may have set), so a resource naming a foreign server never receives our token.
    """

    def __init__(self, provider: _HasToken, base_url: str) -> None:
        self._provider = provider
        self._origin = origin(base_url)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if origin(request.url or "") == self._origin:
            request.headers["Authorization"] = f"Bearer {self._provider.token()}"
        else:
            request.headers.pop("Authorization", None)
            log.warning("smart.token.withheld", reason="foreign_origin")
        return request


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
