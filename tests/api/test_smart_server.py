"""Partners authenticate to us with SMART Backend Services (SM-20..SM-23): discovery, the token
endpoint's rules (every negative case is `invalid_client`), scopes enforced per interaction,
introspection, and a JWKS URL cached only as long as its Cache-Control allows."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from fastapi.testclient import TestClient

from connectors._http import Http
from connectors.smart import (
    CLIENT_ASSERTION_TYPE,
    SmartTokenProvider,
    generate_private_key,
    public_jwk,
)
from fhir_gateway.app import create_app
from fhir_gateway.sandbox.server import AppServer, free_port
from fhir_gateway.settings import JobSettings, Settings
from tests.api.test_referral_intake import referral
from tests.conftest import FHIR_JSON

CLIENT = "st-elsewhere-epic"
EC = generate_private_key("EC")
RSA = generate_private_key("RSA")


def partners_toml(data_dir: Path, client_block: str) -> None:
    (data_dir / "partners.toml").write_text(f"""
[[partners]]
id = "st-elsewhere"
name = "St Elsewhere"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "st-elsewhere" }}
{client_block}
""")


@pytest.fixture
def smart_app(tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "client-jwks.json").write_text(
        json.dumps({"keys": [public_jwk(EC, "ec-1"), public_jwk(RSA, "rsa-1")]})
    )
    partners_toml(
        data,
        f'''
[partners.client]
client_id = "{CLIENT}"
jwks_file = "client-jwks.json"
scopes = ["system/Task.cruds", "system/ServiceRequest.crs", "system/Patient.crs",
          "system/Organization.c"]
''',
    )
    settings = Settings(data_dir=data, public_base_url="http://testserver", jobs=JobSettings())
    with TestClient(create_app(settings, configure_logs=False)) as c:
        yield c, settings


TOKEN_URL = "http://testserver/auth/token"


def assertion(key: Any = EC, alg: str = "ES384", kid: str = "ec-1", **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": CLIENT,
        "sub": CLIENT,
        "aud": TOKEN_URL,
        "exp": now + 240,
        "iat": now,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return jwt.encode(
        {k: v for k, v in claims.items() if v is not None},
        key,
        algorithm=alg,
        headers={"kid": kid, "typ": "JWT"},
    )


def ask(client: TestClient, token: str, scope: str = "system/Task.rs") -> Any:
    return client.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": token,
            "scope": scope,
        },
    )


def test_discovery(smart_app) -> None:
    client, _ = smart_app
    doc = client.get("/fhir/.well-known/smart-configuration").json()
    assert doc["token_endpoint"] == TOKEN_URL
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert doc["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(doc["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert {"client-confidential-asymmetric", "permission-v2"} <= set(doc["capabilities"])
    assert doc["introspection_endpoint"].endswith("/auth/introspect")


@pytest.mark.parametrize(("key", "alg", "kid"), [(EC, "ES384", "ec-1"), (RSA, "RS384", "rsa-1")])
def test_token_issued_short_lived_without_refresh(smart_app, key, alg, kid) -> None:
    client, _ = smart_app
    resp = ask(client, assertion(key, alg, kid), "system/Task.rs system/Observation.rs")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "bearer"
    assert 0 < body["expires_in"] <= 300
    assert "refresh_token" not in body
    assert body["scope"] == "system/Task.rs"  # Observation is not pre-authorised
    cut = ask(client, assertion(key, alg, kid), "system/Patient.cruds").json()
    assert cut["scope"] == "system/Patient.crs"  # down-scoped to what is registered
    assert resp.headers["cache-control"] == "no-store"


HS_KEY = b"k" * 32


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("wrong aud", lambda: assertion(aud="https://elsewhere.example/token")),
        ("expired", lambda: assertion(exp=int(time.time()) - 60)),
        ("exp too far ahead", lambda: assertion(exp=int(time.time()) + 3600)),
        ("unknown kid", lambda: assertion(kid="nope")),
        ("kid of the other key type", lambda: assertion(kid="rsa-1")),
        ("wrong signing key", lambda: assertion(generate_private_key("EC"))),
        (
            "HS256 assertion",
            lambda: jwt.encode(
                {
                    "iss": CLIENT,
                    "sub": CLIENT,
                    "aud": TOKEN_URL,
                    "exp": int(time.time()) + 60,
                    "jti": "x",
                },
                HS_KEY,
                algorithm="HS256",
                headers={"kid": "ec-1"},
            ),
        ),
        (
            "alg none",
            lambda: jwt.encode(
                {
                    "iss": CLIENT,
                    "sub": CLIENT,
                    "aud": TOKEN_URL,
                    "exp": int(time.time()) + 60,
                    "jti": "y",
                },
                "",
                algorithm="none",
                headers={"kid": "ec-1"},
            ),
        ),
        ("sub differs from iss", lambda: assertion(sub="someone-else")),
        ("no jti", lambda: assertion(jti=None)),
        ("unknown client", lambda: assertion(iss="stranger", sub="stranger")),
        ("not a JWT", lambda: "garbage"),
    ],
)
def test_bad_assertions_are_invalid_client(smart_app, name, token) -> None:
    client, _ = smart_app
    resp = ask(client, token())
    assert resp.status_code == 401, (name, resp.text)
    assert resp.json()["error"] == "invalid_client", name


def test_replayed_jti_is_invalid_client(smart_app) -> None:
    client, _ = smart_app
    once = assertion()
    assert ask(client, once).status_code == 200
    again = ask(client, once)
    assert again.status_code == 401
    assert again.json()["error"] == "invalid_client"
    assert "replay" in again.json()["error_description"]


def test_two_keys_with_the_same_kid_are_refused(smart_app) -> None:
    client, settings = smart_app
    twin = generate_private_key("EC")
    (settings.data_dir / "client-jwks.json").write_text(
        json.dumps({"keys": [public_jwk(EC, "ec-1"), public_jwk(twin, "ec-1")]})
    )
    resp = ask(client, assertion())
    assert resp.status_code == 401
    assert "exactly one" in resp.json()["error_description"]


def test_other_grant_types_and_scopes(smart_app) -> None:
    client, _ = smart_app
    resp = client.post("/auth/token", data={"grant_type": "password"})
    assert resp.json()["error"] == "unsupported_grant_type"
    resp = ask(client, assertion(), "system/Observation.rs")
    assert resp.json()["error"] == "invalid_scope"
    resp = client.post("/auth/token", json={"grant_type": "client_credentials"})
    assert resp.json()["error"] == "invalid_request"


def test_scopes_enforced_per_interaction(smart_app) -> None:
    client, _ = smart_app
    read_only = ask(client, assertion(), "system/Task.rs").json()["access_token"]
    headers = {"Authorization": f"Bearer {read_only}"} | FHIR_JSON
    sr = next(
        e["resource"]
        for e in referral()["entry"]
        if e["resource"]["resourceType"] == "ServiceRequest"
    )
    resp = client.post("/fhir/ServiceRequest", json=sr, headers=headers)
    assert resp.status_code == 403
    assert "ServiceRequest" in resp.json()["issue"][0]["diagnostics"]
    assert client.post("/fhir", json=referral(), headers=headers).status_code == 403
    assert client.get("/fhir/Task", params={"identifier": "x"}, headers=headers).status_code == 200
    writer = ask(
        client,
        assertion(),
        "system/Task.cruds system/ServiceRequest.crs system/Patient.crs system/Organization.c",
    ).json()["access_token"]
    resp = client.post(
        "/fhir", json=referral(), headers={"Authorization": f"Bearer {writer}"} | FHIR_JSON
    )
    assert resp.status_code == 200, resp.text
    # a partner token is an ehr principal: it cannot read the cases API
    assert client.get("/cases", headers={"Authorization": f"Bearer {writer}"}).status_code == 403


def test_introspection(smart_app) -> None:
    client, _ = smart_app
    token = ask(client, assertion()).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    info = client.post("/auth/introspect", data={"token": token}, headers=auth).json()
    assert info["active"] is True
    assert info["client_id"] == CLIENT
    assert info["scope"] == "system/Task.rs"
    assert info["partner"] == "st-elsewhere"
    dead = client.post("/auth/introspect", data={"token": "nonsense"}, headers=auth).json()
    assert dead == {"active": False}
    assert client.post("/auth/introspect", data={"token": token}).status_code == 401


def test_jwks_url_cached_per_cache_control(tmp_path, httpserver) -> None:
    data = tmp_path / "data"
    data.mkdir()
    jwks = {"keys": [public_jwk(EC, "ec-1")]}
    for path, cache in (("/short", "no-store"), ("/long", "max-age=600")):
        httpserver.expect_request(path).respond_with_data(
            json.dumps(jwks), content_type="application/json", headers={"Cache-Control": cache}
        )
    counts = {}
    for path in ("/short", "/long"):
        partners_toml(
            data,
            f'''
[partners.client]
client_id = "{CLIENT}"
jwks_url = "{httpserver.url_for(path)}"
''',
        )
        settings = Settings(data_dir=data, public_base_url="http://testserver")
        with TestClient(create_app(settings, configure_logs=False)) as client:
            before = len([r for r, _ in httpserver.log if r.path == path])
            for _ in range(3):
                assert ask(client, assertion()).status_code == 200
            counts[path] = len([r for r, _ in httpserver.log if r.path == path]) - before
    assert counts == {"/short": 3, "/long": 1}


def test_our_smart_client_against_our_server_over_http(tmp_path) -> None:
    """The same SMART client we use against EHRs gets a token from us and pushes a referral."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "client-jwks.json").write_text(json.dumps({"keys": [public_jwk(EC, "ec-1")]}))
    partners_toml(
        data,
        f'''
[partners.client]
client_id = "{CLIENT}"
jwks_file = "client-jwks.json"
''',
    )
    port = free_port()
    settings = Settings(data_dir=data, public_base_url=f"http://127.0.0.1:{port}")
    with AppServer(create_app(settings, configure_logs=False), port, lifespan=True) as server:
        base = server.url
        http = Http(requests.Session(), system="gateway")
        provider = SmartTokenProvider(
            http,
            f"{base}/fhir",
            client_id=CLIENT,
            key=EC,
            kid="ec-1",
            resource_types=["Task", "ServiceRequest", "Patient", "Organization"],
            access="cruds",
        )
        resp = requests.post(
            f"{base}/fhir",
            data=json.dumps(referral()),
            timeout=30,
            headers={"Authorization": f"Bearer {provider.token()}"} | FHIR_JSON,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["entry"][3]["response"]["status"] == "201 Created"
