"""Referral in -> pull_fhir job -> records stored, progress and errors visible in GET /cases/{id}.

The partner's EHR is the sandbox on a loopback port with SMART enforced; the gateway's key is the
partner's `keys/st-elsewhere.pem` from the partners file, registered with the EHR under kid gw-1.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_gateway import job_handlers, jobs
from fhir_gateway.sandbox import Faults, SandboxServer
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import StoredResource
from tests.conftest import FHIR_JSON, SYNTHEA, Tokens, load_fixture, partner_sandbox


@pytest.fixture
def ehr(settings: Settings) -> Iterator[SandboxServer]:
    server = partner_sandbox(settings, SYNTHEA / "colon_Lourdes_Alcantar.json", max_page_size=50)
    partners = settings.data_dir / "partners.toml"
    # the first base_url is the partner's [partners.fhir]; its destination stays as it is
    text = partners.read_text().replace(
        'base_url = "http://127.0.0.1:8181/fhir"', f'base_url = "{server.base_url}"', 1
    )
    partners.write_text(text)
    yield server
    server.stop()


def refer(client: TestClient, tokens: Tokens) -> str:
    bundle: dict[str, Any] = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
    resp = client.post("/fhir", json=bundle, headers=tokens.headers("ehr") | FHIR_JSON)
    assert resp.status_code == 200, resp.text
    cases = client.get("/cases", headers=tokens.headers("admin")).json()
    return str(cases[0]["id"])


def pull_job(client: TestClient, tokens: Tokens, case_id: str) -> dict[str, Any]:
    detail = client.get(f"/cases/{case_id}", headers=tokens.headers("admin")).json()
    return next(j for j in detail["jobs"] if j["kind"] == "pull_fhir")


def test_referral_pulls_the_patient_from_the_ehr(ehr, client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    job_handlers.register_all()
    store = client.app.state.store
    assert jobs.Worker(store, settings).run_once()
    job = pull_job(client, tokens, case_id)
    assert job["state"] == "done", job
    summary = job["progress"]["summary"]
    assert summary["counts"]["Observation"] == 136  # colon_Lourdes_Alcantar: 136 Observations
    assert summary["counts"]["ImagingStudy"] == 1
    assert job["progress"]["Observation"]["done"] == 136  # per type, though via $everything
    assert job["progress"]["Observation"]["pages"] > 1
    with store.session() as s:
        stored = s.query(StoredResource).filter_by(case_id=case_id).count()
    assert stored == sum(summary["counts"].values())


def test_ehr_failure_reason_visible_in_the_case(ehr, client, tokens, settings) -> None:
    ehr.state.config.faults = Faults(burst_start=1, burst_count=10_000, burst_status=503)
    case_id = refer(client, tokens)
    job_handlers.register_all()
    jobs.Worker(client.app.state.store, settings).run_once()
    job = pull_job(client, tokens, case_id)
    assert job["state"] == "queued"  # to be retried later, with backoff
    assert "HTTP 503" in job["lastError"]
    assert "injected fault" in job["lastError"]
