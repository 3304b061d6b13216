"""The `pull_fhir` job through the real queue and worker, against the sandbox EHR over HTTP."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import structlog

from connectors.smart import public_jwk, write_private_key
from fhir_gateway import job_handlers, jobs
from fhir_gateway.errors import NotFoundError
from fhir_gateway.records.pull import PULL_TYPES, pull_case
from fhir_gateway.sandbox import Faults, SandboxClient, SandboxConfig, SandboxServer
from fhir_gateway.settings import JobSettings, Settings
from fhir_gateway.store import Store, open_store
from fhir_gateway.store.models import FhirResource, Job, StoredResource
from tests.conftest import SYNTHEA, add_case, partner_toml

FIXTURE = SYNTHEA / "colon_Lourdes_Alcantar.json"


def ehr_patient() -> tuple[dict[str, Any], Counter[str]]:
    bundle = json.loads(FIXTURE.read_text(encoding="utf-8"))
    entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    mine = Counter(
        e["resource"]["resourceType"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] in PULL_TYPES
        and (
            e is entry
            or any(
                (e["resource"].get(f) or {}).get("reference") == entry["fullUrl"]
                for f in ("subject", "patient")
            )
        )
    )
    return entry["resource"], mine


@pytest.fixture
def world(tmp_path: Path):
    """Settings with a partners file naming a SMART-enforcing sandbox, and a referral case."""
    data_dir = tmp_path / "data"
    key = write_private_key(data_dir / "keys" / "ehr.pem", "RSA")
    servers: list[SandboxServer] = []

    def start(faults: Faults) -> tuple[Settings, Store, SandboxServer]:
        client = SandboxClient("fhir-gateway", {"keys": [public_jwk(key, kid="gw-1")]})
        server = SandboxServer(
            SandboxConfig(
                data_dir=SYNTHEA, clients={"fhir-gateway": client}, everything=False, faults=faults
            )
        ).start()
        servers.append(server)
        (data_dir / "partners.toml").write_text(
            partner_toml("st-elsewhere", server.base_url, "keys/ehr.pem", "gw-1")
        )
        settings = Settings(
            data_dir=data_dir,
            log_format="console",
            jobs=JobSettings(lease_s=30, poll_s=0.05, backoff_base_s=0.01, backoff_cap_s=0.05),
        )
        store = open_store(settings.db_url)
        patient, _ = ehr_patient()
        # The partner sent us its Patient with its identifiers; our id differs from the EHR's.
        hosted = {"resourceType": "Patient", "id": "local-1", "identifier": patient["identifier"]}
        add_case(store, "case-1", "Patient/local-1", partner_id="st-elsewhere")
        with store.session() as s:
            s.add(
                FhirResource(
                    resource_type="Patient",
                    id="local-1",
                    partner_id="st-elsewhere",
                    case_id="case-1",
                    body=hosted,
                )
            )
            jobs.enqueue(s, "pull_fhir", case_id="case-1", dedup_key="pull_fhir:case-1")
        return settings, store, server

    yield start
    for server in servers:
        server.stop()


def job_row(store: Store) -> Job:
    with store.session() as s:
        row = s.query(Job).filter_by(kind="pull_fhir").one()
        s.expunge(row)
        return row


def test_pull_job_stores_the_patient_and_reports_progress(world):
    settings, store, server = world(Faults())
    job_handlers.register_all()
    assert jobs.Worker(store, settings).run_once()
    job = job_row(store)
    assert job.state == "done", job.last_error
    _, expected = ehr_patient()
    with store.session() as s:
        rows = s.query(StoredResource).filter_by(case_id="case-1").all()
        assert Counter(r.resource_type for r in rows) == expected
        assert {r.source for r in rows} == {server.base_url}
    assert job.progress["Observation"]["done"] == expected["Observation"]
    assert job.progress["summary"]["added"] == sum(expected.values())
    # the patient was found by identifier, with the identifier in the body, not the URL
    assert any(e.method == "POST" for e in server.state.log if e.path == "/fhir/Patient/_search")
    assert not any("identifier" in e.query for e in server.state.log)
    store.dispose()


def test_500_burst_leaves_the_reason_on_the_job(world):
    settings, store, _ = world(Faults(burst_start=1, burst_count=10_000))
    job_handlers.register_all()
    jobs.Worker(store, settings).run_once()
    job = job_row(store)
    assert job.state == "queued"  # retryable: the queue tries again later
    assert job.last_error is not None
    assert "HTTP 500" in job.last_error
    assert "injected fault" in job.last_error
    store.dispose()


def test_paging_loop_makes_the_job_dead_with_reason(world):
    settings, store, server = world(Faults(paging_loop=True))
    server.state.config.max_page_size = 10
    job_handlers.register_all()
    jobs.Worker(store, settings).run_once()
    job = job_row(store)
    assert job.state == "dead"
    assert "paging loop" in (job.last_error or "")
    store.dispose()


def test_pull_case_for_the_cli_resolves_the_partner_and_refreshes(world):
    settings, store, server = world(Faults())
    seen: list[tuple[str, int, int]] = []
    result, saved = pull_case(store, settings, "case-1", progress_cb=lambda *a: seen.append(a))
    _, expected = ehr_patient()
    assert result.counts == dict(expected)
    assert saved.added == sum(expected.values())
    assert {t for t, _, _ in seen} == set(expected)
    _, resaved = pull_case(store, settings, "case-1", refresh=True)
    assert (resaved.added, resaved.updated) == (0, 0)
    assert "_lastUpdated=ge" in next(
        e.query for e in reversed(server.state.log) if e.path == "/fhir/Observation"
    )
    with pytest.raises(NotFoundError):
        pull_case(store, settings, "no-such-case")
    store.dispose()


def test_no_identifier_or_name_in_logs_of_the_job(world, caplog):
    settings, store, _ = world(Faults(throttle_every=7, retry_after="0"))
    patient, _ = ehr_patient()
    phi = {patient["birthDate"], *(i["value"] for i in patient["identifier"])}
    for name in patient["name"]:
        phi.update([name["family"], *name["given"]])
    caplog.set_level(logging.DEBUG)  # urllib3 logs request lines (with query strings) at DEBUG
    with structlog.testing.capture_logs() as events:
        job_handlers.register_all()
        jobs.Worker(store, settings).run_once()
    assert job_row(store).state == "done"
    text = json.dumps(events, default=str) + "\n".join(r.getMessage() for r in caplog.records)
    assert "pull.patient.done" in text
    assert sorted(p for p in phi if p in text) == []
    store.dispose()
