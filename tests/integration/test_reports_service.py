"""fhir_gateway.reports: draft -> submit -> deliver_report job -> Task completed, on the real job
worker and store (SQLite; PostgreSQL with -m server), against the loopback FHIR server.

Exactly once under: submit twice, destination down for a simulated hour, a crash after the EHR
accepted the POST before we recorded it; 4xx -> dead at once with the EHR's message; the retry
window; amend and retract round trips (RF-20..RF-24).
"""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from sqlalchemy import select

from fhir_gateway.errors import ForbiddenError, NotFoundError, ValidationError
from fhir_gateway.reports import delivery, drafts
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import (
    Case,
    Delivery,
    FhirResource,
    Job,
    utcnow,
)
from tests.fhir_loopback import Fault, LoopbackFhirServer, outcome
from tests.report_helpers import (
    UNICODE_NAMES,
    draft_data,
    make_case,
    page1_dark_pixels,
    pdf_text,
    report_settings,
    run_jobs,
    time_passes,
)

ADMIN = Principal(sub="admin-1", role="admin")
REVIEWER = Principal(sub="dr-zolc", role="reviewer")
SOURCE = "https://ehr.example.org/fhir"


@pytest.fixture
def ehr(httpserver: HTTPServer) -> LoopbackFhirServer:
    return LoopbackFhirServer(httpserver)


@pytest.fixture
def rsettings(tmp_path: Path, ehr: LoopbackFhirServer, store: Store) -> Settings:
    return make_settings(tmp_path, ehr)


def make_settings(tmp_path: Path, ehr: LoopbackFhirServer, extra: str = "") -> Settings:
    return report_settings(tmp_path, ehr.base_url, extra)


@pytest.fixture
def case_id(store: Store) -> str:
    return make_case(store, reviewer=REVIEWER.sub)


def deliveries(store: Store, case_id: str) -> list[dict[str, Any]]:
    with store.session() as s:
        return drafts.list_deliveries(s, case_id, ADMIN)


def submit(store: Store, settings: Settings, case_id: str, **kw: Any) -> str:
    with store.session() as s:
        return drafts.submit(s, case_id, REVIEWER, settings, **kw).id


def save(store: Store, settings: Settings, case_id: str, **overrides: Any) -> None:
    with store.session() as s:
        drafts.save_draft(s, case_id, draft_data(**overrides), REVIEWER, settings)


def test_submit_delivers_once_and_closes_the_referral_task(
    store, rsettings, case_id, ehr, tmp_path
):
    save(store, rsettings, case_id)
    delivery_id = submit(store, rsettings, case_id)
    with store.session() as s:
        job = s.scalar(select(Job).where(Job.kind == "deliver_report"))
        assert job is not None
        assert job.state == "queued"
        assert job.dedup_key.startswith("deliver:")
        assert s.get(Case, case_id).status == "reported"
    assert run_jobs(store, rsettings) == 1
    assert ehr.count("DiagnosticReport") == 1
    assert ehr.count("Provenance") == 1  # RF-24
    (view,) = deliveries(store, case_id)
    assert view["id"] == delivery_id
    assert view["status"] == "delivered"
    assert view["lastStatusCode"] == 201
    dr = ehr.get("DiagnosticReport", view["server"]["id"])
    with store.session() as s:
        case = s.get(Case, case_id)
        report = drafts.report_view(s, case_id, ADMIN)
        task = s.get(FhirResource, ("Task", case.task_id)).body
    # RF-20: basedOn -> the referral (absolute) with the placer's identifier; subject by MRN.
    assert dr["basedOn"] == [
        {
            "reference": f"https://gateway.example.org/fhir/ServiceRequest/{case.service_request_id}",
            "identifier": {"system": "urn:oid:1.2.3.4.5", "value": "REF-77"},
        }
    ]
    assert dr["subject"]["identifier"] == {"system": "urn:oid:1.2.3.4", "value": "MRN-1"}
    assert dr["identifier"][0]["value"] == case_id
    contained = {c["id"]: c for c in dr["contained"]}
    assert contained["finding-1"]["focus"] == [{"reference": f"{SOURCE}/Condition/primary-1"}]
    assert {k: v for k, v in dr.items() if k not in ("id", "meta")} == {
        k: v for k, v in report["diagnosticReport"].items() if k not in ("id", "meta")
    }
    # RF-21: the Task is completed with the delivered report in its output.
    assert task["status"] == "completed"
    assert task["output"][0]["valueReference"]["reference"] == (
        f"{ehr.base_url}/DiagnosticReport/{view['server']['id']}"
    )
    assert case.status == "completed"
    assert report["destination"]["id"] == view["server"]["id"]
    # The PDF as the EHR holds it opens, page 1 is not blank, and the patient's name is there.
    pdf = base64.b64decode(dr["presentedForm"][0]["data"])
    dark, total = page1_dark_pixels(pdf, tmp_path)
    assert dark > total // 200
    assert UNICODE_NAMES[0] in pdf_text(pdf, tmp_path)


