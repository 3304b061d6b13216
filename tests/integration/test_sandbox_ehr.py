"""The sandbox EHR behaves like a real FHIR server with SMART backend auth (SM-20..23, RS-*).

Exercised over real HTTP on loopback with plain `requests`, so these tests check the server,
not our client's expectations of it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests

from connectors.smart import CLIENT_ASSERTION_TYPE, PrivateKey, generate_private_key, public_jwk
from tests.conftest import CLIENT_ID

FHIR = {"Accept": "application/fhir+json"}


def assertion(key: PrivateKey, aud: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": aud,
        "exp": now + 240,
        "jti": uuid.uuid4().hex,
    }
    headers = {"kid": public_jwk(key)["kid"], "typ": "JWT"}
    alg = overrides.pop("alg", "RS384")
    headers.update(overrides.pop("headers", {}))
    claims.update(overrides)
    return jwt.encode(
        {k: v for k, v in claims.items() if v is not None}, key, algorithm=alg, headers=headers
    )


def token_request(
    base: str, signed: str, scope: str = "system/Observation.rs"
) -> requests.Response:
    token_url = base.removesuffix("/fhir") + "/auth/token"
    return requests.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": signed,
        },
        timeout=10,
    )


@pytest.fixture
def ehr(sandbox):
    return sandbox(
        scopes=(
            "system/Patient.rs",
            "system/Observation.rs",
            "system/Task.cruds",
            "system/DiagnosticReport.cruds",
        )
    )


def token_for(ehr, key, scope="system/Patient.rs system/Observation.rs") -> str:
    token_url = ehr.base_url.removesuffix("/fhir") + "/auth/token"
    got = token_request(ehr.base_url, assertion(key, token_url), scope)
    assert got.status_code == 200, got.text
    return str(got.json()["access_token"])


def test_sm20_discovery_document(ehr):
    doc = requests.get(f"{ehr.base_url}/.well-known/smart-configuration", timeout=10).json()
    assert doc["token_endpoint"].startswith("http://127.0.0.1:")
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert "private_key_jwt" in doc["token_endpoint_auth_methods_supported"]
    assert {"RS384", "ES384"} <= set(doc["token_endpoint_auth_signing_alg_values_supported"])
    assert "client-confidential-asymmetric" in doc["capabilities"]


def test_sm22_token_issued_with_granted_scopes_only(ehr, rsa_key):
    token_url = ehr.base_url.removesuffix("/fhir") + "/auth/token"
    got = token_request(
        ehr.base_url, assertion(rsa_key, token_url), "system/Observation.rs system/Condition.rs"
    )
    body = got.json()
    assert got.status_code == 200
    assert body["token_type"] == "bearer"
    assert body["expires_in"] <= 300
    assert body["scope"] == "system/Observation.rs"  # Condition was not pre-authorised
    assert "refresh_token" not in body


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("wrong_aud", "invalid_client"),
        ("expired", "invalid_client"),
        ("exp_too_far", "invalid_client"),
        ("unknown_kid", "invalid_client"),
        ("foreign_key", "invalid_client"),
        ("sub_differs", "invalid_client"),
        ("unknown_client", "invalid_client"),
        ("no_jti", "invalid_client"),
        ("bad_alg", "invalid_client"),
    ],
)
def test_sm21_client_assertion_checks(ehr, rsa_key, case, expect):
    token_url = ehr.base_url.removesuffix("/fhir") + "/auth/token"
    now = int(time.time())
    signed = {
        "wrong_aud": lambda: assertion(rsa_key, token_url + "/other"),
        "expired": lambda: assertion(rsa_key, token_url, exp=now - 10),
        "exp_too_far": lambda: assertion(rsa_key, token_url, exp=now + 3600),
        "unknown_kid": lambda: assertion(rsa_key, token_url, headers={"kid": "nope"}),
        "foreign_key": lambda: assertion(
            generate_private_key("RSA"), token_url, headers={"kid": public_jwk(rsa_key)["kid"]}
        ),
        "sub_differs": lambda: assertion(rsa_key, token_url, sub="someone-else"),
        "unknown_client": lambda: assertion(rsa_key, token_url, iss="stranger", sub="stranger"),
        "no_jti": lambda: assertion(rsa_key, token_url, jti=None),
        "bad_alg": lambda: assertion(rsa_key, token_url, alg="RS256"),
    }[case]()
    got = token_request(ehr.base_url, signed)
    assert got.status_code in (400, 401)
    assert got.json()["error"] == expect


def test_sm21_replayed_jti_rejected(ehr, ec_key):
    token_url = ehr.base_url.removesuffix("/fhir") + "/auth/token"
    signed = assertion(ec_key, token_url, alg="ES384", headers={"kid": public_jwk(ec_key)["kid"]})
    assert token_request(ehr.base_url, signed).status_code == 200
    again = token_request(ehr.base_url, signed)
    assert again.status_code == 401
    assert "replay" in again.json()["error_description"]


def test_401_and_403_carry_operation_outcomes(ehr, rsa_key):
    no_token = requests.get(f"{ehr.base_url}/Observation", headers=FHIR, timeout=10)
    assert no_token.status_code == 401
    assert no_token.json()["resourceType"] == "OperationOutcome"
    assert no_token.headers["WWW-Authenticate"].startswith("Bearer")
    token = token_for(ehr, rsa_key, "system/Patient.rs")
    forbidden = requests.get(
        f"{ehr.base_url}/Observation",
        headers={**FHIR, "Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert forbidden.status_code == 403  # SM-23: a Patient token cannot read Observation
    assert forbidden.json()["issue"][0]["code"] == "forbidden"


def test_paging_is_opaque_and_total_sometimes_absent(ehr, rsa_key):
    auth = {**FHIR, "Authorization": f"Bearer {token_for(ehr, rsa_key)}"}
    totals = []
    for _ in range(2):
        page = requests.get(
            f"{ehr.base_url}/Observation", params={"_count": "7"}, headers=auth, timeout=10
        ).json()
        totals.append("total" in page)
        nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
        # one opaque token: no page size, offset or search parameters in clear
        assert list(parse_qs(urlsplit(nxt).query)) == ["_getpages"]
        assert len(page["entry"]) == 7
    assert totals == [True, False]
    second = requests.get(nxt, headers=auth, timeout=10).json()
    assert len(second["entry"]) == 7
    bogus = requests.get(f"{ehr.base_url}?_getpages=forged", headers=auth, timeout=10)
    assert bogus.status_code == 400


def test_search_parameters_and_unknown_ones(ehr, rsa_key):
    auth = {**FHIR, "Authorization": f"Bearer {token_for(ehr, rsa_key)}"}

    def count(params: dict[str, str]) -> int:
        got = requests.get(
            f"{ehr.base_url}/Observation",
            params={**params, "_count": "200"},
            headers=auth,
            timeout=10,
        )
        assert got.status_code == 200, got.text
        return len(got.json().get("entry", []))

    everything = count({})
    laboratory = count({"category": "laboratory"})
    assert 0 < laboratory < everything
    assert (
        count({"category": "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"})
        == laboratory
    )
    assert count({"category": "http://wrong.system|laboratory"}) == 0
    assert count({"_lastUpdated": "ge2000-01-01T00:00:00Z"}) == everything
    assert count({"_lastUpdated": "lt2000-01-01T00:00:00Z"}) == 0
    unknown = requests.get(
        f"{ehr.base_url}/Observation", params={"colour": "blue"}, headers=auth, timeout=10
    )
    assert unknown.status_code == 400
    assert unknown.json()["resourceType"] == "OperationOutcome"


def test_writes_conditional_create_and_if_match(ehr, rsa_key):
    token = token_for(ehr, rsa_key, "system/DiagnosticReport.cruds system/Task.cruds")
    auth = {**FHIR, "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "x"},
        "identifier": [{"system": "urn:fhir-gateway:test", "value": "r1"}],
    }
    cond = {**auth, "If-None-Exist": "identifier=urn:fhir-gateway:test|r1"}
    first = requests.post(f"{ehr.base_url}/DiagnosticReport", json=report, headers=cond, timeout=10)
    assert first.status_code == 201
    assert first.headers["Location"].endswith("/_history/1")
    again = requests.post(f"{ehr.base_url}/DiagnosticReport", json=report, headers=cond, timeout=10)
    assert again.status_code == 200
    requests.post(f"{ehr.base_url}/DiagnosticReport", json=report, headers=auth, timeout=10)
    dup = requests.post(f"{ehr.base_url}/DiagnosticReport", json=report, headers=cond, timeout=10)
    assert dup.status_code == 412  # two now match

    task = {"resourceType": "Task", "id": "t1", "status": "requested", "intent": "order"}
    created = requests.put(f"{ehr.base_url}/Task/t1", json=task, headers=auth, timeout=10)
    assert created.status_code == 201
    stale = requests.put(
        f"{ehr.base_url}/Task/t1",
        json={**task, "status": "completed"},
        headers={**auth, "If-Match": 'W/"7"'},
        timeout=10,
    )
    assert stale.status_code == 412
    done = requests.put(
        f"{ehr.base_url}/Task/t1",
        json={**task, "status": "completed"},
        headers={**auth, "If-Match": created.headers["ETag"]},
        timeout=10,
    )
    assert done.status_code == 200
    assert done.headers["ETag"] == 'W/"2"'
