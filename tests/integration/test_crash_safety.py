"""Crash safety with real processes: SIGKILL a worker mid-job, SIGKILL an intake mid-
transaction, and two worker processes sharing one PostgreSQL queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fhir_gateway import jobs
from fhir_gateway.store import Store
from fhir_gateway.store.models import Case, FhirResource, Job
from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[2]


def _url(store: Store) -> str:
    return store.engine.url.render_as_string(hide_password=False)


# The worker CLI with the test handlers registered by a plain import.
_WORKER_MAIN = "import tests.jobs_for_tests; from fhir_gateway.cli import main; main()"


def start_worker(
    store: Store, data_dir: Path, *, lease_s: float, threads: int = 1
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FHIR_GATEWAY_DATA_DIR": str(data_dir),
        "FHIR_GATEWAY_DATABASE_URL": _url(store),
        "FHIR_GATEWAY_JOBS__LEASE_S": str(lease_s),
        "FHIR_GATEWAY_JOBS__POLL_S": "0.05",
        "FHIR_GATEWAY_LOG_LEVEL": "WARNING",
    }
    with (data_dir / "worker.log").open("ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, "worker", "--threads", str(threads)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def marks(marker_dir: Path, job_id: str, what: str) -> int:
    return len(list(marker_dir.glob(f"{job_id}.{what}.*")))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sigkilled_worker_job_is_taken_over_and_completes_once(store, settings, tmp_path):
    markers = tmp_path / "marks"
    markers.mkdir()
    with store.session() as s:
        job = jobs.enqueue(s, "test.sleep", payload={"marker_dir": str(markers), "seconds": 3})
    first = start_worker(store, settings.data_dir, lease_s=2)
    try:
        wait_for(lambda: marks(markers, job.id, "start") == 1, 30, "the first worker to start")
        first.send_signal(signal.SIGKILL)  # mid-job: started, not done
        first.wait(10)
    finally:
        stop(first)
    with store.session() as s:
        row = s.get(Job, job.id)
        assert (row.state, row.attempts) == ("running", 1)  # the dead worker's lease remains
    second = start_worker(store, settings.data_dir, lease_s=2)
    try:

        def done() -> bool:
            with store.session() as s:
                return bool(s.get(Job, job.id).state == "done")

        wait_for(done, 60, "the job to be taken over and completed")
    finally:
        stop(second)
    assert marks(markers, job.id, "done") == 1
    assert marks(markers, job.id, "start") == 2  # killed run + taken-over run
    with store.session() as s:
        assert s.get(Job, job.id).attempts == 2


@pytest.mark.server
def test_two_workers_on_postgresql_never_run_a_job_twice(pg_url, settings, tmp_path, request):
    from tests.conftest import _fresh_pg_database

    store = _fresh_pg_database(pg_url, request.node.name)
    markers = tmp_path / "marks"
    markers.mkdir()
    n = 300
    with store.session() as s:
        ids = [
            jobs.enqueue(s, "test.count", payload={"marker_dir": str(markers)}).id for _ in range(n)
        ]
    workers = [start_worker(store, settings.data_dir, lease_s=60, threads=2) for _ in range(2)]
    try:

        def drained() -> bool:
            with store.session() as s:
                return (
                    s.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) == n
                )

        wait_for(drained, 120, "all jobs done")
    finally:
        for w in workers:
            stop(w)
    runs = Counter(p.name.split(".")[0] for p in markers.iterdir())
    pids = {p.name.split(".")[2] for p in markers.iterdir()}
    assert sorted(runs) == sorted(ids)
    assert set(runs.values()) == {1}, "a job ran more than once"
    assert len(pids) == 2, "both worker processes took jobs"
    with store.session() as s:
        assert set(s.scalars(select(Job.attempts))) == {1}
    store.dispose()


INTAKE_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from fhir_gateway import jobs
from fhir_gateway.intake import referrals
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import load_partners
from fhir_gateway.store import open_store

url, partners_file, bundle_file, flag = sys.argv[1:5]
def slow(real):
    def wrapper(*a, **kw):
        job = real(*a, **kw)
        Path(flag).touch()      # the case and its resources are written, not committed
        time.sleep(60)
        return job
    return wrapper

jobs.enqueue = slow(jobs.enqueue)
jobs.enqueue_for_new_case = slow(jobs.enqueue_for_new_case)  # intake queues its pulls in bulk
store = open_store(url)
referrals.intake_transaction(store, json.loads(Path(bundle_file).read_text()),
                             Principal("ehr-1", "ehr", "st-elsewhere"),
                             load_partners(Path(partners_file)))
"""


def test_intake_killed_mid_transaction_leaves_nothing(store, settings, tmp_path):
    flag = tmp_path / "in-transaction"
    script = tmp_path / "intake.py"
    script.write_text(INTAKE_SCRIPT)
    bundle = FIXTURES / "referrals" / "referral-transaction.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            _url(store),
            str(settings.data_dir / "partners.toml"),
            str(bundle),
            str(flag),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(flag.exists, 60, "the intake to be mid-transaction")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with store.session() as s:
        for table in (Case, FhirResource, Job):
            assert s.scalar(select(func.count()).select_from(table)) == 0, table.__name__
    # The partner retries: a whole case appears.
    from fhir_gateway.intake import referrals
    from fhir_gateway.security.access import Principal

    result = referrals.intake_transaction(
        store,
        json.loads(bundle.read_text()),
        Principal("ehr-1", "ehr", "st-elsewhere"),
        settings.partners,
    )
    assert result.new_case
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Case)) == 1
        assert s.scalar(select(func.count()).select_from(FhirResource)) == 4
        assert s.scalar(select(func.count()).select_from(Job)) == 2