def test_submit_twice_delivers_once(store, rsettings, case_id, ehr):
    """(c)"""
    save(store, rsettings, case_id)
    first = submit(store, rsettings, case_id)
    second = submit(store, rsettings, case_id)
    assert first == second
    run_jobs(store, rsettings)
    third = submit(store, rsettings, case_id)
    assert third == first
    assert run_jobs(store, rsettings) == 0
    assert ehr.count("DiagnosticReport") == 1
    assert len(deliveries(store, case_id)) == 1


def test_destination_down_for_an_hour_then_recovering(store, rsettings, case_id, ehr):
    """(a): a 503 burst with Retry-After over a simulated hour, then one report."""
    ehr.faults += [Fault(503, {"Retry-After": "600"}) for _ in range(6)]
    save(store, rsettings, case_id)
    delivery_id = submit(store, rsettings, case_id)
    for attempt in range(6):
        assert run_jobs(store, rsettings, max_runs=1) == 1
        (view,) = deliveries(store, case_id)
        assert view["status"] == "pending"
        assert view["lastStatusCode"] == 503
        assert view["nextRetryAt"] is not None
        assert view["attempts"] == attempt + 1
        with store.session() as s:
            job = s.get(Job, s.get(Delivery, delivery_id).job_id)
            assert job.run_at >= utcnow() + timedelta(seconds=590)  # Retry-After honoured
        time_passes(store, delivery_id, hours=1 / 6)
    assert run_jobs(store, rsettings) == 1
    (view,) = deliveries(store, case_id)
    assert view["status"] == "delivered"
    assert view["attempts"] == 7
    assert ehr.count("DiagnosticReport") == 1


