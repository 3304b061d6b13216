"""Report delivery end to end against the sandbox EHR with SMART enforced (issue 5, RF-20..24).

Referral in over the API -> records pulled from the sandbox (SMART) -> reviewer assigned ->
PUT /cases/{id}/report -> POST $submit -> the job worker runs deliver_report -> the sandbox holds
the DiagnosticReport, read back over HTTP and compared with what we sent. Exactly once under an
outage of a simulated hour, a SIGKILLed worker process, and a repeated $submit; a 422 is dead at
once with the EHR's words; a revoked token is renewed once; amend and retract survive a version
conflict made by someone else on the EHR.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy import select

from fhir_gateway import cli, job_handlers
from fhir_gateway.app import create_app
from fhir_gateway.errors import ConflictError
from fhir_gateway.records import pull
from fhir_gateway.reports import delivery
from fhir_gateway.sandbox import SandboxServer
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Case, Delivery, FhirResource, Job, StoredResource, utcnow
from tests.conftest import FHIR_JSON, SYNTHEA, Tokens, load_fixture, partner_sandbox
from tests.report_helpers import (
    draft_data,
    page1_dark_pixels,
    pdf_text,
    report_fonts,
    run_jobs,
    time_passes,
)

ROOT = Path(__file__).resolve().parents[2]
REVIEWER = "dr-zolc"
REPORT_SYSTEM = "urn:fhir-gateway:report"
REFERRAL_TASK = ("urn:oid:2.16.840.1.113883.3.9999.2", "TASK-2026-0001")


def configure_partner(settings: Settings, base_url: str, extra_destination: str = "") -> None:
    """The example partners file pointed at the sandbox (pull and destination, SMART), without
    the PACS (imaging is tested elsewhere); `extra_destination` adds destination settings."""
    partners = settings.data_dir / "partners.toml"
    text = partners.read_text().replace("http://127.0.0.1:8181/fhir", base_url)
    if "[partners.dicomweb]" in text:
        text = (
            text[: text.index("[partners.dicomweb]")] + text[text.index("[partners.destination]") :]
        )
    text = re.sub(
        r"^\[partners\.destination\].*$",
        lambda _: f"[partners.destination]\n{extra_destination}",
        text,
        count=1,
        flags=re.MULTILINE,
    )
    partners.write_text(text)
    settings.__dict__.pop("partners", None)  # Settings caches the parsed file


@pytest.fixture
def ehr(settings: Settings) -> Iterator[SandboxServer]:
    report_fonts()  # skip early when the fonts are missing
    server = partner_sandbox(settings, SYNTHEA / "colon_Lourdes_Alcantar.json")
    configure_partner(settings, server.base_url)
    yield server
    server.stop()


@pytest.fixture
def app_client(settings: Settings, ehr: SandboxServer) -> Iterator[TestClient]:
    app = create_app(settings, configure_logs=False)
    with TestClient(app) as c:
        yield c


class Flow:
    """The gateway as its users drive it: over the API, with the job worker in process."""

    def __init__(
        self, client: TestClient, tokens: Tokens, settings: Settings, ehr: SandboxServer
    ) -> None:
        self.client, self.tokens, self.settings, self.ehr = client, tokens, settings, ehr
        self.store: Store = client.app.state.store  # type: ignore[attr-defined]
        job_handlers.register_all()

    def admin(self) -> dict[str, str]:
        return self.tokens.headers("admin", sub="admin-1")

    def reviewer(self) -> dict[str, str]:
        return self.tokens.headers("reviewer", sub=REVIEWER)

    def refer_and_pull(self) -> str:
        bundle: dict[str, Any] = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
        resp = self.client.post(
            "/fhir", json=bundle, headers=self.tokens.headers("ehr") | FHIR_JSON
        )
        assert resp.status_code == 200, resp.text
        case_id = str(self.client.get("/cases", headers=self.admin()).json()[0]["id"])
        self.run_jobs()
        detail = self.client.get(f"/cases/{case_id}", headers=self.admin()).json()
        pull = next(j for j in detail["jobs"] if j["kind"] == "pull_fhir")
        assert pull["state"] == "done", pull
        resp = self.client.post(
            f"/cases/{case_id}/assignments", json={"reviewer": REVIEWER}, headers=self.admin()
        )
        assert resp.status_code == 201, resp.text
        return case_id

    def pulled(self, case_id: str, rtype: str) -> str:
        with self.store.session() as s:
            row = s.scalars(
                select(StoredResource)
                .where(StoredResource.case_id == case_id, StoredResource.resource_type == rtype)
                .order_by(StoredResource.source_id)
            ).first()
            assert row is not None
            return str(row.source_id)

    def draft(self, case_id: str, **overrides: Any) -> dict[str, Any]:
        data = draft_data(**overrides)
        condition = f"Condition/{self.pulled(case_id, 'Condition')}"
        report = f"DiagnosticReport/{self.pulled(case_id, 'DiagnosticReport')}"
        for finding in data["findings"]:
            if "focus" in finding:
                finding["focus"] = [condition]
            if "derived_from" in finding:
                finding["derived_from"] = [report]
        return data

    def put_report(self, case_id: str, **overrides: Any) -> None:
        resp = self.client.put(
            f"/cases/{case_id}/report",
            json=self.draft(case_id, **overrides),
            headers=self.reviewer(),
        )
        assert resp.status_code == 200, resp.text

    def submit(self, case_id: str) -> dict[str, Any]:
        resp = self.client.post(f"/cases/{case_id}/report/$submit", headers=self.reviewer())
        assert resp.status_code == 202, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def retract(self, case_id: str) -> dict[str, Any]:
        resp = self.client.post(f"/cases/{case_id}/report/$retract", headers=self.reviewer())
        assert resp.status_code == 202, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def run_jobs(self, max_runs: int = 10) -> int:
        return run_jobs(self.store, self.settings, max_runs=max_runs)

    def deliveries(self, case_id: str) -> list[dict[str, Any]]:
        resp = self.client.get(f"/cases/{case_id}/deliveries", headers=self.admin())
        assert resp.status_code == 200, resp.text
        out: list[dict[str, Any]] = resp.json()
        return out

    def report(self, case_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get(
            f"/cases/{case_id}/report", headers=self.admin()
        ).json()
        return body

    def time_passes(self, delivery_id: str, hours: float = 0) -> None:
        time_passes(self.store, delivery_id, hours)

    def sink(self) -> Any:
        partner = self.settings.partners.by_id("st-elsewhere")
        assert partner is not None
        assert partner.destination is not None
        return delivery.http_sink(partner.destination, self.settings)

    def reports_on_server(self, case_id: str) -> list[dict[str, Any]]:
        """Search the EHR over HTTP (SMART) for our report identifier: what is really there."""
        found: list[dict[str, Any]] = self.sink()._search_identifier(
            "DiagnosticReport", f"{REPORT_SYSTEM}|{case_id}"
        )
        return found

    def token_requests(self) -> int:
        return sum(1 for e in self.ehr.state.log if e.path == "/auth/token")


@pytest.fixture
def flow(app_client: TestClient, tokens: Tokens, settings: Settings, ehr: SandboxServer) -> Flow:
    return Flow(app_client, tokens, settings, ehr)


def strip_server(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def test_referral_to_delivered_report_read_back_from_the_ehr(flow, tmp_path):
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    submitted = flow.submit(case_id)
    assert submitted["status"] == "pending"
    assert flow.run_jobs() == 1
    (view,) = flow.deliveries(case_id)
    assert view["id"] == submitted["id"]
    assert (view["status"], view["action"], view["attempts"]) == ("delivered", "create", 1)
    assert view["lastStatusCode"] == 201
    (found,) = flow.reports_on_server(case_id)
    assert found["id"] == view["server"]["id"]
    ours = flow.report(case_id)["diagnosticReport"]
    read_back = flow.sink().read(f"DiagnosticReport/{found['id']}")
    assert strip_server(read_back) == strip_server(ours)
    assert read_back["status"] == "final"
    # Every request the gateway made to the EHR carried a token (SMART enforced).
    assert all(e.authorized for e in flow.ehr.state.log if e.path.startswith("/fhir/D"))
    # The PDF the EHR holds opens and page 1 is not blank; the text copy matches it.
    pdf_form, text_form = read_back["presentedForm"]
    assert pdf_form["contentType"] == "application/pdf"
    pdf = base64.b64decode(pdf_form["data"])
    dark, total = page1_dark_pixels(pdf, tmp_path)
    assert dark > total // 200
    assert "Invasive ductal carcinoma" in pdf_text(pdf, tmp_path)
    assert "Invasive ductal carcinoma" in base64.b64decode(text_form["data"]).decode()
    # basedOn: the referral ServiceRequest we host, with the placer's identifier.
    with flow.store.session() as s:
        case = s.get(Case, case_id)
        sr = s.get(FhirResource, ("ServiceRequest", case.service_request_id)).body
        task = s.get(FhirResource, ("Task", case.task_id)).body
    (based_on,) = read_back["basedOn"]
    assert based_on["reference"] == (
        f"{flow.settings.base_url}/fhir/ServiceRequest/{case.service_request_id}"
    )
    assert based_on["identifier"] == {k: sr["identifier"][0][k] for k in ("system", "value")}
    # subject: the patient by the referral's identifier, which resolves to one patient on the EHR.
    # subject: the patient by an identifier from the referral, which resolves on the EHR to the
    # one patient whose records we pulled.
    subject = read_back["subject"]["identifier"]
    partner = flow.settings.partners.by_id("st-elsewhere")
    found_patients = pull.client_for(partner).search(
        "Patient", {"identifier": f"{subject['system']}|{subject['value']}"}, post=True
    )
    assert [p["id"] for p in found_patients.resources] == [flow.pulled(case_id, "Patient")]
    # Findings point at the EHR's own resources, which resolve there.
    focus = {c["id"]: c for c in read_back["contained"]}["finding-1"]["focus"][0]["reference"]
    assert focus.startswith(flow.ehr.base_url + "/Condition/")
    condition_id = focus.rsplit("/", 1)[1]
    assert pull.client_for(partner).read("Condition", condition_id)["id"] == condition_id
    # The referral Task we host is completed with the report (absolute URL on the EHR).
    assert task["status"] == "completed"
    assert task["output"][-1]["valueReference"]["reference"] == (
        f"{flow.ehr.base_url}/DiagnosticReport/{found['id']}"
    )
    # RF-24: one Provenance for it on the EHR.
    provenances = flow.ehr.state.store.search(
        "Provenance", [("target", f"DiagnosticReport/{found['id']}")]
    )
    assert len(provenances) == 1


def test_task_on_the_destination_is_completed_there(flow, settings, ehr):
    configure_partner(settings, ehr.base_url, "task_on_destination = true")
    ehr.state.store.update(
        {
            "resourceType": "Task",
            "id": "ehr-task-1",
            "identifier": [dict(zip(("system", "value"), REFERRAL_TASK, strict=True))],
            "status": "in-progress",
            "intent": "order",
        },
        None,
    )
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    flow.submit(case_id)
    flow.run_jobs()
    (view,) = flow.deliveries(case_id)
    assert view["status"] == "delivered"
    task = flow.sink().read("Task/ehr-task-1")
    assert task["status"] == "completed"
    assert task["output"][0]["valueReference"] == {
        "reference": f"DiagnosticReport/{view['server']['id']}"
    }


def test_ehr_down_for_an_hour_then_recovering_delivers_once(flow):
    """(a) 503 + Retry-After for a simulated hour; time advances through the job's run_at."""
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    flow.ehr.state.config.faults.down = True
    flow.ehr.state.config.faults.retry_after = "600"
    delivery_id = flow.submit(case_id)["id"]
    for attempt in range(1, 7):
        assert flow.run_jobs(max_runs=1) == 1
        (view,) = flow.deliveries(case_id)
        assert (view["status"], view["attempts"], view["lastStatusCode"]) == (
            "pending",
            attempt,
            503,
        )
        with flow.store.session() as s:
            job = s.get(Job, s.get(Delivery, delivery_id).job_id)
            assert job.run_at >= utcnow() + timedelta(seconds=590)  # Retry-After honoured
        assert flow.run_jobs() == 0  # not due yet
        flow.time_passes(delivery_id, hours=1 / 6)
    flow.ehr.state.config.faults.down = False
    assert flow.run_jobs() == 1
    (view,) = flow.deliveries(case_id)
    assert (view["status"], view["attempts"]) == ("delivered", 7)
    assert len(flow.reports_on_server(case_id)) == 1


