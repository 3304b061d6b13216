"""Settings, the partners file, and token validation (dev issuer and an external JWKS issuer)."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fhir_gateway.errors import AuthError, ConfigError
from fhir_gateway.security.auth import TokenValidator, dev_key, mint_dev_token
from fhir_gateway.settings import AuthSettings, BearerAuth, Settings, SmartAuth, load_partners
from tests.conftest import FIXTURES


def test_example_partners_file_loads() -> None:
    partners = load_partners(FIXTURES / "partners" / "partners.toml")
    st = partners.by_identifier("urn:oid:2.16.840.1.113883.3.9999", "st-elsewhere")
    assert st is not None
    assert st.id == "st-elsewhere"
    assert st.fhir is not None
    assert isinstance(st.fhir.auth, SmartAuth)
    assert st.fhir.auth.key_file == FIXTURES / "partners" / "keys" / "st-elsewhere.pem"
    assert st.dicomweb is not None
    assert st.destination is not None
    mercy = partners.by_id("mercy-north")
    assert mercy is not None
    assert mercy.fhir is not None
    assert mercy.fhir.base_url.endswith("/fhir/R4")
    assert partners.by_identifier("urn:oid:2.16.840.1.113883.3.9999", "nobody") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[partners]\nid=", "not valid TOML"),
        ('[[partners]]\nid = "a"\nname = "A"\n', "identifier"),
        (
            '[[partners]]\nid = "a"\nname = "A"\nidentifier = {system="s", value="v"}\n'
            '[partners.fhir]\nbase_url = "x"\nauth = {type = "bearer", token = "inline!"}\n',
            "partners.0.fhir.auth",
        ),
        (
            '[[partners]]\nid = "a b"\nname = "A"\nidentifier = {system="s", value="v"}\n',
            "partners.0.id",
        ),
    ],
)
def test_bad_partners_file_is_a_one_line_config_error(tmp_path, text, message) -> None:
    path = tmp_path / "partners.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_partners(path)
    assert message in str(exc.value)
    assert "inline!" not in str(exc.value)  # secrets are not echoed


def test_secrets_come_from_file_or_env(tmp_path, monkeypatch) -> None:
    (tmp_path / "tok").write_text("s3cret\n")
    assert BearerAuth(type="bearer", token_file=tmp_path / "tok").token().get_secret_value() == (
        "s3cret"
    )
    monkeypatch.setenv("MY_TOKEN", "from-env")
    auth = BearerAuth(type="bearer", token_env="MY_TOKEN")
    assert auth.token().get_secret_value() == "from-env"
    assert "from-env" not in repr(auth.token())
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(ConfigError, match="MY_TOKEN"):
        auth.token()


def test_settings_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FHIR_GATEWAY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FHIR_GATEWAY_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("FHIR_GATEWAY_JOBS__LEASE_S", "7")
    monkeypatch.setenv("FHIR_GATEWAY_AUTH__DEV_ISSUER", "false")
    s = Settings()
    assert (s.data_dir, s.db_url, s.jobs.lease_s, s.auth.dev_issuer) == (
        tmp_path,
        "postgresql+psycopg://u@h/db",
        7,
        False,
    )
    assert Settings(data_dir=tmp_path).partners.partners == []  # no partners file: none


def test_dev_key_is_private(tmp_path) -> None:
    dev_key(tmp_path)
    mode = (tmp_path / "keys" / "dev-jwt.key").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_dev_tokens_roundtrip_and_rules(tmp_path) -> None:
    v = TokenValidator(AuthSettings(), tmp_path)
    who = v.validate(mint_dev_token(tmp_path, role="ehr", sub="epic", partner="st-elsewhere"))
    assert (who.sub, who.role, who.partner_id) == ("epic", "ehr", "st-elsewhere")
    who = v.validate(mint_dev_token(tmp_path, role="reviewer", sub="alice"))
    assert (who.role, who.partner_id) == ("reviewer", None)
    with pytest.raises(ConfigError):
        mint_dev_token(tmp_path, role="ehr", sub="x")  # ehr tokens name a partner
    with pytest.raises(ConfigError):
        mint_dev_token(tmp_path, role="root", sub="x")
    with pytest.raises(AuthError, match="expired"):
        v.validate(mint_dev_token(tmp_path, role="admin", sub="x", ttl_s=-5))
    forged = jwt.encode(
        {
            "iss": "urn:fhir-gateway:dev-issuer",
            "sub": "x",
            "aud": "fhir-gateway",
            "role": "admin",
            "exp": int(time.time()) + 60,
        },
        b"0" * 32,
        algorithm="HS256",
    )
    with pytest.raises(AuthError):
        v.validate(forged)
    none_alg = jwt.encode(
        {
            "iss": "urn:fhir-gateway:dev-issuer",
            "sub": "x",
            "role": "admin",
            "aud": "fhir-gateway",
            "exp": int(time.time()) + 60,
        },
        "",
        algorithm="none",
    )
    with pytest.raises(AuthError):
        v.validate(none_alg)
    off = TokenValidator(AuthSettings(dev_issuer=False), tmp_path)
    with pytest.raises(AuthError, match="not trusted"):
        off.validate(mint_dev_token(tmp_path, role="admin", sub="x"))


def test_external_issuer_via_jwks(httpserver, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="idp-1", use="sig", alg="RS256")
    httpserver.expect_request("/jwks").respond_with_json({"keys": [jwk]})
    cfg = AuthSettings(
        dev_issuer=False,
        issuer="https://idp.example",
        audience="gw",
        jwks_url=httpserver.url_for("/jwks"),
        role_claim="roles",
        subject_claim="preferred_username",
    )
    v = TokenValidator(cfg, tmp_path)
    claims = {
        "iss": "https://idp.example",
        "aud": "gw",
        "sub": "u-1",
        "preferred_username": "dr.who",
        "roles": ["staff", "reviewer"],
        "exp": int(time.time()) + 60,
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "idp-1"})
    who = v.validate(token)
    assert (who.sub, who.role) == ("dr.who", "reviewer")
    with pytest.raises(AuthError):
        v.validate(
            jwt.encode({**claims, "aud": "other"}, key, algorithm="RS256", headers={"kid": "idp-1"})
        )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthError):
        v.validate(jwt.encode(claims, other, algorithm="RS256", headers={"kid": "idp-1"}))
