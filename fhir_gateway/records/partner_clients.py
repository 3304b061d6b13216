"""HTTP sessions and token providers for a partner's endpoints, built from the partners file.

One code path for every outside system we call on a partner's behalf: the FHIR pull, the
imaging pull and report delivery. `basic` auth goes on the session; `bearer` and `smart` give a
token provider (`token()`, `invalidate()` on a 401, `auth()` for requests).

SMART providers are cached per (endpoint, client, key, scopes) for the life of the process, so
a worker reuses a token across jobs until it nears expiry instead of asking for one per job
(SM-10); `invalidate()` on a 401 makes the next caller fetch a new one.
"""

from __future__ import annotations

import threading

import requests

from connectors._http import Http, RetryPolicy
from connectors.smart import SmartBearerAuth, SmartTokenProvider, discover, load_private_key
from fhir_gateway.errors import GatewayError
from fhir_gateway.settings import (
    BasicAuth,
    BearerAuth,
    DicomwebEndpoint,
    DimseEndpoint,
    FhirEndpoint,
    SmartAuth,
)

Endpoint = FhirEndpoint | DimseEndpoint


class BearerTokenProvider:
    """A static bearer token from a file or an environment variable (partner auth `bearer`).

    `invalidate()` (after a 401) re-reads it: the file or variable may have been rotated.
    """

    def __init__(self, auth: BearerAuth, base_url: str) -> None:
        self._auth = auth
        self.base_url = base_url
        self._token: str | None = None

    def token(self) -> str:
        if self._token is None:
            self._token = self._auth.token().get_secret_value()
        return self._token

    def invalidate(self) -> None:
        self._token = None

    def auth(self) -> SmartBearerAuth:
        return SmartBearerAuth(self, self.base_url)


TokenProvider = SmartTokenProvider | BearerTokenProvider

_SMART_CACHE: dict[tuple[str, ...], SmartTokenProvider] = {}
_CACHE_LOCK = threading.Lock()


def base_url_of(endpoint: Endpoint) -> str:
    return endpoint.orthanc_url if isinstance(endpoint, DimseEndpoint) else endpoint.base_url


def session_for(endpoint: Endpoint) -> requests.Session:
    """A new session for the endpoint; `basic` credentials are set on it."""
    session = requests.Session()
    auth = endpoint.auth
    if isinstance(auth, BasicAuth):
        session.auth = (auth.username, auth.password().get_secret_value())
    return session


def token_provider_for(
    endpoint: Endpoint,
    *,
    resource_types: tuple[str, ...],
    access: str = "rs",
    system: str = "smart",
) -> TokenProvider | None:
    """Bearer tokens for the endpoint (None for `none`/`basic`).

    SMART: scopes are the registered ones from the partners file, else `system/<Type>.<access>`
    for `resource_types`; the token endpoint is discovered unless `token_url` is set.

    Raises:
        ConfigError: the key file cannot be read, or the bearer token is missing.
    """
    auth = endpoint.auth
    base_url = base_url_of(endpoint)
    if isinstance(auth, BearerAuth):
        return BearerTokenProvider(auth, base_url)
    if not isinstance(auth, SmartAuth):
        return None
    key = (
        base_url,
        auth.client_id,
        auth.kid,
        str(auth.key_file),
        auth.token_url or "",
        " ".join(auth.scopes),
        " ".join(resource_types),
        access,
    )
    with _CACHE_LOCK:
        provider = _SMART_CACHE.get(key)
        if provider is None:
            timeout = endpoint.timeout_s if isinstance(endpoint, FhirEndpoint) else 30.0
            provider = SmartTokenProvider(
                Http(requests.Session(), system=system, timeout_s=timeout),
                base_url,
                client_id=auth.client_id,
                key=load_private_key(auth.key_file),
                kid=auth.kid,
                token_endpoint=auth.token_url,
                resource_types=resource_types,
                access=access,
                scopes=auth.scopes,
            )
            _SMART_CACHE[key] = provider
        return provider


def clear_token_cache() -> None:
    """Forget cached SMART providers (after a partners-file reload; tests)."""
    with _CACHE_LOCK:
        _SMART_CACHE.clear()


def probe_endpoint(
    endpoint: Endpoint,
    *,
    resource_types: tuple[str, ...],
    access: str = "rs",
    system: str = "probe",
    timeout_s: float = 10.0,
) -> list[str]:
    """Try the endpoint once, as `fhir-gateway partners check --probe` does: for SMART its
    discovery document and a token request with the scopes the jobs would ask for; for other
    auth a `GET [base]/metadata` (FHIR endpoints; DICOMweb and DIMSE without SMART are not
    probed). Returns the problems, one line each.

    One attempt, a short timeout, nothing cached: an operator is waiting for the answer.
    """
    base_url = base_url_of(endpoint)
    http = Http(
        requests.Session(), system=system, timeout_s=timeout_s, retry=RetryPolicy(max_attempts=1)
    )
    auth = endpoint.auth
    try:
        if isinstance(auth, SmartAuth):
            if auth.token_url is None:
                discover(http, base_url)
            SmartTokenProvider(
                http,
                base_url,
                client_id=auth.client_id,
                key=load_private_key(auth.key_file),
                kid=auth.kid,
                token_endpoint=auth.token_url,
                resource_types=resource_types,
                access=access,
                scopes=auth.scopes,
            ).token()
        elif isinstance(endpoint, FhirEndpoint) and not isinstance(endpoint, DicomwebEndpoint):
            if isinstance(auth, BasicAuth):
                http.session.auth = (auth.username, auth.password().get_secret_value())
            headers = {"Accept": "application/fhir+json"}
            if isinstance(auth, BearerAuth):
                headers["Authorization"] = f"Bearer {auth.token().get_secret_value()}"
            http.request("GET", f"{base_url}/metadata", headers=headers)
    except GatewayError as exc:
        return [exc.message]
    finally:
        http.session.close()
    return []