def test_submit_twice_delivers_once(flow):
    """(c)"""
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    first, second = flow.submit(case_id), flow.submit(case_id)
    assert first["id"] == second["id"]
    assert flow.run_jobs() == 1
    assert flow.submit(case_id)["id"] == first["id"]
    assert flow.run_jobs() == 0
    assert len(flow.deliveries(case_id)) == 1
    assert len(flow.reports_on_server(case_id)) == 1


def test_ehr_rejection_is_dead_at_once_with_its_message(flow):
    message = "Patient is not registered at this facility"
    flow.ehr.state.config.faults.reject_writes["DiagnosticReport"] = message
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    flow.submit(case_id)
    assert flow.run_jobs() == 1
    (view,) = flow.deliveries(case_id)
    assert (view["status"], view["attempts"], view["lastStatusCode"]) == ("dead", 1, 422)
    assert message in view["lastError"]
    assert view["lastOutcome"]["issue"][0]["diagnostics"] == message
    assert view["nextRetryAt"] is None
    assert flow.run_jobs() == 0
    assert flow.reports_on_server(case_id) == []
    # `fhir-gateway deliveries --failed` shows it with the EHR's words.
    console = Console(width=400, record=True)
    console.print(cli.deliveries_table(flow.settings, failed_only=True))
    listed = console.export_text()
    assert view["id"] in listed
    assert "422" in listed
    assert message in listed
    # The operator fixes it at the EHR and redelivers.
    flow.ehr.state.config.faults.reject_writes.clear()
    assert view["id"] in cli.redeliver_command(flow.settings, view["id"])
    assert flow.run_jobs() == 1
    assert flow.deliveries(case_id)[0]["status"] == "delivered"
    assert len(flow.reports_on_server(case_id)) == 1
    console = Console(width=400, record=True)
    console.print(cli.deliveries_table(flow.settings, failed_only=True))
    assert view["id"] not in console.export_text()
    with pytest.raises(ConflictError):  # only a dead delivery can be redelivered
        cli.redeliver_command(flow.settings, view["id"])


