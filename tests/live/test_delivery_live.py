"""Delivery against a real FHIR server (Medplum, the sandbox EHR, a vendor sandbox).

    FHIR_GATEWAY_LIVE_DESTINATION=http://127.0.0.1:8103/fhir/R4 \
    FHIR_GATEWAY_LIVE_DESTINATION_TOKEN=... pytest -m live tests/live/test_delivery_live.py

What it creates is tagged with identifier system `urn:fhir-gateway:test` and deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from connectors.delivery import FhirReportSink, NoToken
from mappers.report import draft_to_report, parse_draft, report_provenance
from tests.report_helpers import context, draft_data, report_fonts

TEST_SYSTEM = "urn:fhir-gateway:test"

pytestmark = pytest.mark.live


class _Token:
    def __init__(self, token: str) -> None:
        self._token = token

    def token(self) -> str | None:
        return self._token

    def invalidate(self) -> None:
        return None


@pytest.fixture
def live() -> Iterator[tuple[FhirReportSink, requests.Session, str, list[str]]]:
    base = os.environ.get("FHIR_GATEWAY_LIVE_DESTINATION")
    if not base:
        pytest.skip("FHIR_GATEWAY_LIVE_DESTINATION is not set")
    token = os.environ.get("FHIR_GATEWAY_LIVE_DESTINATION_TOKEN")
    session = requests.Session()
    tokens = _Token(token) if token else NoToken()
    created: list[str] = []
    sink = FhirReportSink(session, base, tokens=tokens, timeout_s=30, system="live")
    yield sink, session, base.rstrip("/"), created
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for ref in reversed(created):
        session.delete(f"{base.rstrip('/')}/{ref}", headers=headers, timeout=30)
    session.close()


def _patient(session: requests.Session, base: str, created: list[str]) -> str:
    token = os.environ.get("FHIR_GATEWAY_LIVE_DESTINATION_TOKEN")
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    value = uuid.uuid4().hex
    resp = session.post(
        f"{base}/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": TEST_SYSTEM, "value": value}],
            "name": [{"family": "Test", "given": ["Report"]}],
            "gender": "unknown",
        },
        headers=headers,
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    pid = resp.json()["id"]
    created.append(f"Patient/{pid}")
    return f"Patient/{pid}"


def _strip(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}


def test_live_create_match_amend_retract(live):
    sink, session, base, created = live
    patient = _patient(session, base, created)
    ctx = context(
        identifier_system=TEST_SYSTEM,
        identifier_value=uuid.uuid4().hex,
        patient_reference=patient,
        patient_identifier=None,
    )
    report = draft_to_report(parse_draft(draft_data()), ctx, status="final", fonts=report_fonts())
    prov = report_provenance(report.diagnostic_report, author_by_identifier=True)
    first = sink.deliver(report.diagnostic_report, provenance=prov)
    created.append(first.reference)
    assert first.created
    again = sink.deliver(report.diagnostic_report, provenance=prov)
    assert not again.created
    assert again.server_id == first.server_id
    stored = sink.read(first.reference)
    assert _strip(stored) == _strip(report.diagnostic_report)
    amended = {**report.diagnostic_report, "status": "amended", "conclusion": "Revised."}
    updated = sink.update(amended, server_id=first.server_id, version=first.version)
    assert updated.version != first.version
    retracted = sink.retract(amended, server_id=first.server_id, version=updated.version)
    assert sink.read(retracted.reference)["status"] == "entered-in-error"
