"""More recipients of the report (issue "Close the loop" part 2): per partner, further
destinations in the partners file, each delivered exactly once with its own status in
`GET /cases/{id}/deliveries`; concurrent workers on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from fhir_gateway import job_handlers, jobs
from fhir_gateway.reports import drafts
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Case, FhirResource
from tests.fhir_loopback import LoopbackFhirServer
from tests.report_helpers import draft_data, make_case, report_settings, run_jobs

ADMIN = Principal(sub="admin-1", role="admin")
REVIEWER = Principal(sub="dr-zolc", role="reviewer")


@pytest.fixture
def ehr(httpserver: HTTPServer) -> LoopbackFhirServer:
    return LoopbackFhirServer(httpserver)


@pytest.fixture
def lab() -> Iterator[LoopbackFhirServer]:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    yield LoopbackFhirServer(server)
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture
def gp() -> Iterator[LoopbackFhirServer]:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    yield LoopbackFhirServer(server)
    server.clear()
    if server.is_running():
        server.stop()


def recipients_toml(**urls: str) -> str:
    return "".join(
        f'\n[[partners.recipients]]\nname = "{name}"\nbase_url = "{url}"\ntimeout_s = 5\n'
        for name, url in urls.items()
    )


@pytest.fixture
def rsettings(
    tmp_path: Path,
    ehr: LoopbackFhirServer,
    lab: LoopbackFhirServer,
    gp: LoopbackFhirServer,
    store: Store,
) -> Settings:
    extra = recipients_toml(**{"pathology-lab": lab.base_url, "primary-care": gp.base_url})
    return report_settings(tmp_path, ehr.base_url, extra)


def _views(store: Store, case_id: str) -> list[dict[str, Any]]:
    with store.session() as s:
        return drafts.list_deliveries(s, case_id, ADMIN)


def _submit(store: Store, settings: Settings, case_id: str) -> None:
    with store.session() as s:
        drafts.submit(s, case_id, REVIEWER, settings)


def test_each_recipient_gets_its_own_delivery_once(store, rsettings, ehr, lab, gp):
    case_id = make_case(store, reviewer=REVIEWER.sub)
    with store.session() as s:
        drafts.save_draft(s, case_id, draft_data(), REVIEWER, rsettings)
    _submit(store, rsettings, case_id)
    _submit(store, rsettings, case_id)  # again, unedited: nothing new
    assert run_jobs(store, rsettings) == 3
    views = _views(store, case_id)
    assert [(v["recipient"], v["status"], v["action"]) for v in views] == [
        ("destination", "delivered", "create"),
        ("pathology-lab", "delivered", "create"),
        ("primary-care", "delivered", "create"),
    ]
    assert (ehr.count("DiagnosticReport"), lab.count("DiagnosticReport")) == (1, 1)
    assert gp.count("DiagnosticReport") == 1
    with store.session() as s:  # only the treating EHR's delivery completes the Task
        case = s.get(Case, case_id)
        task = s.get(FhirResource, ("Task", case.task_id)).body
    assert len(task["output"]) == 1
    assert task["output"][0]["valueReference"]["reference"].startswith(ehr.base_url)
    # An amendment updates each recipient's own copy (its own server id), once.
    with store.session() as s:
        drafts.save_draft(s, case_id, draft_data(conclusion="Amended."), REVIEWER, rsettings)
    _submit(store, rsettings, case_id)
    assert run_jobs(store, rsettings) == 3
    v2 = [v for v in _views(store, case_id) if v["reportVersion"] == 2]
    assert [(v["recipient"], v["status"], v["action"]) for v in v2] == [
        ("destination", "delivered", "update"),
        ("pathology-lab", "delivered", "update"),
        ("primary-care", "delivered", "update"),
    ]
    for server, view in zip((ehr, lab, gp), v2, strict=True):
        assert server.count("DiagnosticReport") == 1
        assert server.get("DiagnosticReport", view["server"]["id"])["status"] == "amended"


def test_a_recipient_down_does_not_hold_the_others(store, rsettings, ehr, lab, gp):
    case_id = make_case(store, reviewer=REVIEWER.sub)
    with store.session() as s:
        drafts.save_draft(s, case_id, draft_data(), REVIEWER, rsettings)
    lab.httpserver.stop()
    _submit(store, rsettings, case_id)
    run_jobs(store, rsettings, max_runs=3)
    status = {v["recipient"]: v["status"] for v in _views(store, case_id)}
    assert status == {
        "destination": "delivered",
        "pathology-lab": "pending",
        "primary-care": "delivered",
    }
    lab.httpserver.start()
    deadline = time.monotonic() + 30
    while _views(store, case_id)[1]["status"] != "delivered" and time.monotonic() < deadline:
        run_jobs(store, rsettings)
        time.sleep(0.05)
    assert _views(store, case_id)[1]["status"] == "delivered"
    assert lab.count("DiagnosticReport") == 1


def test_concurrent_workers_deliver_each_recipient_once(store, rsettings, ehr, lab, gp):
    """Four worker threads on one store (SQLite; PostgreSQL with SKIP LOCKED), five cases with
    three recipients each: every server holds exactly one report per case."""
    case_ids = []
    for i in range(5):
        with store.session() as s:
            src = s.get(Case, "0b7f3c52-6d0e-4c61-9a53-3f3d1f0f7a11")
        if src is None:
            case_ids.append(make_case(store, reviewer=REVIEWER.sub))
        else:
            case_ids.append(_clone_case(store, i))
    for cid in case_ids:
        with store.session() as s:
            drafts.save_draft(s, cid, draft_data(), REVIEWER, rsettings)
        _submit(store, rsettings, cid)
    job_handlers.register_all()
    workers = [
        jobs.Worker(store, rsettings, name=f"w{i}", kinds=["deliver_report"]) for i in range(4)
    ]
    threads = [threading.Thread(target=w.run_forever, daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(
            v["status"] == "delivered" for cid in case_ids for v in _views(store, cid)
        ):
            time.sleep(0.1)
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(30)
    for cid in case_ids:
        views = _views(store, cid)
        assert [v["status"] for v in views] == ["delivered"] * 3
        assert [v["attempts"] for v in views] == [1, 1, 1]
    for server in (ehr, lab, gp):
        assert server.count("DiagnosticReport") == 5
        assert server.count("Provenance") == 5


def _clone_case(store: Store, i: int) -> str:
    """Another case like make_case's, under a new id (make_case uses a fixed one)."""
    import uuid

    from fhir_gateway.intake import hosted
    from fhir_gateway.store.models import Assignment, StoredResource

    cid = str(uuid.UUID(int=i + 1))
    with store.session() as s:
        src = s.get(Case, "0b7f3c52-6d0e-4c61-9a53-3f3d1f0f7a11")
        assert src is not None
        task = hosted.create(
            s,
            {
                "resourceType": "Task",
                "status": "received",
                "intent": "order",
                "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": f"TASK-{i}"}],
            },
            partner_id="st-elsewhere",
        )
        src_sr = s.get(FhirResource, ("ServiceRequest", src.service_request_id))
        assert src_sr is not None
        sr = hosted.create(  # a case per ServiceRequest (unique): each clone gets its own
            s,
            {
                **{k: v for k, v in src_sr.body.items() if k not in ("id", "meta")},
                "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": f"SR-{i}"}],
            },
            partner_id="st-elsewhere",
        )
        s.add(
            Case(
                id=cid,
                partner_id="st-elsewhere",
                status="received",
                task_id=task.id,
                service_request_id=sr.id,
                patient_ref=src.patient_ref,
            )
        )
        s.flush()
        task.case_id = cid
        for rtype, rid in (("Condition", "primary-1"), ("DiagnosticReport", "path-1")):
            s.add(
                StoredResource(
                    case_id=cid,
                    source="https://ehr.example.org/fhir",
                    resource_type=rtype,
                    source_id=rid,
                    body={"resourceType": rtype, "id": rid},
                )
            )
        s.add(Assignment(case_id=cid, reviewer=REVIEWER.sub, assigned_by="admin-1"))
    return cid