def test_crash_after_the_ehr_accepted_before_we_recorded(
    store, rsettings, case_id, ehr, monkeypatch
):
    """(b): the POST succeeded, the worker dies before recording; the re-run finds the report."""
    save(store, rsettings, case_id)
    delivery_id = submit(store, rsettings, case_id)
    real = delivery._record_success
    calls = []

    def killed(*args: Any, **kw: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("worker killed")
        real(*args, **kw)

    monkeypatch.setattr(delivery, "_record_success", killed)
    run_jobs(store, rsettings, max_runs=1)
    assert ehr.count("DiagnosticReport") == 1
    assert deliveries(store, case_id)[0]["status"] == "pending"
    time_passes(store, delivery_id)
    run_jobs(store, rsettings)
    (view,) = deliveries(store, case_id)
    assert view["status"] == "delivered"
    assert view["lastStatusCode"] == 200  # the conditional create matched
    assert ehr.count("DiagnosticReport") == 1
    assert ehr.count("Provenance") == 1


def test_ehr_rejection_is_dead_at_once_then_redelivered(store, rsettings, case_id, ehr):
    msg = "Patient MRN-1 is not registered at this facility"
    ehr.faults.append(Fault(422, body=outcome(msg), methods=("POST",)))
    save(store, rsettings, case_id)
    delivery_id = submit(store, rsettings, case_id)
    run_jobs(store, rsettings)
    (view,) = deliveries(store, case_id)
    assert view["status"] == "dead"
    assert view["attempts"] == 1
    assert view["lastStatusCode"] == 422
    assert msg in view["lastError"]
    assert view["lastOutcome"]["issue"][0]["diagnostics"] == msg
    with store.session() as s:
        assert [d["id"] for d in drafts.failed_deliveries(s)] == [delivery_id]
        assert s.get(Job, s.get(Delivery, delivery_id).job_id).state == "dead"
        drafts.redeliver(s, delivery_id)
    run_jobs(store, rsettings)
    assert deliveries(store, case_id)[0]["status"] == "delivered"
    assert ehr.count("DiagnosticReport") == 1


def test_retry_window_ends_in_dead_with_the_reason(store, rsettings, case_id, ehr):
    ehr.faults += [Fault(503) for _ in range(3)]
    save(store, rsettings, case_id)
    delivery_id = submit(store, rsettings, case_id)
    run_jobs(store, rsettings, max_runs=1)
    time_passes(store, delivery_id, hours=72)
    run_jobs(store, rsettings, max_runs=1)
    (view,) = deliveries(store, case_id)
    assert view["status"] == "dead"
    assert "delivery window of 72 h exceeded" in view["lastError"]
    assert ehr.count("DiagnosticReport") == 0


def test_amend_then_retract_update_the_same_report(store, rsettings, case_id, ehr):
    save(store, rsettings, case_id)
    submit(store, rsettings, case_id)
    run_jobs(store, rsettings)
    server_id = deliveries(store, case_id)[0]["server"]["id"]
    save(store, rsettings, case_id, conclusion="Revised: grade 3 on review of block B2.")
    submit(store, rsettings, case_id)
    ehr.bump("DiagnosticReport", server_id)  # edited on the EHR meanwhile: one conflict
    run_jobs(store, rsettings)
    stored = ehr.get("DiagnosticReport", server_id)
    assert stored["status"] == "amended"
    assert stored["conclusion"].startswith("Revised")
    with store.session() as s:
        drafts.retract(s, case_id, REVIEWER, rsettings)
    run_jobs(store, rsettings)
    assert ehr.get("DiagnosticReport", server_id)["status"] == "entered-in-error"
    assert ehr.count("DiagnosticReport") == 1
    views = deliveries(store, case_id)
    assert [(v["action"], v["status"]) for v in views] == [
        ("create", "delivered"),
        ("update", "delivered"),
        ("retract", "delivered"),
    ]
    with store.session() as s:
        assert drafts.report_view(s, case_id, ADMIN)["status"] == "retracted"


def test_refused_diagnostic_report_goes_as_document_reference_and_amends_it(
    store, rsettings, case_id, ehr
):
    ehr.refuse_types["DiagnosticReport"] = 405
    save(store, rsettings, case_id)
    submit(store, rsettings, case_id)
    run_jobs(store, rsettings)
    (view,) = deliveries(store, case_id)
    assert view["fallbackUsed"]
    assert view["server"]["type"] == "DocumentReference"
    save(store, rsettings, case_id, conclusion="Corrected conclusion.")
    submit(store, rsettings, case_id, correction=True)
    run_jobs(store, rsettings)
    doc = ehr.get("DocumentReference", view["server"]["id"])
    assert doc["docStatus"] == "amended"
    assert ehr.count("DocumentReference") == 1


def test_bad_drafts_and_access(store, rsettings, case_id):
    with store.session() as s, pytest.raises(ValidationError) as err:
        drafts.save_draft(
            s,
            case_id,
            draft_data(
                findings=[{"kind": "grade", "value_text": "G2", "focus": ["Condition/zzz"]}]
            ),
            REVIEWER,
            rsettings,
        )
    assert err.value.expression == ["findings.0.focus.0"]
    with store.session() as s, pytest.raises(ValidationError):
        drafts.save_draft(s, case_id, {"kind": "pathology"}, REVIEWER, rsettings)
    stranger = Principal(sub="someone-else", role="reviewer")
    with store.session() as s, pytest.raises(ForbiddenError):
        drafts.save_draft(s, case_id, draft_data(), stranger, rsettings)
    with store.session() as s, pytest.raises(NotFoundError):
        drafts.submit(s, case_id, REVIEWER, rsettings)


def test_task_on_the_destination_is_completed_even_after_a_failed_first_try(
    store, tmp_path, case_id, ehr
):
    """RF-21 with the Task held by the EHR; its update hits a 503 once, the job finishes it."""
    settings = make_settings(tmp_path, ehr, "task_on_destination = true\nuse_transaction = true")
    ehr.put_resource(
        {
            "resourceType": "Task",
            "id": "ehr-task",
            "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": "TASK-77"}],
            "status": "in-progress",
            "intent": "order",
        }
    )
    ehr.faults.append(Fault(503, methods=("PUT",)))
    save(store, settings, case_id)
    delivery_id = submit(store, settings, case_id)
    run_jobs(store, settings, max_runs=1)
    assert ehr.count("DiagnosticReport") == 1
    assert ehr.count("Observation") == 5  # use_transaction: separate resources
    assert ehr.get("Task", "ehr-task")["status"] == "in-progress"
    assert deliveries(store, case_id)[0]["status"] == "delivered"
    time_passes(store, delivery_id)
    run_jobs(store, settings)
    task = ehr.get("Task", "ehr-task")
    assert task["status"] == "completed"
    server_id = deliveries(store, case_id)[0]["server"]["id"]
    assert task["output"][0]["valueReference"] == {"reference": f"DiagnosticReport/{server_id}"}
    assert ehr.count("DiagnosticReport") == 1


def test_concurrent_submits_make_one_delivery(store, rsettings, case_id, ehr):
    """(c) with two gateway processes: the report row lock serialises the submits."""
    import threading

    save(store, rsettings, case_id)
    barrier = threading.Barrier(2)
    results: list[str] = []
    errors: list[BaseException] = []

    def go() -> None:
        barrier.wait()
        try:
            results.append(submit(store, rsettings, case_id))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(set(results)) == 1
    run_jobs(store, rsettings)
    assert len(deliveries(store, case_id)) == 1
    assert ehr.count("DiagnosticReport") == 1
