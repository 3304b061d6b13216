"""The `pull_fhir` job with `bulk` set: Bulk Data `$export` from the sandbox EHR over real HTTP,
SMART enforced, through the real queue and worker (STANDARDS BD-01..BD-08).

The sandbox holds several patients (all of fixtures/synthea), so keeping only the case's patient
is tested. Expected counts come from the fixture bundle, not from the sandbox. A killed worker is
a `BaseException` the worker does not catch: the job stays `running` with its lease, as after a
real kill; the lease is then expired and a second worker takes the job over.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from connectors.smart import public_jwk, write_private_key
from fhir_gateway import job_handlers, jobs
from fhir_gateway.records import pull
from fhir_gateway.sandbox import Faults, SandboxClient, SandboxConfig, SandboxServer
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import FhirResource, Job, StoredResource, utcnow
from tests.conftest import SYNTHEA, add_case, partner_toml
from tests.integration.test_pull_job import ehr_patient

CASE = "case-1"


class Killed(BaseException):
    """The worker process dies here (not an Exception: nothing catches it)."""


@pytest.fixture
def ehr(settings: Settings) -> Iterator[Any]:
    """start(bulk, faults, **config) -> a SMART sandbox named in the partners file with `bulk`."""
    key = write_private_key(settings.data_dir / "keys" / "ehr.pem", "RSA")
    servers: list[SandboxServer] = []

    def start(bulk: str = "patient", faults: Faults | None = None, **config: Any) -> SandboxServer:
        client = SandboxClient("fhir-gateway", {"keys": [public_jwk(key, kid="gw-1")]})
        # The export "runs" 1 s, so even on a loaded machine the first status poll finds it
        # in progress (202 + X-Progress); polls then come every bulk_poll_min_s.
        options: dict[str, Any] = {"export_run_s": 1.0, "export_retry_after": "0", **config}
        server = SandboxServer(
            SandboxConfig(
                data_dir=SYNTHEA,
                clients={"fhir-gateway": client},
                everything=False,
                faults=faults or Faults(),
                **options,
            )
        ).start()
        servers.append(server)
        text = partner_toml("st-elsewhere", server.base_url, "keys/ehr.pem", "gw-1")
        text += f'bulk = "{bulk}"\nbulk_poll_min_s = 0.02\n'
        (settings.data_dir / "partners.toml").write_text(text)
        return server

    yield start
    for server in servers:
        server.stop()


def open_case(store: Store) -> None:
    """A referral case whose Patient (ours: local-1) carries the EHR patient's identifiers."""
    patient, _ = ehr_patient()
    add_case(store, CASE, "Patient/local-1", partner_id="st-elsewhere")
    hosted = {"resourceType": "Patient", "id": "local-1", "identifier": patient["identifier"]}
    with store.session() as s:
        s.add(
            FhirResource(
                resource_type="Patient",
                id="local-1",
                partner_id="st-elsewhere",
                case_id=CASE,
                body=hosted,
            )
        )
        jobs.enqueue(s, pull.KIND, case_id=CASE)


def pull_job(store: Store) -> Job:
    with store.session() as s:
        row = s.query(Job).filter_by(kind=pull.KIND).order_by(Job.created_at.desc()).first()
        assert row is not None
        s.expunge(row)
        return row


def stored(store: Store) -> Counter[str]:
    with store.session() as s:
        rows = s.query(StoredResource).filter_by(case_id=CASE).all()
        keys = Counter((r.resource_type, r.source_id) for r in rows)
        assert set(keys.values()) == {1}  # one row per source resource
        return Counter(r.resource_type for r in rows)


def export_log(server: SandboxServer) -> list[Any]:
    return [e for e in server.state.log if "$export" in e.path]


def ehr_patient_id(server: SandboxServer) -> str:
    patient, _ = ehr_patient()
    ident = patient["identifier"][0]
    found = server.state.store.search(
        "Patient", [("identifier", f"{ident['system']}|{ident['value']}")]
    )
    return str(found[0]["id"])


def test_patient_level_export_stores_only_the_case_patient(ehr, store, settings):
    server = ehr("patient")
    open_case(store)
    job_handlers.register_all()
    assert jobs.Worker(store, settings).run_once()
    job = pull_job(store)
    assert job.state == "done", job.last_error
    _, expected = ehr_patient()
    assert stored(store) == expected
    summary = job.progress["summary"]
    assert summary["counts"] == dict(expected)
    assert summary["added"] == sum(expected.values())
    assert summary["issue_count"] == 0
    # BD-01: a POST kick-off naming the patient; BD-04: polled with X-Progress; BD-07: DELETE.
    log = export_log(server)
    assert (log[0].method, log[0].path, log[0].status) == ("POST", "/fhir/Patient/$export", 202)
    assert (log[-1].method, log[-1].status) == ("DELETE", 202)
    assert server.state.exports.jobs == {}
    bulk = job.progress["bulk"]
    assert bulk["status"] == "done"
    assert "%" in bulk["x_progress"]
    assert bulk["files"]["downloaded"] == bulk["files"]["total"] > 0
    assert bulk["transaction_time"].endswith("Z")
    assert bulk["not_this_patient"] == 0  # the server filtered by `patient`
    assert job.progress["Observation"]["done"] == expected["Observation"]
    assert not list((settings.data_dir / "bulk").rglob("*.ndjson"))  # files removed