def test_revoked_token_is_renewed_once_then_the_write_goes_through(flow):
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    flow.submit(case_id)
    flow.run_jobs()
    before = flow.token_requests()
    assert flow.ehr.state.revoke_tokens() >= 1
    flow.put_report(case_id, conclusion="Revised: grade 3 on review of block B2.")
    flow.submit(case_id)
    assert flow.run_jobs() == 1
    update = flow.deliveries(case_id)[-1]
    assert (update["status"], update["action"], update["attempts"]) == ("delivered", "update", 1)
    assert flow.token_requests() == before + 1  # one renewal
    puts = [e.status for e in flow.ehr.state.log if e.method == "PUT" and "Diagnostic" in e.path]
    assert puts == [401, 200]
    (found,) = flow.reports_on_server(case_id)
    assert found["conclusion"].startswith("Revised")


def test_amend_and_retract_with_a_conflicting_edit_on_the_ehr(flow):
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    flow.submit(case_id)
    flow.run_jobs()
    server_id = flow.deliveries(case_id)[0]["server"]["id"]

    def someone_else_edits() -> None:
        current = copy.deepcopy(flow.ehr.state.store.get("DiagnosticReport", server_id))
        current["language"] = "en"
        flow.ehr.state.store.update(current, None)

    flow.put_report(case_id, conclusion="Revised: grade 3 on review of block B2.")
    amended = flow.submit(case_id)
    someone_else_edits()
    assert flow.run_jobs() == 1
    stored = flow.sink().read(f"DiagnosticReport/{server_id}")
    assert stored["status"] == "amended"
    assert stored["conclusion"].startswith("Revised")
    assert stored["meta"]["versionId"] == "3"  # create, their edit, our amendment
    puts = [e.status for e in flow.ehr.state.log if e.method == "PUT" and "Diagnostic" in e.path]
    assert puts == [412, 200]  # If-Match with the version we held, then re-read and retried
    assert flow.deliveries(case_id)[-1]["id"] == amended["id"]
    assert strip_server(stored) == strip_server(flow.report(case_id)["diagnosticReport"])

    flow.retract(case_id)
    someone_else_edits()
    assert flow.run_jobs() == 1
    stored = flow.sink().read(f"DiagnosticReport/{server_id}")
    assert stored["status"] == "entered-in-error"
    assert [(d["action"], d["status"]) for d in flow.deliveries(case_id)] == [
        ("create", "delivered"),
        ("update", "delivered"),
        ("retract", "delivered"),
    ]
    assert flow.report(case_id)["status"] == "retracted"
    assert len(flow.reports_on_server(case_id)) == 1


