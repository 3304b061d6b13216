"""Audit trail (AU-01..AU-04, AU-07): every PHI access leaves an AuditEvent; admins search them;
the hash chain detects tampering (`fhir-gateway audit verify`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from fhir_gateway.store.models import AuditRow
from tests.api.test_referral_intake import post_bundle, referral
from tests.conftest import Tokens

ROOT = Path(__file__).resolve().parents[2]


def _events(client, tokens: Tokens, **params: str) -> list[dict[str, Any]]:
    resp = client.get("/fhir/AuditEvent", params=params, headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text
    return [e["resource"] for e in resp.json()["entry"]]


def test_intake_and_reads_are_audited(client, tokens) -> None:
    body = post_bundle(client, tokens, referral()).json()
    patient = body["entry"][1]["response"]["location"].split("/_history")[0]
    task = body["entry"][3]["response"]["location"].split("/_history")[0]
    client.get(f"/fhir/{task}", headers=tokens.headers("ehr", sub="epic-1"))
    case_id = client.get("/cases", headers=tokens.headers("admin", sub="ops")).json()[0]["id"]
    client.get(f"/cases/{case_id}", headers=tokens.headers("admin", sub="ops"))

    events = _events(client, tokens, patient=patient)
    by_outcome = sorted((e["outcomeDesc"], e["action"], e["subtype"][0]["code"]) for e in events)
    assert by_outcome == [
        ("case.read", "R", "read"),
        ("referral.intake", "C", "create"),
        ("resource.read", "R", "read"),
    ]
    intake = next(e for e in events if e["outcomeDesc"] == "referral.intake")
    assert intake["agent"][0]["who"]["identifier"]["value"] == "tester"
    assert intake["type"]["code"] == "rest"
    assert intake["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientCreate")
    patient_entity = next(e for e in intake["entity"] if e.get("role", {}).get("code") == "1")
    assert patient_entity["what"]["reference"] == patient
    # request id of the HTTP request is in the transaction entity
    assert any(e["type"]["code"] == "XrequestId" for e in intake["entity"])
    assert [e["outcomeDesc"] for e in _events(client, tokens, agent="epic-1")] == ["resource.read"]
    assert _events(client, tokens, patient=patient, date="lt2000-01-01") == []
    assert len(_events(client, tokens, patient=patient, date="ge2000-01-01")) == 3


def test_audit_search_is_admin_only_and_strict(client, tokens) -> None:
    for role in ("ehr", "reviewer"):
        assert client.get("/fhir/AuditEvent", headers=tokens.headers(role)).status_code == 403
    resp = client.get(
        "/fhir/AuditEvent", params={"date": "last tuesday"}, headers=tokens.headers("admin")
    )
    assert resp.status_code == 400
    resp = client.get("/fhir/AuditEvent", params={"name": "x"}, headers=tokens.headers("admin"))
    assert resp.status_code == 400


def test_audit_events_validate_as_fhir(client, tokens) -> None:
    from fhir.resources.R4B.auditevent import AuditEvent

    post_bundle(client, tokens, referral())
    for event in _events(client, tokens):
        AuditEvent.model_validate(event)


def test_audit_verify_cli_detects_an_altered_row(client, tokens, settings) -> None:
    post_bundle(client, tokens, referral())
    client.get("/cases", headers=tokens.headers("admin"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FHIR_GATEWAY_DATA_DIR": str(settings.data_dir)}
    cmd = [sys.executable, "-m", "fhir_gateway.cli", "audit", "verify"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "audit chain verified: 2 events" in ok.stdout
    store = client.app.state.store
    with store.session() as s:
        first = s.scalars(select(AuditRow.id).order_by(AuditRow.id)).first()
        s.execute(update(AuditRow).where(AuditRow.id == first).values(agent="mallory"))
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert f"event {first}: its hash does not match" in " ".join(bad.stderr.split())
