"""Referral intake at /fhir (RF-10, RF-11, RF-12, RS-05, RS-30) through the real app."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import FHIR_JSON, Tokens, load_fixture


def referral() -> dict[str, Any]:
    return copy.deepcopy(load_fixture("referrals/referral-transaction.json"))


def entry_of(bundle: dict[str, Any], rtype: str) -> dict[str, Any]:
    return next(e for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)


def post_bundle(client: TestClient, tokens: Tokens, bundle: Any, **kw: str) -> Any:
    return client.post("/fhir", json=bundle, headers=tokens.headers("ehr", **kw) | FHIR_JSON)


def case_count(client: TestClient, tokens: Tokens) -> int:
    return len(client.get("/cases", headers=tokens.headers("admin")).json())


def test_transaction_creates_case_with_received_task(client, tokens) -> None:
    resp = post_bundle(client, tokens, referral())
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/fhir+json; charset=utf-8"
    body = resp.json()
    assert body["type"] == "transaction-response"
    # entries in request order (RS-30), each with location and etag
    types = [e["response"]["location"].split("/")[0] for e in body["entry"]]
    assert types == ["Organization", "Patient", "ServiceRequest", "Task"]
    assert all(e["response"]["status"] == "201 Created" for e in body["entry"])
    task_loc = body["entry"][3]["response"]["location"]
    task_id = task_loc.split("/")[1]
    task = client.get(f"/fhir/Task/{task_id}", headers=tokens.headers("ehr"))
    assert task.status_code == 200
    assert task.json()["status"] == "received"
    assert task.headers["ETag"] == 'W/"2"' == body["entry"][3]["response"]["etag"]
    assert task.json()["meta"]["versionId"] == "2"
    # urn:uuid references were rewritten to the new server ids
    sr_id = body["entry"][2]["response"]["location"].split("/")[1]
    patient_id = body["entry"][1]["response"]["location"].split("/")[1]
    assert task.json()["focus"]["reference"] == f"ServiceRequest/{sr_id}"
    assert task.json()["for"]["reference"] == f"Patient/{patient_id}"
    assert task.json()["owner"]["identifier"]["value"] == "second-opinion"
    cases = client.get("/cases", headers=tokens.headers("admin")).json()
    assert len(cases) == 1
    assert cases[0]["status"] == "received"
    detail = client.get(f"/cases/{cases[0]['id']}", headers=tokens.headers("admin")).json()
    assert sorted(j["kind"] for j in detail["jobs"]) == ["pull_fhir", "pull_imaging"]
    assert {j["state"] for j in detail["jobs"]} == {"queued"}
    assert detail["referral"]["ServiceRequest"]["id"] == sr_id


def test_same_referral_twice_makes_one_case(client, tokens) -> None:
    first = post_bundle(client, tokens, referral()).json()
    second = post_bundle(client, tokens, referral())
    assert second.status_code == 200
    assert [e["response"]["status"] for e in second.json()["entry"]] == ["200 OK"] * 4
    assert [e["response"]["location"] for e in second.json()["entry"]] == [
        e["response"]["location"] for e in first["entry"]
    ]
    assert case_count(client, tokens) == 1


def test_same_referral_without_if_none_exist_is_still_idempotent(client, tokens) -> None:
    bundle = referral()
    for e in bundle["entry"]:
        e["request"].pop("ifNoneExist", None)
    post_bundle(client, tokens, bundle)
    post_bundle(client, tokens, bundle)
    assert case_count(client, tokens) == 1


@pytest.mark.parametrize("element", ["subject", "code"])
def test_missing_service_request_element_names_it(client, tokens, element) -> None:
    bundle = referral()
    del entry_of(bundle, "ServiceRequest")["resource"][element]
    resp = post_bundle(client, tokens, bundle)
    assert resp.status_code in (400, 422)
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert f"Bundle.entry[2].resource.{element}" in outcome["issue"][0]["expression"]
    assert case_count(client, tokens) == 0


def test_unknown_partner_is_422_naming_where(client, tokens) -> None:
    bundle = referral()
    entry_of(bundle, "Organization")["resource"]["identifier"][0]["value"] = "nobody-we-know"
    resp = post_bundle(client, tokens, bundle)
    assert resp.status_code == 422
    issue = resp.json()["issue"][0]
    assert "not a registered partner" in issue["diagnostics"]
    assert issue["expression"][0].endswith(".requester")
    assert "nobody-we-know" not in resp.text  # the rule and the place, never the value
    assert case_count(client, tokens) == 0


def test_ehr_cannot_push_for_another_partner(client, tokens) -> None:
    resp = post_bundle(client, tokens, referral(), partner="mercy-north")
    assert resp.status_code == 403
    assert case_count(client, tokens) == 0


def test_no_token_is_401_and_metadata_and_health_are_open(client) -> None:
    resp = client.post("/fhir", json=referral(), headers=FHIR_JSON)
    assert resp.status_code == 401
    assert resp.json()["issue"][0]["code"] == "login"
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/cases").status_code == 401
    assert client.get("/fhir/metadata").status_code == 200
    assert client.get("/health").json() == {"status": "ok"}


def test_bad_tokens_are_401(client, tokens, data_dir) -> None:
    from fhir_gateway.security.auth import mint_dev_token

    expired = mint_dev_token(data_dir, role="admin", sub="x", ttl_s=-10)
    for bad in ("not-a-jwt", expired, tokens.headers("admin")["Authorization"][7:-4] + "AAAA"):
        resp = client.get("/cases", headers={"Authorization": f"Bearer {bad}"})
        assert resp.status_code == 401, bad


def test_ehr_token_cannot_list_cases(client, tokens) -> None:
    post_bundle(client, tokens, referral())
    assert client.get("/cases", headers=tokens.headers("ehr")).status_code == 403
    assert client.get("/cases", headers=tokens.headers("admin")).status_code == 200


def test_reviewer_sees_only_assigned_cases(client, tokens) -> None:
    post_bundle(client, tokens, referral())
    case_id = client.get("/cases", headers=tokens.headers("admin")).json()[0]["id"]
    alice, bob = tokens.headers("reviewer", sub="alice"), tokens.headers("reviewer", sub="bob")
    assert client.get("/cases", headers=alice).json() == []
    assert client.get(f"/cases/{case_id}", headers=alice).status_code == 403
    resp = client.post(
        f"/cases/{case_id}/assignments", json={"reviewer": "alice"}, headers=tokens.headers("admin")
    )
    assert resp.status_code == 201
    assert [c["id"] for c in client.get("/cases", headers=alice).json()] == [case_id]
    assert client.get(f"/cases/{case_id}", headers=alice).status_code == 200
    assert client.get(f"/cases/{case_id}", headers=bob).status_code == 403
    # only admins assign
    resp = client.post(f"/cases/{case_id}/assignments", json={"reviewer": "bob"}, headers=alice)
    assert resp.status_code == 403


def test_single_posts_with_conditional_create(client, tokens) -> None:
    bundle = referral()
    ehr = tokens.headers("ehr") | FHIR_JSON
    patient = entry_of(bundle, "Patient")["resource"]
    p1 = client.post("/fhir/Patient", json=patient, headers=ehr)
    assert p1.status_code == 201
    assert p1.headers["Location"].startswith("Patient/")
    assert p1.headers["ETag"] == 'W/"1"'
    pid = p1.json()["id"]
    sr = entry_of(bundle, "ServiceRequest")["resource"]
    sr["subject"] = {"reference": f"Patient/{pid}"}
    sr["requester"] = {
        "identifier": {"system": "urn:oid:2.16.840.1.113883.3.9999", "value": "st-elsewhere"}
    }
    cond = {"If-None-Exist": "identifier=urn:oid:2.16.840.1.113883.3.9999.1|REF-2026-0001"}
    r1 = client.post("/fhir/ServiceRequest", json=sr, headers=ehr | cond)
    r2 = client.post("/fhir/ServiceRequest", json=sr, headers=ehr | cond)
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.json()["id"] == r2.json()["id"]
    task = entry_of(bundle, "Task")["resource"]
    task["focus"] = {"reference": f"ServiceRequest/{r1.json()['id']}"}
    task["for"] = {"reference": f"Patient/{pid}"}
    task["requester"] = sr["requester"]
    t1 = client.post("/fhir/Task", json=task, headers=ehr)
    assert t1.status_code == 201
    assert t1.json()["status"] == "received"
    assert client.post("/fhir/Task", json=task, headers=ehr).status_code == 200
    assert case_count(client, tokens) == 1
    # search by identifier
    found = client.get(
        "/fhir/Task",
        params={"identifier": "urn:oid:2.16.840.1.113883.3.9999.2|TASK-2026-0001"},
        headers=tokens.headers("ehr"),
    )
    assert found.status_code == 200
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [t1.json()["id"]]


def test_conditional_create_with_several_matches_is_412(client, tokens) -> None:
    ehr = tokens.headers("ehr") | FHIR_JSON
    patient = entry_of(referral(), "Patient")["resource"]
    for system in ("urn:test:mrn-a", "urn:test:mrn-b"):
        p = copy.deepcopy(patient)
        p["identifier"] = [{"system": system, "value": "same"}]
        cond = {"If-None-Exist": f"identifier={system}|same"}
        assert client.post("/fhir/Patient", json=p, headers=ehr | cond).status_code == 201
    # a bare value matches every system: two Patients
    resp = client.post(
        "/fhir/Patient", json=patient, headers=ehr | {"If-None-Exist": "identifier=same"}
    )
    assert resp.status_code == 412
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_conditional_create_of_an_identifier_held_by_another_resource_is_409(
    client, tokens
) -> None:
    """Identifiers are unique per partner and type: explicit criteria that match nothing do
    not let a second Patient take an identifier the first one holds."""
    ehr = tokens.headers("ehr") | FHIR_JSON
    patient = entry_of(referral(), "Patient")["resource"]
    first = copy.deepcopy(patient)
    first["identifier"] = [{"system": "urn:test:shared", "value": "same"}]
    assert client.post("/fhir/Patient", json=first, headers=ehr).status_code == 201
    second = copy.deepcopy(patient)
    second["identifier"] = [
        {"system": "urn:test:mrn", "value": "A-2"},
        {"system": "urn:test:shared", "value": "same"},
    ]
    resp = client.post(
        "/fhir/Patient", json=second, headers=ehr | {"If-None-Exist": "identifier=urn:test:mrn|A-2"}
    )
    assert resp.status_code == 409
    assert resp.json()["issue"][0]["expression"] == ["Patient.identifier[1]"]
    assert "same" not in resp.text


def test_if_none_match_gives_304(client, tokens) -> None:
    body = post_bundle(client, tokens, referral()).json()
    loc = body["entry"][3]["response"]["location"].split("/_history")[0]
    resp = client.get(f"/fhir/{loc}", headers=tokens.headers("ehr") | {"If-None-Match": 'W/"2"'})
    assert resp.status_code == 304
    resp = client.get(f"/fhir/{loc}", headers=tokens.headers("ehr") | {"If-None-Match": 'W/"1"'})
    assert resp.status_code == 200


def test_other_partner_cannot_read_task(client, tokens) -> None:
    body = post_bundle(client, tokens, referral()).json()
    loc = body["entry"][3]["response"]["location"].split("/_history")[0]
    assert (
        client.get(f"/fhir/{loc}", headers=tokens.headers("ehr", partner="mercy-north")).status_code
        == 403
    )
    search = client.get(
        "/fhir/Task",
        params={"identifier": "TASK-2026-0001"},
        headers=tokens.headers("ehr", partner="mercy-north"),
    )
    assert search.json()["total"] == 0


def test_task_state_machine_over_http(client, tokens) -> None:
    body = post_bundle(client, tokens, referral()).json()
    task_id = body["entry"][3]["response"]["location"].split("/")[1]
    case_id = client.get("/cases", headers=tokens.headers("admin")).json()[0]["id"]
    admin = tokens.headers("admin")
    illegal = client.post(f"/cases/{case_id}/status", json={"status": "completed"}, headers=admin)
    assert illegal.status_code == 409
    assert "received" in illegal.json()["issue"][0]["diagnostics"]
    for status in ("accepted", "in-progress"):
        resp = client.post(f"/cases/{case_id}/status", json={"status": status}, headers=admin)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == status
    task = client.get(f"/fhir/Task/{task_id}", headers=admin).json()
    assert (task["status"], task["meta"]["versionId"]) == ("in-progress", "4")
    # The requester cancels with If-Match; a stale version is refused.
    ehr = tokens.headers("ehr") | FHIR_JSON
    cancel = {**task, "status": "cancelled", "statusReason": {"text": "patient declined"}}
    stale = client.put(f"/fhir/Task/{task_id}", json=cancel, headers=ehr | {"If-Match": 'W/"3"'})
    assert stale.status_code == 412
    no_reason = client.put(
        f"/fhir/Task/{task_id}", json={**task, "status": "cancelled"}, headers=ehr
    )
    assert no_reason.status_code == 422
    ok = client.put(f"/fhir/Task/{task_id}", json=cancel, headers=ehr | {"If-Match": 'W/"4"'})
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "cancelled"
    assert client.get("/cases", headers=admin).json()[0]["status"] == "cancelled"
    again = client.post(f"/cases/{case_id}/status", json={"status": "accepted"}, headers=admin)
    assert again.status_code == 409


@pytest.mark.parametrize(
    ("content", "ctype", "status"),
    [
        (b"{not json", "application/fhir+json", 400),
        (b'{"resourceType": "Bundle", "type": "batch", "entry": []}', "application/fhir+json", 400),
        (b"<Bundle/>", "application/fhir+xml", 415),
        (b"[" * 200 + b"]" * 200, "application/fhir+json", 400),
        (b'{"resourceType": "Patient"}', "application/fhir+json", 400),
    ],
)
def test_bad_bodies_are_4xx_outcomes(client, tokens, content, ctype, status) -> None:
    resp = client.post(
        "/fhir", content=content, headers=tokens.headers("ehr") | {"Content-Type": ctype}
    )
    assert resp.status_code == status
    assert resp.json()["resourceType"] == "OperationOutcome"
    assert resp.json()["issue"][0]["diagnostics"]
    assert case_count(client, tokens) == 0


def test_invalid_fhir_element_is_400_with_path(client, tokens) -> None:
    bundle = referral()
    entry_of(bundle, "Task")["resource"]["authoredOn"] = "yesterday"
    resp = post_bundle(client, tokens, bundle)
    assert resp.status_code == 400
    assert resp.json()["issue"][0]["expression"] == ["Bundle.entry[3].resource.authoredOn"]


def test_body_over_limit_is_413(client, tokens, settings) -> None:
    settings.limits.max_json_bytes = 1000
    resp = post_bundle(client, tokens, referral())
    assert resp.status_code == 413
    assert case_count(client, tokens) == 0


def test_capability_statement_tells_the_truth(client) -> None:
    cs = client.get("/fhir/metadata").json()
    assert cs["fhirVersion"] == "4.0.1"
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert {i["code"] for i in by_type["Task"]["interaction"]} == {
        "read",
        "create",
        "update",
        "search-type",
    }
    assert by_type["Task"]["conditionalCreate"] is True
    assert cs["rest"][0]["interaction"] == [{"code": "transaction"}]
    # Everything claimed is answered: search on an unclaimed type is refused.
    assert "search-type" not in {i["code"] for i in by_type["Observation"]["interaction"]}
