"""Referral -> pull_fhir (sandbox EHR) -> normalise_case -> GET /cases/{id}/bundle and /summary."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select

from fhir_gateway import job_handlers, jobs
from fhir_gateway.casebundle import normalise
from fhir_gateway.imaging.job import save_imaging_studies
from fhir_gateway.sandbox import SandboxServer
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import (
    AuditRow,
    CaseBundleState,
    Job,
    NormalisedResource,
    StoredResource,
)
from mappers.dicom import datasets_to_imaging_studies
from tests.api.test_pull_end_to_end import ehr, refer
from tests.conftest import FIXTURES, Tokens, add_case

__all__ = ["ehr"]  # the sandbox EHR fixture, shared with the pull end-to-end tests


@pytest.fixture
def ehr_only(ehr: SandboxServer, settings: Settings) -> SandboxServer:
    """The partner with its EHR and no PACS: the case has one pull job, pull_fhir."""
    partners = settings.data_dir / "partners.toml"
    text = partners.read_text()
    text = re.sub(r"\[partners\.dicomweb\].*?\n\n", "", text, count=1, flags=re.S)
    partners.write_text(text)
    return ehr


def store_of(client: TestClient) -> Store:
    app = client.app
    assert isinstance(app, FastAPI)
    store: Store = app.state.store
    return store


def run_jobs(store: Store, settings: Settings) -> int:
    """Run due jobs until none is left; how many ran."""
    job_handlers.register_all()
    worker = jobs.Worker(store, settings)
    ran = 0
    while ran < 20 and worker.run_once():
        ran += 1
    return ran


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and not ref.startswith("#"):
            yield ref
        for value in node.values():
            yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


@pytest.fixture
def built_case(ehr_only: SandboxServer, client: TestClient, tokens: Tokens, settings) -> str:
    case_id = refer(client, tokens)
    run_jobs(store_of(client), settings)
    return case_id


def test_bundle_of_a_pulled_case(built_case: str, client: TestClient, tokens: Tokens) -> None:
    admin = tokens.headers("admin")
    detail = client.get(f"/cases/{built_case}", headers=admin).json()
    states = {j["kind"]: j["state"] for j in detail["jobs"]}
    assert states == {"pull_fhir": "done", "normalise_case": "done"}
    assert detail["normalisation"]["state"] == "built"

    resp = client.get(f"/cases/{built_case}/bundle", headers=admin)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/fhir+json; charset=utf-8"
    etag = resp.headers["etag"]
    data = resp.json()
    Bundle.model_validate(data)
    assert data["type"] == "collection"
    assert data["id"] == detail["patient"].split("/", 1)[1]
    resources = [e["resource"] for e in data["entry"]]
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    assert len(patients) == 1
    assert patients[0]["id"] == data["id"]
    known = {f"{r['resourceType']}/{r['id']}" for r in resources}
    assert len(known) == len(resources)
    refs = list(references(resources))
    assert refs
    assert set(refs) <= known
    types = {r["resourceType"] for r in resources}
    assert {"ServiceRequest", "Task", "Observation", "Condition", "Provenance"} <= types
    assert detail["normalisation"]["resources"] == len(resources)

    again = client.get(f"/cases/{built_case}/bundle", headers=admin)
    assert again.headers["etag"] == etag
    assert again.content == resp.content
    cached = client.get(f"/cases/{built_case}/bundle", headers=admin | {"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    other = client.get(f"/cases/{built_case}/bundle", headers=admin | {"If-None-Match": '"x"'})
    assert other.status_code == 200


def test_summary_of_a_pulled_case(built_case: str, client: TestClient, tokens: Tokens) -> None:
    resp = client.get(f"/cases/{built_case}/summary", headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text
    summary = resp.json()
    assert summary["completeness"]["primary_cancer_condition"]["present"] is True
    assert summary["counts"]["Patient"] == 1
    assert summary["counts"]["Observation"] > 100  # 136 pulled, fewer if any were duplicates
    assert summary["resources"] == sum(summary["counts"].values())
    kinds = {s["kind"] for s in summary["sources"]}
    assert kinds == {"referral", "fhir"}
    for issue in summary["issues"]:
        assert issue["severity"] in ("fatal", "error", "warning", "information")
    sourced = [i for i in summary["issues"] if "#" in "".join(i.get("expression", []))]
    assert all(e.split("#")[0] for i in sourced for e in i["expression"])


def test_reviewer_needs_assignment(built_case: str, client: TestClient, tokens: Tokens) -> None:
    reviewer = tokens.headers("reviewer", sub="dr-who")
    for path in ("bundle", "summary"):
        assert client.get(f"/cases/{built_case}/{path}", headers=reviewer).status_code == 403
    assert (
        client.get(f"/cases/{built_case}/bundle", headers=tokens.headers("ehr")).status_code == 403
    )
    assign = client.post(
        f"/cases/{built_case}/assignments",
        json={"reviewer": "dr-who"},
        headers=tokens.headers("admin"),
    )
    assert assign.status_code == 201
    assert client.get(f"/cases/{built_case}/bundle", headers=reviewer).status_code == 200
    with store_of(client).session() as s:
        rows = s.scalars(select(AuditRow).where(AuditRow.action == "case.bundle")).all()
        assert [r.agent for r in rows] == ["dr-who"]  # the refusals are not reads
        assert rows[0].case_id == built_case


def test_before_normalisation_409(ehr_only, client: TestClient, tokens: Tokens) -> None:
    case_id = refer(client, tokens)
    for path in ("bundle", "summary"):
        resp = client.get(f"/cases/{case_id}/{path}", headers=tokens.headers("admin"))
        assert resp.status_code == 409
        outcome = resp.json()
        assert outcome["resourceType"] == "OperationOutcome"
        text = outcome["issue"][0]["diagnostics"]
        assert "not normalised yet" in text
        assert "pull_fhir queued" in text
    detail = client.get(f"/cases/{case_id}", headers=tokens.headers("admin")).json()
    assert detail["normalisation"] == {"state": "pending", "pending": ["pull_fhir queued"]}


def test_normalise_is_idempotent(built_case: str, client: TestClient, settings) -> None:
    store = store_of(client)
    with store.session() as s:
        before = s.get(CaseBundleState, built_case)
        assert before is not None
        rows = s.query(NormalisedResource).filter_by(case_id=built_case).count()
    again = normalise.normalise_case(store, settings, built_case)
    assert again.etag == before.etag
    assert again.resources == rows
    with store.session() as s:
        assert s.query(NormalisedResource).filter_by(case_id=built_case).count() == rows


# --- the job's wait for the other pulls, and a bad stored resource ---------------------------


def context(store: Store, settings: Settings, job: Job) -> jobs.JobContext:
    return jobs.JobContext(
        job.id, job.kind, job.case_id, dict(job.payload), 1, store, settings, None, lambda u: None
    )


def test_normalise_waits_for_outstanding_pulls(client: TestClient, settings: Settings) -> None:
    store: Store = store_of(client)
    add_case(store, "c1", "Patient/p1")
    with store.session() as s:
        fhir_pull = jobs.enqueue(s, "pull_fhir", case_id="c1")
        imaging = jobs.enqueue(s, "pull_imaging", case_id="c1")
        fhir_pull.state = jobs.RUNNING  # its handler is at its end, queueing the normalisation
    ctx = context(store, settings, fhir_pull)
    normalise.queue_after_pull(ctx)
    normalise.queue_after_pull(ctx)  # a re-run of the same attempt queues nothing new
    with store.session() as s:
        first = s.scalars(select(Job).where(Job.kind == "normalise_case")).one()
    normalise.run_normalise_case(context(store, settings, first))
    with store.session() as s:
        assert s.get(CaseBundleState, "c1") is None  # no half bundle while imaging is pending
        deferred = s.scalars(
            select(Job).where(Job.kind == "normalise_case", Job.id != first.id)
        ).one()
        assert deferred.payload["after"] == fhir_pull.id
        assert deferred.run_at > first.run_at
        s.get(Job, imaging.id).state = jobs.DEAD  # type: ignore[union-attr]
    normalise.run_normalise_case(context(store, settings, deferred))
    with store.session() as s:
        state = s.get(CaseBundleState, "c1")
        assert state is not None
        assert state.resource_count == 1  # the case Patient alone
        assert any(i["code"] == "required" for i in state.issues)  # no source sent a Patient


def test_one_build_per_change_of_inputs(store: Store, settings: Settings) -> None:
    """On SQLite and PostgreSQL: the normalisation queued by each of two pulls builds once;
    the second finds the inputs unchanged and ends; a new stored row builds again."""
    add_case(store, "c3", "Patient/p3")
    with store.session() as s:
        pulls = [jobs.enqueue(s, kind, case_id="c3") for kind in normalise.PULL_KINDS]
        for pull in pulls:
            pull.state = jobs.DONE
    for pull in pulls:
        normalise.queue_after_pull(context(store, settings, pull))
    with store.session() as s:
        queued = list(
            s.scalars(select(Job).where(Job.kind == "normalise_case", Job.case_id == "c3"))
        )
    assert len(queued) == 2
    progress: list[dict[str, Any]] = []

    def run(job: Job) -> None:
        ctx = jobs.JobContext(
            job.id, job.kind, "c3", dict(job.payload), 1, store, settings, None, progress.append
        )
        normalise.run_normalise_case(ctx)

    run(queued[0])
    with store.session() as s:
        first = s.get(CaseBundleState, "c3")
        assert first is not None
        built_at = first.built_at
    run(queued[1])
    assert progress[-1] == {"normalise": {"unchanged": True}}
    with store.session() as s:
        assert s.get(CaseBundleState, "c3").built_at == built_at  # type: ignore[union-attr]
        s.add(
            StoredResource(
                case_id="c3",
                source="https://ehr.example/fhir",
                resource_type="Patient",
                source_id="p3",
                body={"resourceType": "Patient", "id": "p3", "gender": "male"},
            )
        )
    run(queued[1])
    assert progress[-1]["normalise"]["resources"] >= 1  # built again
    with store.session() as s:
        again = s.get(CaseBundleState, "c3")
        assert again is not None
        assert again.built_at > built_at


def test_a_bad_stored_resource_is_reported_not_fatal(store: Store, settings: Settings) -> None:
    """On SQLite and PostgreSQL: the bundle is built without the refused resource, reported."""
    add_case(store, "c2", "Patient/p2")
    source = "https://ehr.example/fhir"
    good = {"resourceType": "Patient", "id": "p2", "gender": "female"}
    bad = {
        "resourceType": "Observation",
        "id": "bad",
        "status": "final",
        "code": {"coding": [{"system": 5, "code": "x"}]},
    }
    fine = {
        "resourceType": "Observation",
        "id": "ok",
        "status": "final",
        "code": {"text": "note"},
        "subject": {"reference": "Patient/p2"},
    }
    with store.session() as s:
        for body in (good, bad, fine):
            s.add(
                StoredResource(
                    case_id="c2",
                    source=source,
                    resource_type=body["resourceType"],
                    source_id=body["id"],
                    body=body,
                )
            )
    built = normalise.normalise_case(store, settings, "c2")
    assert built.resources == 3  # Patient, the good Observation, the source's Provenance
    with store.session() as s:
        state = s.get(CaseBundleState, "c2")
        assert state is not None
        refused = [i for i in state.issues if "not normalised" in i["diagnostics"]]
        assert [i["expression"] for i in refused] == [[f"{source}#Observation/bad"]]
        assert state.counts == {"Patient": 1, "Observation": 1, "Provenance": 1}
    again = normalise.normalise_case(store, settings, "c2")  # replaces the rows in place
    assert again.etag == built.etag


def test_a_save_during_the_build_is_not_lost(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull that saves while the bundle is being built: the older build is not written."""
    store = store_of(client)
    add_case(store, "c3", "Patient/p3")
    source = "https://ehr.example/fhir"

    def save(rid: str) -> None:
        with store.session() as s:
            body = {"resourceType": "Observation", "id": rid, "status": "final", "code": {}}
            s.add(
                StoredResource(
                    case_id="c3",
                    source=source,
                    resource_type="Observation",
                    source_id=rid,
                    body=body,
                )
            )

    save("first")
    real_build = normalise._build
    builds: list[int] = []

    def build_racing_a_pull(*args: Any) -> Any:
        builds.append(len(args[2][0].resources))
        if len(builds) == 1:
            save("second")  # lands after the inputs were read, before the write
        return real_build(*args)

    monkeypatch.setattr(normalise, "_build", build_racing_a_pull)
    built = normalise.normalise_case(store, settings, "c3")
    assert builds == [1, 2]
    with store.session() as s:
        state = s.get(CaseBundleState, "c3")
        assert state is not None
        assert state.counts["Observation"] == 2
    assert built.resources == state.resource_count


def test_imaging_pull_rows_join_the_case_patient(store: Store, settings: Settings) -> None:
    """ImagingStudy + Endpoint saved by the imaging pull: linked to the case Patient, tagged."""
    add_case(store, "c4", "Patient/p4")
    files = sorted((FIXTURES / "dicom" / "ct").iterdir())[:3]
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    mapped = datasets_to_imaging_studies(
        datasets, {"reference": "Patient/p4"}, "http://127.0.0.1:8080/cases/c4/dicom-web"
    )
    save_imaging_studies(store, "c4", "http://pacs.example/dicom-web", mapped)
    built = normalise.normalise_case(store, settings, "c4")
    assert "imaging" not in built.missing
    with store.session() as s:
        rows = s.scalars(
            select(NormalisedResource.body).where(NormalisedResource.case_id == "c4")
        ).all()
    resources = [json.loads(body) for body in rows]
    known = {f"{r['resourceType']}/{r['id']}" for r in resources}
    studies = [r for r in resources if r["resourceType"] == "ImagingStudy"]
    assert studies
    for study in studies:
        assert study["subject"]["reference"] == "Patient/p4"
        assert {e["reference"] for e in study["endpoint"]} <= known