def test_group_level_export_keeps_only_the_case_patient(ehr, store, settings):
    server = ehr("group:oncology")
    patients = server.state.store.all("Patient")
    mine = ehr_patient_id(server)
    other = next(p["id"] for p in patients if p["id"] != mine)
    group = {
        "resourceType": "Group",
        "id": "oncology",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in (mine, other)],
    }
    server.state.store.update(group, None)
    open_case(store)
    job_handlers.register_all()
    assert jobs.Worker(store, settings).run_once()
    job = pull_job(store)
    assert job.state == "done", job.last_error
    _, expected = ehr_patient()
    assert stored(store) == expected
    assert export_log(server)[0].path == "/fhir/Group/oncology/$export"
    assert job.progress["bulk"]["not_this_patient"] > 0  # the other member's, dropped


def test_faults_and_the_error_file_become_the_pulls_issues(ehr, store, settings):
    faults = Faults(
        export_kickoff_throttle=1,
        export_status_errors=2,
        export_error_types=("Observation",),
        retry_after="0",
    )
    server = ehr("patient", faults)
    open_case(store)
    job_handlers.register_all()
    assert jobs.Worker(store, settings).run_once()
    job = pull_job(store)
    assert job.state == "done", job.last_error
    _, expected = ehr_patient()
    assert stored(store) == Counter({t: n for t, n in expected.items() if t != "Observation"})
    summary = job.progress["summary"]
    assert summary["issue_count"] == expected["Observation"]
    assert summary["issues"][0]["diagnostics"].startswith("$export error file: Observation/")
    assert "$export" in summary["partial_types"]
    statuses = [(e.method, e.path.split("/")[2], e.status) for e in export_log(server)]
    assert statuses[:2] == [("POST", "Patient", 429), ("POST", "Patient", 202)]
    assert [s for m, p, s in statuses if p == "$export-status" and m == "GET"][:2] == [500, 500]


def expire_lease(store: Store) -> None:
    with store.session() as s:
        job = s.query(Job).filter_by(kind=pull.KIND).one()
        assert job.state == jobs.RUNNING  # the killed worker left it running, leased
        job.lease_expires_at = utcnow() - timedelta(seconds=1)


@pytest.mark.parametrize("where", ["polling", "downloading", "loading"])
def test_killed_worker_resumes_without_a_second_kickoff_or_download(
    ehr, store, settings, monkeypatch, where
):
    """Killed while polling, between two downloads, or half-way through loading a file (after
    a batch committed): the second worker resumes the same export; nothing is fetched or
    loaded twice."""
    server = ehr("patient", export_file_lines=20, export_run_s=3.0 if where == "polling" else 0.2)
    monkeypatch.setattr(pull, "BULK_BATCH", 7)
    open_case(store)
    job_handlers.register_all()
    real_save, real_mark = pull.save_pull, pull.BulkTracker.mark_loaded
    calls = Counter[str]()

    def kill_after(step: str, n: int) -> None:
        calls[step] += 1
        if calls[step] == n and calls["killed"] == 0:
            calls["killed"] += 1
            raise Killed

    def save_pull(*args: Any, **kwargs: Any) -> Any:
        saved = real_save(*args, **kwargs)  # committed, with its mark
        if where == "loading":
            kill_after("batch", 2)
        return saved

    def mark(self: Any, url: str, lines: int, session: Any = None) -> None:
        real_mark(self, url, lines, session)
        if where == "downloading" and lines == -1 and session is None:
            kill_after("file", 2)

    monkeypatch.setattr(pull, "save_pull", save_pull)
    monkeypatch.setattr(pull.BulkTracker, "mark_loaded", mark)
    if where == "polling":
        real_poll = pull.BulkTracker.save

        def poll_then_die(self: Any, state: Any = None, **fields: Any) -> None:
            real_poll(self, state, **fields)
            if fields.get("status") == "in-progress":
                kill_after("poll", 1)

        monkeypatch.setattr(pull.BulkTracker, "save", poll_then_die)

    with pytest.raises(Killed):
        jobs.Worker(store, settings, name="first").run_once()
    first = pull_job(store).progress["bulk"]
    assert first["state"]["status_url"]
    expire_lease(store)
    assert jobs.Worker(store, settings, name="second").run_once()
    job = pull_job(store)
    assert job.state == "done", job.last_error
    _, expected = ehr_patient()
    assert stored(store) == expected
    assert server.state.exports.kickoffs == 1  # the same export, resumed
    downloads = Counter(e.path for e in export_log(server) if "$export-files" in e.path)
    assert set(downloads.values()) == {1}  # no file fetched twice
    # Exactly once: the second attempt added what the first had not, and saw nothing again.
    summary = job.progress["summary"]
    assert (summary["updated"], summary["unchanged"]) == (0, 0)
    assert job.progress["bulk"]["counts"] == dict(expected)
    assert not list((settings.data_dir / "bulk").rglob("*.ndjson"))


