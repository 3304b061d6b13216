"""Closing the loop with the treating team, end to end against the sandbox EHR (SMART):
further recipients each delivered once (a worker SIGKILLed during a recipient's delivery
included); a follow-up question pushed by the EHR -> the reviewer's answer -> the amended
report read back from the EHR with the addendum in its conclusion and PDF, plus the reply
Communication; the questions limit; Task status changes written to the partner's EHR."""
# ruff: noqa: F811  (the sandbox flow's fixtures are imported from the delivery tests)

from __future__ import annotations

import base64
import re
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connectors.smart import load_private_key, public_jwk
from fhir_gateway.sandbox import SandboxServer
from fhir_gateway.sandbox.app import SandboxClient, SandboxConfig
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import Case, Delivery, FhirResource, Job, utcnow
from tests.conftest import FHIR_JSON
from tests.integration.test_report_delivery_sandbox import (  # noqa: F401 (fixtures)
    REPORT_SYSTEM,
    Flow,
    _worker_process,
    app_client,
    ehr,
    flow,
)
from tests.notify_helpers import run_notify_jobs
from tests.report_helpers import pdf_text

ROOT = Path(__file__).resolve().parents[2]
REFERRAL_TASK = ("urn:oid:2.16.840.1.113883.3.9999.2", "TASK-2026-0001")


@pytest.fixture
def lab(settings: Settings, ehr: SandboxServer) -> Iterator[SandboxServer]:
    """A second EHR (the pathology lab) that trusts the same gateway key (SMART)."""
    key = load_private_key(settings.data_dir / "keys" / "st-elsewhere.pem")
    client = SandboxClient("fhir-gateway", {"keys": [public_jwk(key, kid="gw-1")]})
    server = SandboxServer(SandboxConfig(clients={"fhir-gateway": client})).start()
    yield server
    server.stop()


def add_to_partner(settings: Settings, *, partner_keys: str = "", tables: str = "") -> None:
    """Add keys to St Elsewhere's [[partners]] table, and tables (e.g. recipients) to it."""
    path = settings.data_dir / "partners.toml"
    text = path.read_text()
    anchor = 'value = "st-elsewhere" }\n'
    text = text.replace(anchor, anchor + partner_keys + "\n", 1)
    if tables:
        text = text.replace("[partners.client]", tables + "\n[partners.client]", 1)
    path.write_text(text)
    settings.__dict__.pop("partners", None)


def recipient_table(lab: SandboxServer) -> str:
    auth = (
        '{ type = "smart", client_id = "fhir-gateway", '
        'key_file = "keys/st-elsewhere.pem", kid = "gw-1" }'
    )
    return (
        f'[[partners.recipients]]\nname = "pathology-lab"\nbase_url = "{lab.base_url}"\n'
        f"auth = {auth}\n"
    )


def reports_on(server: SandboxServer, case_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in server.state.store.all("DiagnosticReport")
        if (r.get("identifier") or [{}])[0].get("value") == case_id
    ]


def delivered_case(flow: Flow) -> str:
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    flow.submit(case_id)
    flow.run_jobs()
    return case_id


