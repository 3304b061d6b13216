"""Contract test: our FHIR client and pull against Medplum's FHIR engine (a real FHIR server).

Medplum's `@medplum/fhir-router` with its in-memory repository runs under Node 20 behind the
small HTTP wrapper in tests/servers/medplum/server.mjs. Skipped with a reason when Node or the
npm packages are missing, unless FHIR_GATEWAY_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from connectors._http import FHIR_JSON, Http, RetryPolicy
from connectors.fhir_client import FhirEhrClient
from fhir_gateway.errors import UpstreamRejectedError
from fhir_gateway.records.pull import PULL_TYPES, pull_patient_records
from fhir_gateway.sandbox.repository import load_folder
from tests.conftest import SYNTHEA
from tests.servers.medplum_server import medplum_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def medplum_base() -> Iterator[str]:
    with medplum_server() as base:
        yield base


def patient_records(name: str) -> tuple[str, list[dict[str, Any]]]:
    """The fixture patient's id and their resources of the types we pull (refs resolved)."""
    resources = [r for r in load_folder(SYNTHEA / name) if r["resourceType"] in PULL_TYPES]
    patient_id = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    wanted = f"Patient/{patient_id}"
    mine = [
        r
        for r in resources
        if r["resourceType"] == "Patient"
        or any((r.get(f) or {}).get("reference") == wanted for f in ("subject", "patient"))
    ]
    return patient_id, mine


def http_client(base: str) -> FhirEhrClient:
    http = Http(
        requests.Session(), system="medplum", timeout_s=30, retry=RetryPolicy(max_attempts=2)
    )
    return FhirEhrClient(http, base)


@pytest.fixture(scope="module")
def loaded(medplum_base: str) -> dict[str, list[dict[str, Any]]]:
    """Every resource of the fixtures, PUT into Medplum (update-as-create keeps the ids)."""
    session = requests.Session()
    for resource in load_folder(SYNTHEA):
        if resource["resourceType"] not in PULL_TYPES:
            continue
        resource.pop("meta", None)
        url = f"{medplum_base}/{resource['resourceType']}/{resource['id']}"
        got = session.put(url, json=resource, headers={"Content-Type": FHIR_JSON}, timeout=30)
        assert got.status_code in (200, 201), got.text[:300]
    return {}


@pytest.mark.parametrize("name", sorted(p.name for p in SYNTHEA.glob("*.json")))
def test_pull_from_medplum_gets_every_resource(name, medplum_base, loaded):
    patient_id, expected = patient_records(name)
    result = pull_patient_records(http_client(medplum_base), f"Patient/{patient_id}")
    assert result.counts == dict(Counter(r["resourceType"] for r in expected))
    assert not result.partial

    def strip(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k != "meta"}

    got = {(r["resourceType"], r["id"]): strip(r) for r in result.resources}
    for r in expected:
        assert got[(r["resourceType"], r["id"])] == strip(r)


def test_read_and_not_found_from_medplum(medplum_base, loaded):
    client = http_client(medplum_base)
    patient_id, _ = patient_records(sorted(p.name for p in SYNTHEA.glob("*.json"))[0])
    assert client.read("Patient", patient_id)["id"] == patient_id
    with pytest.raises(UpstreamRejectedError) as caught:
        client.read("Patient", "no-such-patient")
    assert caught.value.status == 404
    assert caught.value.outcome is not None


def test_writes_conditional_create_and_if_match(medplum_base):
    """What report delivery will rely on: If-None-Exist 201 then 200; If-Match mismatch 412."""
    http = Http(requests.Session(), system="medplum", timeout_s=30)
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "identifier": [{"system": "urn:fhir-gateway:test", "value": "report-1"}],
        "code": {"text": "Second opinion"},
    }
    headers = {
        "Content-Type": FHIR_JSON,
        "Accept": FHIR_JSON,
        "If-None-Exist": "identifier=urn:fhir-gateway:test|report-1",
    }
    first = http.request("POST", f"{medplum_base}/DiagnosticReport", json=report, headers=headers)
    assert first.status_code == 201
    again = http.request("POST", f"{medplum_base}/DiagnosticReport", json=report, headers=headers)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    stored = first.json()
    with pytest.raises(UpstreamRejectedError) as caught:
        http.request(
            "PUT",
            f"{medplum_base}/DiagnosticReport/{stored['id']}",
            json=dict(stored, status="amended"),
            headers={"Content-Type": FHIR_JSON, "If-Match": 'W/"not-the-version"'},
        )
    assert caught.value.status == 412
    ok = http.request(
        "PUT",
        f"{medplum_base}/DiagnosticReport/{stored['id']}",
        json=dict(stored, status="amended"),
        headers={"Content-Type": FHIR_JSON, "If-Match": first.headers["ETag"]},
    )
    assert ok.json()["status"] == "amended"