def test_refresh_exports_since_the_last_transaction_time(ehr, store, settings):
    server = ehr("patient")
    open_case(store)
    job_handlers.register_all()
    assert jobs.Worker(store, settings, kinds=[pull.KIND]).run_once()
    first = pull_job(store)
    assert first.state == "done", first.last_error
    since = first.progress["bulk"]["transaction_time"]
    mine = ehr_patient_id(server)
    observation = next(
        o
        for o in server.state.store.all("Observation")
        if o["subject"]["reference"] == f"Patient/{mine}"
    )
    server.state.store.update({**observation, "status": "amended"}, None)
    with store.session() as s:
        jobs.enqueue(s, pull.KIND, case_id=CASE, payload={"refresh": True})
    worker = jobs.Worker(store, settings, kinds=[pull.KIND])
    assert worker.run_once()
    second = pull_job(store)
    assert second.id != first.id
    assert second.state == "done", second.last_error
    assert second.progress["summary"]["counts"] == {"Observation": 1}
    assert (second.progress["summary"]["added"], second.progress["summary"]["updated"]) == (0, 1)
    kickoffs = [e for e in export_log(server) if e.path.endswith("/$export")]
    assert len(kickoffs) == 2
    with store.session() as s:
        row = s.query(StoredResource).filter_by(case_id=CASE, source_id=observation["id"]).one()
        assert row.body["status"] == "amended"
    assert second.progress["bulk"]["request"]["since"] == since


def test_bulk_setting_is_validated():
    from pydantic import ValidationError

    from fhir_gateway.settings import RecordsEndpoint

    assert RecordsEndpoint(base_url="http://x/fhir").bulk is None  # default: off
    assert RecordsEndpoint(base_url="http://x/fhir", bulk="group:g-1").bulk_group == "g-1"
    for bad in ("group:", "system", "group:a/b"):
        with pytest.raises(ValidationError):
            RecordsEndpoint(base_url="http://x/fhir", bulk=bad)


class _NoHeartbeat:
    """Worker A's lease is not extended, so it can lapse while A is stalled."""

    def __init__(self, *args: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def test_stalled_worker_taken_over_loads_nothing_twice(ehr, store, settings, monkeypatch):
    """Worker A stalls half-way through loading (a batch committed), its lease lapses, worker B
    takes the job over and finishes it; then A wakes up and carries on. A's writes to the job are
    fenced, the rows stay one per resource, the export was kicked off once. (SQLite and
    PostgreSQL through the `store` fixture.)"""
    server = ehr("patient", export_file_lines=20, export_run_s=0.2)
    monkeypatch.setattr(pull, "BULK_BATCH", 7)
    open_case(store)
    job_handlers.register_all()
    real_save = pull.save_pull
    stalled, resume = threading.Event(), threading.Event()

    def save_pull(*args: Any, **kwargs: Any) -> Any:
        saved = real_save(*args, **kwargs)
        if threading.current_thread().name == "worker-a" and not stalled.is_set():
            stalled.set()
            resume.wait(60)
        return saved

    monkeypatch.setattr(pull, "save_pull", save_pull)
    monkeypatch.setattr(jobs, "_Heartbeat", _NoHeartbeat)
    outcome: list[BaseException | None] = []

    def run_a() -> None:
        try:
            jobs.Worker(store, settings, name="a").run_once()
            outcome.append(None)
        except BaseException as exc:  # pragma: no cover - reported below
            outcome.append(exc)

    a = threading.Thread(target=run_a, name="worker-a")
    a.start()
    assert stalled.wait(60)
    monkeypatch.undo()  # B: the real save_pull and heartbeat
    monkeypatch.setattr(pull, "BULK_BATCH", 7)
    expire_lease(store)
    assert jobs.Worker(store, settings, name="b", kinds=[pull.KIND]).run_once()
    done = pull_job(store)
    assert done.state == "done", done.last_error
    resume.set()
    a.join(60)
    assert outcome == [None]  # A's failure (the export is gone) was recorded, fenced
    job = pull_job(store)
    assert job.state == "done"  # A could not overwrite B's result
    assert job.progress["bulk"] == done.progress["bulk"]
    assert job.progress["summary"] == done.progress["summary"]
    _, expected = ehr_patient()
    assert stored(store) == expected  # one row per resource
    assert server.state.exports.kickoffs == 1
