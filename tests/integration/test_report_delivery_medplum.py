"""Report delivery against Medplum's FHIR engine (a real FHIR server, under Node on loopback).

The core round trip of issue 5 on a server we did not write: submit -> deliver_report job ->
the DiagnosticReport read back equals what we sent (modulo id/meta) -> amend (If-Match on
Medplum's version ids) -> retract; a repeated delivery (a crash after the POST, a second
submit) leaves one report, counted by searching Medplum. Skipped with a reason when Node or the
npm packages are missing, unless FHIR_GATEWAY_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from connectors._http import FHIR_JSON
from fhir_gateway.reports import delivery, drafts
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store, open_store
from fhir_gateway.store.models import Case, Delivery, FhirResource, Job, utcnow
from tests.report_helpers import (
    draft_data,
    make_case,
    page1_dark_pixels,
    report_settings,
    run_jobs,
)
from tests.servers.medplum_server import medplum_server

pytestmark = pytest.mark.server

ADMIN = Principal(sub="admin-1", role="admin")
REVIEWER = Principal(sub="dr-zolc", role="reviewer")


@pytest.fixture
def medplum_base() -> Iterator[str]:
    """A fresh server per test: the report identifier is the (fixed) case id."""
    with medplum_server() as base:
        yield base


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    yield s
    s.dispose()


@pytest.fixture
def case_id(store: Store) -> str:
    return make_case(store, reviewer=REVIEWER.sub)


def save(store: Store, settings: Settings, case_id: str, **overrides: Any) -> None:
    with store.session() as s:
        drafts.save_draft(s, case_id, draft_data(**overrides), REVIEWER, settings)


def submit(store: Store, settings: Settings, case_id: str) -> str:
    with store.session() as s:
        return drafts.submit(s, case_id, REVIEWER, settings).id


def deliveries(store: Store, case_id: str) -> list[dict[str, Any]]:
    with store.session() as s:
        return drafts.list_deliveries(s, case_id, ADMIN)


def on_medplum(base: str, case_id: str) -> list[dict[str, Any]]:
    """Our reports on Medplum, by a search with plain requests (what is really there)."""
    got = requests.get(
        f"{base}/DiagnosticReport",
        params={"identifier": f"urn:fhir-gateway:report|{case_id}"},
        headers={"Accept": FHIR_JSON},
        timeout=30,
    )
    assert got.status_code == 200, got.text[:300]
    return [e["resource"] for e in got.json().get("entry") or []]


def read(base: str, reference: str) -> dict[str, Any]:
    got = requests.get(f"{base}/{reference}", headers={"Accept": FHIR_JSON}, timeout=30)
    assert got.status_code == 200, got.text[:300]
    body: dict[str, Any] = got.json()
    return body


def strip_server(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def test_deliver_read_back_amend_retract_on_medplum(
    medplum_base, store, case_id, tmp_path, monkeypatch
):
    settings = report_settings(tmp_path, medplum_base)
    save(store, settings, case_id)
    first = submit(store, settings, case_id)
    assert submit(store, settings, case_id) == first  # (c) a second submit: the same delivery
    # A crash after Medplum accepted the POST, before we recorded it: the re-run must find it.
    real = delivery._record_success
    crashed: list[int] = []

    def crash_once(*args: Any, **kw: Any) -> None:
        if not crashed:
            crashed.append(1)
            raise RuntimeError("worker killed")
        real(*args, **kw)

    monkeypatch.setattr(delivery, "_record_success", crash_once)
    assert run_jobs(store, settings, max_runs=1) == 1
    assert deliveries(store, case_id)[0]["status"] == "pending"
    with store.session() as s:
        job = s.get(Job, s.get(Delivery, first).job_id)
        job.run_at = utcnow()
    assert run_jobs(store, settings) == 1
    (view,) = deliveries(store, case_id)
    assert (view["status"], view["attempts"], view["lastStatusCode"]) == ("delivered", 2, 200)
    (found,) = on_medplum(medplum_base, case_id)
    assert found["id"] == view["server"]["id"]

    with store.session() as s:
        ours = drafts.report_view(s, case_id, ADMIN)["diagnosticReport"]
        case = s.get(Case, case_id)
        task = s.get(FhirResource, ("Task", case.task_id)).body
    stored = read(medplum_base, f"DiagnosticReport/{found['id']}")
    assert strip_server(stored) == strip_server(ours)
    pdf = base64.b64decode(stored["presentedForm"][0]["data"])
    dark, total = page1_dark_pixels(pdf, tmp_path)
    assert dark > total // 200
    assert task["status"] == "completed"
    assert task["output"][-1]["valueReference"]["reference"] == (
        f"{medplum_base}/DiagnosticReport/{found['id']}"
    )
    provenance = requests.get(
        f"{medplum_base}/Provenance",
        params={"target": f"DiagnosticReport/{found['id']}"},
        headers={"Accept": FHIR_JSON},
        timeout=30,
    ).json()
    assert len(provenance.get("entry") or []) == 1  # RF-24, once despite the re-run

    # Amend while someone else edited the report on Medplum: If-Match 412, re-read, retry.
    save(store, settings, case_id, conclusion="Revised: grade 3 on review of block B2.")
    submit(store, settings, case_id)
    theirs = copy.deepcopy(stored)
    theirs["language"] = "en"
    edited = requests.put(
        f"{medplum_base}/DiagnosticReport/{found['id']}",
        json=theirs,
        headers={"Content-Type": FHIR_JSON},
        timeout=30,
    )
    assert edited.status_code == 200, edited.text[:300]
    assert run_jobs(store, settings) == 1
    amended = read(medplum_base, f"DiagnosticReport/{found['id']}")
    assert amended["status"] == "amended"
    assert amended["conclusion"].startswith("Revised")
    assert amended["meta"]["versionId"] not in (
        stored["meta"]["versionId"],
        edited.json()["meta"]["versionId"],
    )
    with store.session() as s:
        ours = drafts.report_view(s, case_id, ADMIN)["diagnosticReport"]
    assert strip_server(amended) == strip_server(ours)

    with store.session() as s:
        drafts.retract(s, case_id, REVIEWER, settings)
    assert run_jobs(store, settings) == 1
    assert read(medplum_base, f"DiagnosticReport/{found['id']}")["status"] == "entered-in-error"
    assert [(d["action"], d["status"]) for d in deliveries(store, case_id)] == [
        ("create", "delivered"),
        ("update", "delivered"),
        ("retract", "delivered"),
    ]
    assert len(on_medplum(medplum_base, case_id)) == 1


def test_transaction_and_task_on_medplum(medplum_base, store, case_id, tmp_path):
    """use_transaction + task_on_destination: the Task Medplum holds is completed."""
    settings = report_settings(
        tmp_path, medplum_base, "use_transaction = true\ntask_on_destination = true"
    )
    task = {
        "resourceType": "Task",
        "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": "TASK-77"}],
        "status": "in-progress",
        "intent": "order",
    }
    made = requests.post(
        f"{medplum_base}/Task", json=task, headers={"Content-Type": FHIR_JSON}, timeout=30
    )
    assert made.status_code == 201, made.text[:300]
    save(store, settings, case_id)
    submit(store, settings, case_id)
    assert run_jobs(store, settings) == 1
    (view,) = deliveries(store, case_id)
    assert view["status"] == "delivered", view
    (found,) = on_medplum(medplum_base, case_id)
    closed = read(medplum_base, f"Task/{made.json()['id']}")
    assert closed["status"] == "completed"
    assert closed["output"][0]["valueReference"] == {"reference": f"DiagnosticReport/{found['id']}"}
