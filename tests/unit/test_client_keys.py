"""Key helpers behind `fhir-gateway keys new` and `/.well-known/jwks.json` (SM-04)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fhir_gateway.errors import ConfigError
from fhir_gateway.security.client_keys import new_key, published_jwks
from fhir_gateway.settings import load_partners
from tests.conftest import partner_toml


def partners(kid_a: str, kid_b: str) -> str:
    return partner_toml(
        "a", "http://127.0.0.1:1/fhir", "keys/a.pem", kid_a, destination=True
    ) + partner_toml("b", "http://127.0.0.1:2/fhir", "keys/b.pem", kid_b)


def test_new_key_is_private_to_owner_and_never_overwritten(tmp_path: Path):
    jwk = new_key(tmp_path / "keys" / "a.pem", "RSA", kid="k1")
    assert jwk["kid"] == "k1"
    assert jwk["kty"] == "RSA"
    assert "d" not in jwk
    assert stat.S_IMODE((tmp_path / "keys" / "a.pem").stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        new_key(tmp_path / "keys" / "a.pem")


def test_published_jwks_has_each_partner_key_once_with_its_kid(tmp_path: Path):
    new_key(tmp_path / "keys" / "a.pem", "EC")
    new_key(tmp_path / "keys" / "b.pem", "RSA")
    path = tmp_path / "partners.toml"
    path.write_text(partners("gw-a", "gw-b"))
    keys = published_jwks(load_partners(path))["keys"]
    assert [(k["kid"], k["kty"]) for k in keys] == [("gw-a", "EC"), ("gw-b", "RSA")]
    assert all(not {"d", "p", "q"} & set(k) for k in keys)
    path.write_text(partners("same", "same"))
    with pytest.raises(ConfigError, match="two different keys"):
        published_jwks(load_partners(path))
