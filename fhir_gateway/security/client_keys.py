"""Our SMART client keys: `fhir-gateway keys new` and the JWK Set at `/.well-known/jwks.json`.

Partners register the published JWK Set URL (SMART App Launch 2.2, SM-04); the `kid` of each key
is the one configured for the partner, which is what our client assertions carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from connectors.smart import KeyKind, load_private_key, public_jwk, write_private_key
from fhir_gateway.errors import ConfigError
from fhir_gateway.settings import PartnersFile, SmartAuth

log = structlog.get_logger(__name__)
JWKS_CACHE_CONTROL = "public, max-age=3600"  # SM-04: the client SHOULD send Cache-Control


def new_key(path: Path, kind: KeyKind = "EC", kid: str | None = None) -> dict[str, Any]:
    """Write a new private key (PEM, mode 0600; never overwrites) and return its public JWK.

    Raises:
        ConfigError: the file exists already.
    """
    try:
        key = write_private_key(path, kind)
    except FileExistsError as exc:
        raise ConfigError(f"{path} exists; refusing to overwrite a key") from exc
    return public_jwk(key, kid)


def published_jwks(partners: PartnersFile) -> dict[str, Any]:
    """The public JWK Set of every SMART key named in the partners file (one per kid).

    Raises:
        ConfigError: one kid names two different keys. An unreadable key file is logged and
        left out.
    """
    keys: dict[str, dict[str, Any]] = {}
    for partner in partners.partners:
        for endpoint in (partner.fhir, partner.dicomweb, partner.destination):
            auth = endpoint.auth if endpoint is not None else None
            if not isinstance(auth, SmartAuth):
                continue
            try:
                jwk = public_jwk(load_private_key(auth.key_file), auth.kid)
            except ConfigError:
                # One partner's missing key must not hide the others' (the operator is told).
                log.warning("jwks.key.unreadable", partner=partner.id, kid=auth.kid)
                continue
            if keys.setdefault(auth.kid, jwk) != jwk:
                raise ConfigError(f"kid {auth.kid} names two different keys")
    return {"keys": list(keys.values())}