def _worker_process(settings: Settings) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FHIR_GATEWAY_DATA_DIR": str(settings.data_dir),
        "FHIR_GATEWAY_JOBS__POLL_S": "0.05",
        "FHIR_GATEWAY_LOG_LEVEL": "WARNING",
    }
    with (settings.data_dir / "worker.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fhir_gateway.cli", "worker", "--threads", "1"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def test_worker_sigkilled_after_the_ehr_accepted_delivers_once(flow):
    """(b) A real worker process is killed while the EHR's 201 is on its way; on resume the
    conditional create finds the report: one report on the server."""
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    delivery_id = flow.submit(case_id)["id"]
    flow.ehr.state.config.faults.write_response_delay_s = 30
    proc = _worker_process(flow.settings)
    try:
        deadline = time.monotonic() + 60
        while not any(
            (r.get("identifier") or [{}])[0].get("value") == case_id
            for r in flow.ehr.state.store.all("DiagnosticReport")
        ):
            assert proc.poll() is None, (flow.settings.data_dir / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker never reached the EHR"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the EHR committed; the 201 never arrives
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    flow.ehr.state.config.faults.write_response_delay_s = 0
    (view,) = flow.deliveries(case_id)
    assert (view["status"], view["attempts"]) == ("pending", 1)
    with flow.store.session() as s:
        job = s.get(Job, s.get(Delivery, delivery_id).job_id)
        assert job.state == "running"  # the dead worker's lease
        job.lease_expires_at = utcnow() - timedelta(seconds=1)  # simulated: the lease ran out
    assert flow.run_jobs() == 1
    (view,) = flow.deliveries(case_id)
    assert (view["status"], view["attempts"]) == ("delivered", 2)
    assert view["lastStatusCode"] == 200  # the conditional create matched
    assert len(flow.reports_on_server(case_id)) == 1
    provenances = flow.ehr.state.store.search(
        "Provenance", [("target", f"DiagnosticReport/{view['server']['id']}")]
    )
    assert len(provenances) == 1
