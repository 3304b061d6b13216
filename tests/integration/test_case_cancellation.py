"""Cancellation and rejection stop the case (STANDARDS RF-03): the trust-issue finding was a
pull that finished, a report submitted and delivered, and a case moving from cancelled to
reported after the EHR had cancelled its Task.

The partner EHR is the sandbox on loopback (SMART enforced), slowed with its latency fault so the
cancellation lands in the middle of the pull; the worker runs in a thread as in production.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fhir_gateway import jobs
from fhir_gateway.app import create_app
from fhir_gateway.errors import CaseClosedError
from fhir_gateway.reports import delivery
from fhir_gateway.sandbox import Faults, SandboxServer
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import (
    Case,
    CaseBundleState,
    Delivery,
    FhirResource,
    Job,
    StoredResource,
)
from tests.conftest import FHIR_JSON, SYNTHEA, Tokens, load_fixture, partner_sandbox
from tests.integration.test_report_delivery_sandbox import REVIEWER, Flow, configure_partner
from tests.report_helpers import draft_data, report_fonts


@pytest.fixture
def ehr(settings: Settings) -> Iterator[SandboxServer]:
    report_fonts()
    # 50 per page: the patient's record takes many pages, each slowed by the latency fault.
    server = partner_sandbox(settings, SYNTHEA / "colon_Lourdes_Alcantar.json", max_page_size=50)
    configure_partner(settings, server.base_url)
    yield server
    server.stop()


@pytest.fixture
def flow(settings: Settings, ehr: SandboxServer, tokens: Tokens) -> Iterator[Flow]:
    app = create_app(settings, configure_logs=False)
    with TestClient(app) as c:
        yield Flow(c, tokens, settings, ehr)


def refer(flow: Flow) -> str:
    resp = flow.client.post(
        "/fhir",
        json=load_fixture("referrals/referral-transaction.json"),
        headers=flow.tokens.headers("ehr") | FHIR_JSON,
    )
    assert resp.status_code == 200, resp.text
    case_id = str(flow.client.get("/cases", headers=flow.admin()).json()[0]["id"])
    resp = flow.client.post(
        f"/cases/{case_id}/assignments", json={"reviewer": REVIEWER}, headers=flow.admin()
    )
    assert resp.status_code == 201, resp.text
    return case_id


def task_id_of(flow: Flow, case_id: str) -> str:
    with flow.store.session() as s:
        case = s.get(Case, case_id)
        assert case is not None
        return case.task_id


def close_case(flow: Flow, case_id: str, how: str) -> None:
    """`cancel`: the EHR PUTs its Task cancelled at /fhir; `reject`: an admin rejects it."""
    if how == "cancel":
        task_id = task_id_of(flow, case_id)
        task = flow.client.get(f"/fhir/Task/{task_id}", headers=flow.tokens.headers("ehr")).json()
        task |= {"status": "cancelled", "statusReason": {"text": "patient went elsewhere"}}
        resp = flow.client.put(
            f"/fhir/Task/{task_id}", json=task, headers=flow.tokens.headers("ehr") | FHIR_JSON
        )
    else:
        resp = flow.client.post(
            f"/cases/{case_id}/status",
            json={"status": "rejected", "reason": "out of scope"},
            headers=flow.admin(),
        )
    assert resp.status_code == 200, resp.text


def job_rows(flow: Flow, case_id: str) -> list[Job]:
    with flow.store.session() as s:
        return list(s.scalars(select(Job).where(Job.case_id == case_id).order_by(Job.created_at)))


def writes_to_ehr(ehr: SandboxServer) -> int:
    return sum(
        1
        for e in ehr.state.log
        if e.method in ("POST", "PUT")
        and e.path != "/auth/token"
        and not e.path.endswith("/_search")
    )


def assert_409_case_closed(resp: Any) -> None:
    assert resp.status_code == 409, resp.text
    issue = resp.json()["issue"][0]
    assert issue["code"] == "business-rule"
    assert issue["expression"] == ["Task.status"]
    assert "is cancelled" in issue["diagnostics"] or "is rejected" in issue["diagnostics"]


@pytest.mark.parametrize("how", ["cancel", "reject"])
def test_closing_the_case_during_a_slow_pull_writes_nothing_and_stops(
    flow: Flow, ehr: SandboxServer, how: str
) -> None:
    ehr.state.config.faults = Faults(latency_s=0.3)
    case_id = refer(flow)
    worker = jobs.Worker(flow.store, flow.settings, name="puller", kinds=["pull_fhir"])
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the pull has fetched its first page
            pull = next(j for j in job_rows(flow, case_id) if j.kind == "pull_fhir")
            if pull.progress:
                break
            assert time.monotonic() < deadline, "the pull never reported a page"
            time.sleep(0.05)
        close_case(flow, case_id, how)
        requests_at_close = ehr.state.counter
    finally:
        thread.join(120)
    assert not thread.is_alive()

    by_kind = {j.kind: j for j in job_rows(flow, case_id)}
    pull = by_kind["pull_fhir"]
    assert pull.state == jobs.CANCELLED, (pull.state, pull.last_error)
    assert "CaseClosedError" in (pull.last_error or "")
    assert pull.attempts == 1  # not retried
    # It stopped at its next page: at most the one request in flight went out after the close.
    assert ehr.state.counter - requests_at_close <= 1
    # Nothing was normalised, and nothing of the case is left to run.
    assert "normalise_case" not in by_kind
    assert {j.state for j in by_kind.values()} == {jobs.CANCELLED}
    with flow.store.session() as s:
        assert s.scalar(select(func.count()).where(StoredResource.case_id == case_id)) == 0
        assert s.get(CaseBundleState, case_id) is None
        case = s.get(Case, case_id)
        assert case is not None
        status = case.status
    assert status == ("cancelled" if how == "cancel" else "rejected")

    # The reviewer can neither save nor submit; nothing is ever delivered.
    resp = flow.client.put(f"/cases/{case_id}/report", json=draft_data(), headers=flow.reviewer())
    assert_409_case_closed(resp)
    assert_409_case_closed(
        flow.client.post(f"/cases/{case_id}/report/$submit", headers=flow.reviewer())
    )
    assert flow.run_jobs() == 0  # nothing left to run for the case
    assert writes_to_ehr(ehr) == 0
    detail = flow.client.get(f"/cases/{case_id}", headers=flow.admin()).json()
    assert detail["status"] == status


def test_cancel_after_submit_cancels_the_delivery_and_the_case_stays_cancelled(
    flow: Flow, ehr: SandboxServer
) -> None:
    case_id = refer(flow)
    flow.run_jobs()
    flow.put_report(case_id)
    submitted = flow.submit(case_id)
    assert flow.client.get(f"/cases/{case_id}", headers=flow.admin()).json()["status"] == (
        "reported"
    )

    close_case(flow, case_id, "cancel")

    task_id = task_id_of(flow, case_id)
    with flow.store.session() as s:
        d = s.get(Delivery, submitted["id"])
        assert d is not None
        assert d.status == "cancelled"
        job = s.get(Job, d.job_id)
        assert job is not None
        assert job.state == jobs.CANCELLED
        task = s.get(FhirResource, ("Task", task_id))
        assert task is not None
        assert task.body["status"] == "cancelled"
    # The delivery step itself refuses too, before sending (a job claimed before the cancel).
    partner = flow.settings.partners.by_id("st-elsewhere")
    with pytest.raises(CaseClosedError):
        delivery.run_delivery(flow.store, flow.settings, partner, submitted["id"])
    flow.run_jobs()
    assert writes_to_ehr(ehr) == 0
    assert flow.reports_on_server(case_id) == []
    detail = flow.client.get(f"/cases/{case_id}", headers=flow.admin()).json()
    assert detail["status"] == "cancelled"
    assert_409_case_closed(
        flow.client.post(f"/cases/{case_id}/report/$submit", headers=flow.reviewer())
    )


# --- the queue: workers racing with the cancellation, on SQLite and PostgreSQL ---------------

PROBE = "cancel_probe"


def _probe(ctx: jobs.JobContext) -> None:
    """A job that writes one row for its case, as a pull does: checkpoint, then write under the
    case lock."""
    assert ctx.case_id is not None
    ctx.checkpoint("probing")
    with ctx.store.session() as s:
        jobs.require_case_open(s, ctx.case_id, "probing")
        s.add(
            StoredResource(
                case_id=ctx.case_id,
                source="probe",
                resource_type="Basic",
                source_id=ctx.job_id,
                body={"resourceType": "Basic"},
            )
        )


def test_workers_racing_a_cancellation_write_nothing_after_it(store: Any, settings: Settings):
    from fhir_gateway.intake import hosted, tasks

    jobs.register_handler(PROBE, _probe)
    with store.session() as s:
        task = hosted.create(
            s,
            {"resourceType": "Task", "status": "received", "intent": "order"},
            partner_id="st-elsewhere",
        )
        s.add(
            Case(
                id="case-race",
                partner_id="st-elsewhere",
                status="received",
                task_id=task.id,
                service_request_id="sr",
                patient_ref="Patient/p",
            )
        )
        s.flush()
        task.case_id = "case-race"
        for _ in range(60):
            jobs.enqueue(s, PROBE, case_id="case-race")
    workers = [jobs.Worker(store, settings, name=f"w{i}", kinds=[PROBE]) for i in range(6)]
    threads = [threading.Thread(target=w.run_forever) for w in workers]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # some jobs have run: the cancellation lands among running workers
            with store.session() as s:
                if s.scalar(select(func.count()).where(StoredResource.case_id == "case-race")):
                    break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with store.session() as s:
            row = hosted.read(s, "Task", task.id)
            tasks.transition_task(s, row, "cancelled", "withdrawn")
        with store.session() as s:
            written_at_cancel = s.scalar(
                select(func.count()).where(StoredResource.case_id == "case-race")
            )
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(60)
    with store.session() as s:
        written = s.scalar(select(func.count()).where(StoredResource.case_id == "case-race"))
        states = list(s.scalars(select(Job.state).where(Job.case_id == "case-race")))
    assert written == written_at_cancel  # nothing after the cancellation committed
    assert set(states) <= {jobs.DONE, jobs.CANCELLED}, set(states)
    assert states.count(jobs.DONE) == written  # every job that ran wrote once, no retries
    assert states.count(jobs.CANCELLED) >= 1
