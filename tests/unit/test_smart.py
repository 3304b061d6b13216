"""SMART Backend Services client: discovery, scopes, JWT assertions, token cache (SM-01..12)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
import requests
import responses

from connectors._http import Http
from connectors.smart import (
    CLIENT_ASSERTION_TYPE,
    PrivateKey,
    SmartConfiguration,
    SmartTokenProvider,
    build_scopes,
    choose_alg,
    client_assertion,
    jwks,
    load_private_key,
    public_jwk,
    smart_configuration_url,
    write_private_key,
)
from fhir_gateway.errors import ConfigError, TokenError, UpstreamRejectedError

BASE = "https://ehr.example.org/apis/fhir"
TOKEN_URL = "https://ehr.example.org/oauth2/token"
DISCOVERY = {
    "token_endpoint": TOKEN_URL,
    "grant_types_supported": ["client_credentials"],
    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
    "capabilities": ["client-confidential-asymmetric", "permission-v2"],
}


def test_sm01_discovery_url_appends_to_base_with_path():
    assert (
        smart_configuration_url("https://h/apis/fhir")
        == "https://h/apis/fhir/.well-known/smart-configuration"
    )
    assert smart_configuration_url("https://h/apis/fhir/") == smart_configuration_url(
        "https://h/apis/fhir"
    )


def test_sm02_relative_token_endpoint_resolved_against_base():
    config = SmartConfiguration.from_json({"token_endpoint": "auth/token"}, BASE)
    assert config.token_endpoint == "https://ehr.example.org/apis/fhir/auth/token"
    config = SmartConfiguration.from_json({"token_endpoint": "/oauth2/token"}, BASE)
    assert config.token_endpoint == TOKEN_URL


def test_sm02_missing_client_credentials_is_a_clear_error():
    with pytest.raises(UpstreamRejectedError, match="client_credentials"):
        SmartConfiguration.from_json(
            {"token_endpoint": TOKEN_URL, "grant_types_supported": ["authorization_code"]}, BASE
        )
    with pytest.raises(UpstreamRejectedError, match="token_endpoint"):
        SmartConfiguration.from_json({"issuer": BASE}, BASE)


def test_sm03_sm13_scope_builder_v2_and_v1():
    assert build_scopes(["Patient", "Observation"], ["permission-v2"]) == (
        "system/Patient.rs system/Observation.rs"
    )
    assert build_scopes(["Observation"], ["permission-v1"]) == "system/Observation.read"
    assert build_scopes(["Observation"], ["permission-v1", "permission-v2"]) == (
        "system/Observation.rs"
    )
    # letters always in cruds order, whatever order they were asked in
    assert build_scopes(["Task"], ["permission-v2"], access="ur") == "system/Task.ru"
    assert build_scopes(["Task"], ["permission-v1"], access="ru") == (
        "system/Task.read system/Task.write"
    )
    assert build_scopes(["Task", "Task"], []) == "system/Task.rs"


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS384"), ("ec", "ES384")])
def test_sm05_alg_chosen_by_key_type_and_server_list(kind, alg, rsa_key, ec_key):
    key = rsa_key if kind == "rsa" else ec_key
    assert choose_alg(key, ["RS384", "ES384"]) == alg
    assert choose_alg(key, []) == alg
    other = "ES384" if alg == "RS384" else "RS384"
    with pytest.raises(ConfigError, match=alg):
        choose_alg(key, [other])


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_sm06_sm07_thousand_assertions(kind, rsa_key, ec_key):
    key: PrivateKey = rsa_key if kind == "rsa" else ec_key
    alg = choose_alg(key, [])
    jwk = public_jwk(key)
    verify_key = jwt.PyJWK(jwk, algorithm=alg).key
    jtis = set()
    now = 1_800_000_000.0
    for i in range(1000):
        token = client_assertion(
            key,
            client_id="gw",
            token_endpoint=TOKEN_URL,
            alg=alg,
            kid=jwk["kid"],
            now=now + i,
        )
        header = jwt.get_unverified_header(token)
        assert header == {"alg": alg, "kid": jwk["kid"], "typ": "JWT"}
        claims = jwt.decode(
            token,
            verify_key,
            algorithms=[alg],
            audience=TOKEN_URL,
            options={"verify_exp": False, "verify_iat": False},
        )
        assert claims["iss"] == claims["sub"] == "gw"
        assert claims["aud"] == TOKEN_URL
        assert isinstance(claims["exp"], int)
        assert 0 < claims["exp"] - (now + i) <= 300
        jtis.add(claims["jti"])
    assert len(jtis) == 1000


def test_sm04_jwks_has_only_public_members(rsa_key, ec_key):
    keys = jwks([rsa_key, ec_key])["keys"]
    assert [k["kty"] for k in keys] == ["RSA", "EC"]
    assert set(keys[0]) >= {"kty", "kid", "n", "e"}
    assert set(keys[1]) >= {"kty", "kid", "crv", "x", "y"}
    for k in keys:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(k)
    assert keys[0]["kid"] != keys[1]["kid"]
    assert public_jwk(rsa_key)["kid"] == public_jwk(rsa_key)["kid"]  # stable thumbprint


def test_key_file_written_0600_and_readable(tmp_path: Path):
    path = tmp_path / "keys" / "client.pem"
    key = write_private_key(path, "EC")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_jwk(load_private_key(path)) == public_jwk(key)
    with pytest.raises(FileExistsError):
        write_private_key(path, "EC")  # never overwrite a key
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError):
        load_private_key(tmp_path / "bad.pem")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def provider(key: PrivateKey, clock: Clock) -> SmartTokenProvider:
    http = Http(requests.Session(), system="ehr", timeout_s=5)
    return SmartTokenProvider(
        http, BASE, client_id="gw", key=key, resource_types=["Observation"], clock=clock
    )


def token_reply(value: str, expires_in: int = 300) -> dict[str, object]:
    return {
        "access_token": value,
        "token_type": "bearer",
        "expires_in": expires_in,
        "scope": "system/Observation.rs",
    }


@responses.activate
def test_sm08_sm10_token_request_cached_and_renewed_before_expiry(ec_key):
    responses.get(smart_configuration_url(BASE), json=DISCOVERY)
    responses.post(TOKEN_URL, json=token_reply("t1"))
    responses.post(TOKEN_URL, json=token_reply("t2"))
    clock = Clock()
    tokens = provider(ec_key, clock)
    assert tokens.token() == "t1"
    clock.now += 200
    assert tokens.token() == "t1"  # 100 s left: cached
    clock.now += 50
    assert tokens.token() == "t2"  # 50 s left (< 60): renewed
    posts = [c for c in responses.calls if c.request.method == "POST"]
    assert len(posts) == 2
    form = parse_qs(str(posts[0].request.body))
    assert posts[0].request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form["grant_type"] == ["client_credentials"]
    assert form["client_assertion_type"] == [CLIENT_ASSERTION_TYPE]
    assert form["scope"] == ["system/Observation.rs"]
    first = jwt.decode(form["client_assertion"][0], options={"verify_signature": False})
    second = jwt.decode(
        parse_qs(str(posts[1].request.body))["client_assertion"][0],
        options={"verify_signature": False},
    )
    assert first["jti"] != second["jti"]
    assert tokens.granted_scope == {"system/Observation.rs"}


@responses.activate
def test_short_lived_token_renewed_at_half_life_not_every_call(ec_key):
    responses.get(smart_configuration_url(BASE), json=DISCOVERY)
    responses.post(TOKEN_URL, json=token_reply("t1", expires_in=30))
    responses.post(TOKEN_URL, json=token_reply("t2", expires_in=30))
    clock = Clock()
    tokens = provider(ec_key, clock)
    assert tokens.token() == "t1"
    clock.now += 14
    assert tokens.token() == "t1"
    clock.now += 2
    assert tokens.token() == "t2"
    assert tokens.tokens_issued == 2


@responses.activate
def test_token_endpoint_503_retried_with_a_new_assertion(ec_key):
    responses.get(smart_configuration_url(BASE), json=DISCOVERY)
    responses.post(TOKEN_URL, status=503, headers={"Retry-After": "2"})
    responses.post(TOKEN_URL, json=token_reply("t1"))
    sleeps: list[float] = []
    http = Http(requests.Session(), system="ehr", sleep=sleeps.append)
    tokens = SmartTokenProvider(
        http, BASE, client_id="gw", key=ec_key, resource_types=["Observation"], clock=Clock()
    )
    assert tokens.token() == "t1"
    assert sleeps == [2.0]
    posts = [c.request for c in responses.calls if c.request.method == "POST"]
    jtis = {
        jwt.decode(
            parse_qs(str(p.body))["client_assertion"][0], options={"verify_signature": False}
        )["jti"]
        for p in posts
    }
    assert len(jtis) == 2


@responses.activate
def test_invalidate_forces_a_new_token(ec_key):
    responses.get(smart_configuration_url(BASE), json=DISCOVERY)
    responses.post(TOKEN_URL, json=token_reply("t1"))
    responses.post(TOKEN_URL, json=token_reply("t2"))
    tokens = provider(ec_key, Clock())
    assert tokens.token() == "t1"
    tokens.invalidate()
    assert tokens.token() == "t2"


@responses.activate
def test_sm11_token_endpoint_error_surfaces_oauth_code(ec_key):
    responses.get(smart_configuration_url(BASE), json=DISCOVERY)
    responses.post(
        TOKEN_URL,
        status=401,
        json={"error": "invalid_client", "error_description": "unknown kid"},
    )
    with pytest.raises(TokenError) as caught:
        provider(ec_key, Clock()).token()
    assert caught.value.error == "invalid_client"
    assert caught.value.description == "unknown kid"
    assert caught.value.status == 401
    assert "invalid_client" in str(caught.value)


@responses.activate
def test_sm12_token_never_sent_to_another_origin(ec_key):
    responses.get(smart_configuration_url(BASE), json=DISCOVERY)
    responses.post(TOKEN_URL, json=token_reply("secret-token"))
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    responses.get("https://elsewhere.example.com/fhir/Binary/1", body=b"x")
    responses.get("https://ehr.example.org:8443/apis/fhir/Binary/1", body=b"x")
    tokens = provider(ec_key, Clock())
    session = requests.Session()
    auth = tokens.auth()
    session.get(f"{BASE}/Patient/1", auth=auth, timeout=5)
    session.get(
        "https://elsewhere.example.com/fhir/Binary/1",
        auth=auth,
        headers={"Authorization": "Bearer leaked"},
        timeout=5,
    )
    session.get("https://ehr.example.org:8443/apis/fhir/Binary/1", auth=auth, timeout=5)
    sent = {c.request.url: c.request.headers.get("Authorization") for c in responses.calls}
    assert sent[f"{BASE}/Patient/1"] == "Bearer secret-token"
    assert sent["https://elsewhere.example.com/fhir/Binary/1"] is None
    assert sent["https://ehr.example.org:8443/apis/fhir/Binary/1"] is None


def test_discovery_document_parsed(ec_key):
    config = SmartConfiguration.from_json(json.loads(json.dumps(DISCOVERY)), BASE)
    assert config.token_endpoint == TOKEN_URL
    assert "permission-v2" in config.capabilities
    assert config.signing_algs == ("RS384", "ES384")