def test_two_recipients_each_once_with_a_worker_sigkilled(flow, settings, lab):
    add_to_partner(settings, tables=recipient_table(lab))
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    flow.submit(case_id)
    lab.state.config.faults.write_response_delay_s = 30
    proc = _worker_process(flow.settings)
    try:
        deadline = time.monotonic() + 60
        while not reports_on(lab, case_id):  # the lab committed; its 201 is on its way
            assert proc.poll() is None, (settings.data_dir / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker never reached the lab"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lab.state.config.faults.write_response_delay_s = 0
    with flow.store.session() as s:  # the dead worker's lease runs out (simulated)
        for job in s.scalars(select(Job).where(Job.state == "running")):
            job.lease_expires_at = utcnow() - timedelta(seconds=1)
    flow.run_jobs()
    views = flow.deliveries(case_id)
    assert [(v["recipient"], v["status"]) for v in views] == [
        ("destination", "delivered"),
        ("pathology-lab", "delivered"),
    ]
    assert len(reports_on(flow.ehr, case_id)) == 1
    assert len(reports_on(lab, case_id)) == 1  # the conditional create matched on resume
    assert flow.run_jobs() == 0


def _ask(flow: Flow, case_id: str, text: str, ident: str) -> Any:
    with flow.store.session() as s:
        case = s.get(Case, case_id)
        assert case is not None
        sr_row = s.get(FhirResource, ("ServiceRequest", case.service_request_id))
        assert sr_row is not None
        sr = sr_row.body
        server_id = s.scalar(
            select(Delivery.server_id).where(
                Delivery.case_id == case_id, Delivery.recipient == "destination"
            )
        )
    comm = {
        "resourceType": "Communication",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.7", "value": ident}],
        "status": "completed",
        "basedOn": [{"identifier": {k: sr["identifier"][0][k] for k in ("system", "value")}}],
        "about": [{"reference": f"{flow.ehr.base_url}/DiagnosticReport/{server_id}"}],
        "sender": {"display": "Dr Treating Oncologist"},
        "payload": [{"contentString": text}],
    }
    return flow.client.post(
        "/fhir/Communication", json=comm, headers=flow.tokens.headers("ehr") | FHIR_JSON
    )


def test_question_answered_as_an_amended_report_and_a_reply(flow, settings, tmp_path):
    settings.reports.max_questions_per_case = 2
    case_id = delivered_case(flow)
    resp = _ask(flow, case_id, "Was HER2 retested on the excision specimen?", "Q-1")
    assert resp.status_code == 201, resp.text
    comm_id = resp.json()["id"]
    assert (
        _ask(flow, case_id, "Was HER2 retested on the excision specimen?", "Q-1").status_code == 200
    )
    # The reviewer sees it on the case.
    detail = flow.client.get(f"/cases/{case_id}", headers=flow.reviewer()).json()
    assert detail["questions"]["open"] == 1
    [q] = flow.client.get(f"/cases/{case_id}/questions", headers=flow.reviewer()).json()
    assert q["text"] == "Was HER2 retested on the excision specimen?"
    # Another partner cannot ask about it (and learns nothing about it).
    other = flow.tokens.headers("ehr", partner="mercy-north") | FHIR_JSON
    with flow.store.session() as s:
        body = s.get(FhirResource, ("Communication", comm_id)).body
    resp = flow.client.post(
        "/fhir/Communication",
        json={**body, "identifier": [{"system": "x", "value": "y"}]},
        headers=other,
    )
    assert resp.status_code == 422
    assert resp.json()["issue"][0]["expression"] == ["Communication.about"]
    # The answer: an addendum, the report amended and delivered once, the reply created once.
    answer = "Yes: HER2 IHC 1+ on the excision, ISH not amplified."
    resp = flow.client.post(
        f"/cases/{case_id}/questions/{q['id']}/answer",
        json={"text": answer},
        headers=flow.reviewer(),
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "answered"
    flow.run_jobs(max_runs=20)
    views = flow.deliveries(case_id)
    assert [(v["reportVersion"], v["action"], v["status"]) for v in views] == [
        (1, "create", "delivered"),
        (2, "update", "delivered"),
    ]
    [on_ehr] = reports_on(flow.ehr, case_id)
    read_back = flow.sink().read(f"DiagnosticReport/{on_ehr['id']}")
    assert read_back["status"] == "amended"
    assert answer in read_back["conclusion"]
    assert "Was HER2 retested" in read_back["conclusion"]
    pdf = base64.b64decode(read_back["presentedForm"][0]["data"])
    text = re.sub(r"\s+", " ", pdf_text(pdf, tmp_path))
    assert "Addenda" in text
    assert "ISH not amplified" in text
    replies = flow.ehr.state.store.all("Communication")
    assert len(replies) == 1
    reply = replies[0]
    assert reply["inResponseTo"][0]["reference"].endswith(f"/fhir/Communication/{comm_id}")
    assert reply["inResponseTo"][0]["identifier"]["value"] == "Q-1"
    assert reply["about"] == [{"reference": f"DiagnosticReport/{on_ehr['id']}"}]
    assert reply["payload"] == [{"contentString": answer}]
    assert flow.run_jobs() == 0  # nothing left, nothing twice
    [q] = flow.client.get(f"/cases/{case_id}/questions", headers=flow.reviewer()).json()
    assert (q["status"], q["reportVersion"]) == ("answered", 2)
    # The limit: two questions per case here; the third is refused and nothing is stored.
    assert _ask(flow, case_id, "And the Ki-67?", "Q-2").status_code == 201
    resp = _ask(flow, case_id, "And the margins?", "Q-3")
    assert resp.status_code == 422
    assert "at most 2" in resp.json()["issue"][0]["diagnostics"]
    assert "margins" not in resp.text
    detail = flow.client.get(f"/cases/{case_id}", headers=flow.reviewer()).json()
    assert (detail["questions"]["total"], detail["questions"]["open"]) == (2, 1)


def test_bad_questions_are_refused_with_the_rule(flow):
    case_id = delivered_case(flow)
    with flow.store.session() as s:
        server_id = s.scalar(select(Delivery.server_id).where(Delivery.case_id == case_id))
    base = {
        "resourceType": "Communication",
        "status": "completed",
        "about": [{"reference": f"DiagnosticReport/{server_id}"}],
        "payload": [{"contentString": "Question?"}],
    }
    cases = [
        (base, "Communication.basedOn"),  # no link to the referral
        ({**base, "payload": []}, "Communication.payload"),
        ({**base, "about": [{"reference": "DiagnosticReport/not-ours"}]}, "Communication.about"),
    ]
    for body, where in cases:
        resp = flow.client.post(
            "/fhir/Communication", json=body, headers=flow.tokens.headers("ehr") | FHIR_JSON
        )
        assert resp.status_code == 422, resp.text
        assert resp.json()["issue"][0]["expression"] == [where]
    assert flow.ehr.state.store.all("Communication") == []
    with flow.store.session() as s:
        assert (
            s.scalars(
                select(FhirResource).where(FhirResource.resource_type == "Communication")
            ).all()
            == []
        )


def test_task_status_changes_written_to_the_partners_ehr(flow, settings, ehr):
    """`task_updates = "write"`: each change of the referral Task is put on the EHR's Task once."""
    add_to_partner(settings, partner_keys='task_updates = "write"')
    ehr.state.store.update(
        {
            "resourceType": "Task",
            "id": "ehr-task-1",
            "identifier": [dict(zip(("system", "value"), REFERRAL_TASK, strict=True))],
            "status": "requested",
            "intent": "order",
        },
        None,
    )
    case_id = flow.refer_and_pull()
    run_notify_jobs(flow.store, settings)
    assert flow.sink().read("Task/ehr-task-1")["status"] == "received"
    for status in ("accepted", "in-progress"):
        resp = flow.client.post(
            f"/cases/{case_id}/status", json={"status": status}, headers=flow.admin()
        )
        assert resp.status_code == 200, resp.text
    run_notify_jobs(flow.store, settings)
    task = flow.sink().read("Task/ehr-task-1")
    assert task["status"] == "in-progress"
    puts = [e for e in ehr.state.log if e.method == "PUT" and e.path == "/fhir/Task/ehr-task-1"]
    assert len(puts) == 3  # one write per change
    assert run_notify_jobs(flow.store, settings) == 0
