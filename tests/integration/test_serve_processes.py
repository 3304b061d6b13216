"""`fhir-gateway serve --processes 2`: two HTTP processes on one database (SQLite and
PostgreSQL). Concurrent pushes of the same referrals through both still open one case per
referral; the job workers run in one of the processes only, and each job runs once; the
metrics of both processes are summed in one scrape."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from sqlalchemy import func, select

from fhir_gateway import jobs
from fhir_gateway.sandbox.server import free_port
from fhir_gateway.store import Store
from fhir_gateway.store.models import Case, Job
from tests.api.test_intake_exactly_once import referral
from tests.conftest import FHIR_JSON

ROOT = Path(__file__).resolve().parents[2]
REFERRALS = 12
PUSHES_EACH = 3  # the same referral pushed 3 times at once, 36 requests from 12 clients
TEST_JOBS = 60
PARTNERS_TOML = """\
[organization]
name = "Example Second-Opinion Service"
identifier = { system = "urn:oid:2.16.840.1.113883.3.9999", value = "second-opinion" }

[[partners]]
id = "st-elsewhere"
name = "St Elsewhere Cancer Centre"
identifier = { system = "urn:oid:2.16.840.1.113883.3.9999", value = "st-elsewhere" }

[partners.fhir]  # nothing listens: the pulls queued on intake fail and wait to be retried
base_url = "http://127.0.0.1:9/fhir"
auth = { type = "none" }
"""


def _children(pid: int) -> list[int]:
    """The HTTP processes `serve` started (not multiprocessing's resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry))
    return found


def _serve(store: Store, data_dir: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    # The spawned processes import `sitecustomize` at start: it registers the test handlers.
    (data_dir / "partners.toml").write_text(PARTNERS_TOML)
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import tests.jobs_for_tests\n")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        "FHIR_GATEWAY_DATABASE_URL": store.engine.url.render_as_string(hide_password=False),
        "FHIR_GATEWAY_JOBS__POLL_S": "0.05",
        "FHIR_GATEWAY_LOG_LEVEL": "WARNING",
    }
    cmd = [sys.executable, "-m", "fhir_gateway.cli", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--processes", "2", "--workers", "2"]
    with (tmp / "serve.log").open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while (
        len(children := _children(proc.pid)) < 2
        or not _healthy(url)
        or not all(_listening(pid, port) for pid in children)
    ):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("serve did not start: " + (tmp / "serve.log").read_text()[-2000:])
        time.sleep(0.2)
    return proc, url


def _sockets(pid: int, port: int, status: str) -> int:
    """The process's TCP sockets on the port in this state (0 for a process gone)."""
    try:
        found = psutil.Process(pid).net_connections("tcp")
    except psutil.NoSuchProcess:
        return 0
    return sum(1 for c in found if c.status == status and c.laddr and c.laddr.port == port)


def _listening(pid: int, port: int) -> bool:
    """The process listens on the port (a process of `serve` that is still starting has not
    yet: connections go to the others)."""
    return _sockets(pid, port, psutil.CONN_LISTEN) > 0


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_two_serve_processes_one_case_per_referral_jobs_once(store, settings, tokens, tmp_path):
    proc, url = _serve(store, settings.data_dir, tmp_path)
    try:
        assert len(_children(proc.pid)) == 2
        headers = tokens.headers("ehr") | FHIR_JSON
        bodies = [json.dumps(referral(f"proc{i}")) for i in range(REFERRALS)]
        work = [i for i in range(REFERRALS) for _ in range(PUSHES_EACH)]
        barrier = threading.Barrier(REFERRALS)
        local = threading.local()

        def push(i: int) -> tuple[int, int, Any]:
            if not hasattr(local, "http"):
                local.http = requests.Session()  # keep-alive: each client stays on a process
                barrier.wait()
            answer = local.http.post(f"{url}/fhir", data=bodies[i], headers=headers, timeout=120)
            return i, answer.status_code, answer.json()

        with ThreadPoolExecutor(REFERRALS) as pool:
            answers = list(pool.map(push, work))
        assert [code for _, code, _ in answers] == [200] * len(work), answers
        tasks: dict[int, set[str]] = {}
        for i, _, body in answers:
            tasks.setdefault(i, set()).add(body["entry"][3]["response"]["location"])
        assert all(len(t) == 1 for t in tasks.values()), tasks  # each referral: one Task
        assert len(set().union(*tasks.values())) == REFERRALS
        with store.session(readonly=True) as s:
            assert s.scalar(select(func.count()).select_from(Case)) == REFERRALS
            per_case = s.execute(
                select(Job.case_id, Job.kind, func.count()).group_by(Job.case_id, Job.kind)
            ).all()
        assert len({case for case, _, _ in per_case}) == REFERRALS
        assert {n for _, _, n in per_case} == {1}  # each case's jobs queued once

        # Jobs: queued directly, run by the one process that holds the job workers.
        markers = tmp_path / "marks"
        markers.mkdir()
        with store.session() as s:
            ids = [
                jobs.enqueue(s, "test.count", payload={"marker_dir": str(markers)}).id
                for _ in range(TEST_JOBS)
            ]
        deadline = time.monotonic() + 120
        while True:
            with store.session(readonly=True) as s:
                done = s.scalar(
                    select(func.count()).where(Job.kind == "test.count", Job.state == "done")
                )
            if done == TEST_JOBS:
                break
            assert time.monotonic() < deadline, f"{done} of {TEST_JOBS} test jobs done"
            time.sleep(0.1)
        runs = Counter(p.name.split(".")[0] for p in markers.iterdir())
        pids = {int(p.name.split(".")[2]) for p in markers.iterdir()}
        assert sorted(runs) == sorted(ids)
        assert set(runs.values()) == {1}, "a job ran more than once"
        assert len(pids) == 1, pids
        assert pids <= set(_children(proc.pid)), pids

        # /metrics sums both processes: every push is counted whichever process answered it.
        scrape = requests.get(f"{url}/metrics", timeout=30).text
        pushed = [
            line
            for line in scrape.splitlines()
            if line.startswith("fhir_gateway_http_requests_total{")
            and 'method="POST"' in line
            and 'route="/fhir"' in line
            and 'status="200"' in line
        ]
        assert len(pushed) == 1, pushed
        assert float(pushed[0].rsplit(" ", 1)[1]) == len(work), pushed
    finally:
        _stop(proc)


def _connections(pid: int, port: int) -> int:
    return _sockets(pid, port, psutil.CONN_ESTABLISHED)


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_connections_opened_at_once_are_spread_over_the_processes(store, settings, tmp_path):
    """32 connections opened together (a pool's start), five times: each time, each process
    takes some of them. With one socket shared by the processes, the first to wake took most
    or all of them (`listeners`)."""
    proc, url = _serve(store, settings.data_dir, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    children = _children(proc.pid)
    rounds = []
    try:
        for _ in range(5):
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
            deadline = time.monotonic() + 30
            while sum(held := [_connections(pid, port) for pid in children]) < 32:
                assert time.monotonic() < deadline, held
                time.sleep(0.05)
            rounds.append(held)
            for client in clients:
                client.close()
            while sum(_connections(pid, port) for pid in children):
                assert time.monotonic() < deadline, "the server did not close the connections"
                time.sleep(0.05)
    finally:
        _stop(proc)
    # Binomial(32, 1/2): fewer than 4 on either process is ~2 in a million per round.
    assert all(min(held) >= 4 for held in rounds), rounds


def test_a_port_in_use_is_refused_with_a_reason(settings, tmp_path):
    """A port something listens on already (another gateway included, whose sockets allow
    sharing the port): `serve --processes 2` exits 2 with a one-line reason, starts nothing."""
    (settings.data_dir / "partners.toml").write_text(PARTNERS_TOML)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "fhir_gateway.cli", "serve", "--port", str(port)]
        cmd += ["--data-dir", str(settings.data_dir), "--processes", "2"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_killed_process_is_replaced_by_one_listening_on_its_own_socket(store, settings, tmp_path):
    """uvicorn's supervisor restarts a process that died; the new one binds a socket of its
    own on the port (the `Listener` it is sent becomes one) and takes connections."""
    proc, url = _serve(store, settings.data_dir, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    try:
        first = _children(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            now = _children(proc.pid)
            if len(now) == 2 and first[0] not in now and all(_listening(p, port) for p in now):
                break
            assert time.monotonic() < deadline, (first, now)
            time.sleep(0.2)
        replaced = next(p for p in now if p not in first)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        try:
            while sum(held := [_connections(pid, port) for pid in now]) < 32:
                assert time.monotonic() < deadline, held
                time.sleep(0.05)
            assert _connections(replaced, port) >= 4, held  # it takes its share
        finally:
            for client in clients:
                client.close()
    finally:
        _stop(proc)
