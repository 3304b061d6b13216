"""Benchmark: does one big referral push stall everyone else? `GET /cases` during an 8,000-entry
transaction, on SQLite and on PostgreSQL, over real HTTP (uvicorn on loopback).

Run: `python tests/benchmarks/bench_big_push.py [--entries 8000] [--engines sqlite,postgresql]`
(prints numbers; no asserts). PostgreSQL is a throwaway cluster (tests/servers/postgres.py).

Per engine: 20 referrals are stored, then a sampler sends `GET /cases` (admin) on a fixed
schedule, every 20 ms, whether or not the previous one has come back (open loop: a request
held up by a lock delays the ones scheduled after it, and their latency counts from when they
were due). The anchor is the same sampler with nothing else running (idle). Then one client
POSTs a transaction of the referral (Organization, Patient, ServiceRequest, Task) plus
Observations (Synthea vital signs, each with an identifier) to 8,000 entries, twice: first
into an empty store, then a second referral of the same size (its identifier lookups now run
against 8,000 stored Observations). `limits.max_transaction_entries` is raised to the push
size for this run (default 1,000). Target: p99 of `GET /cases` during the push < 200 ms.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from fhir_gateway.sandbox.server import free_port  # noqa: E402
from fhir_gateway.security.auth import mint_dev_token  # noqa: E402

INTERVAL_S = 0.05
PATIENT_URN = "urn:uuid:7d2b9a53-0c41-4f6e-9d0e-1a2b3c4d5e01"


def referral(tag: str) -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads(
        (ROOT / "fixtures/referrals/referral-transaction.json").read_text()
    )
    for entry in bundle["entry"]:
        entry["request"].pop("ifNoneExist", None)
        res = entry["resource"]
        if res["resourceType"] != "Organization":
            for ident in res["identifier"]:
                ident["value"] = f"{ident['value']}-{tag}"
    return bundle


def observations(tag: str, count: int, subject: str) -> list[dict[str, Any]]:
    synthea = json.loads((ROOT / "fixtures/synthea/colon_Lourdes_Alcantar.json").read_text())
    found = [
        e["resource"] for e in synthea["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    out = []
    for i in range(count):
        obs = copy.deepcopy(found[i % len(found)])
        for key in ("id", "encounter", "hasMember", "derivedFrom"):
            obs.pop(key, None)
        obs["subject"] = {"reference": subject}
        obs["identifier"] = [{"system": "urn:bench:observation", "value": f"{tag}-{i}"}]
        out.append({"resource": obs, "request": {"method": "POST", "url": "Observation"}})
    return out


def big_push(tag: str, entries: int) -> dict[str, Any]:
    bundle = referral(tag)
    bundle["entry"] += observations(tag, entries - len(bundle["entry"]), PATIENT_URN)
    return bundle


def chunks(tag: str, entries: int, chunk: int) -> list[dict[str, Any]]:
    """The same Observations as transactions of at most `chunk` entries (the default limit):
    each is the referral again (its 4 entries found by identifier: 200, no second case) plus the
    next Observations about its Patient."""
    out: list[dict[str, Any]] = []
    obs = observations(tag, entries - 4, PATIENT_URN)
    for start in range(0, len(obs), chunk - 4):
        body = referral(tag)
        body["entry"] += obs[start : start + chunk - 4]
        out.append(body)
    return out


class Sampler:
    """GET /cases every INTERVAL_S on a fixed schedule (open loop), latency from the due time."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.latencies: list[float] = []
        self.errors: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _one(self, due: float) -> None:
        try:
            resp = requests.get(self.url, headers=self.headers, timeout=300)
            status = resp.status_code
        except requests.RequestException:
            status = -1
        latency = time.perf_counter() - due
        with self._lock:
            if status == 200:
                self.latencies.append(latency)
            else:
                self.errors[status] = self.errors.get(status, 0) + 1

    def _run(self) -> None:
        due = time.perf_counter()
        while not self._stop.is_set():
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            t = threading.Thread(target=self._one, args=(due,), daemon=True)
            t.start()
            self._threads.append(t)
            due += INTERVAL_S

    def __enter__(self) -> Sampler:
        self._main = threading.Thread(target=self._run, daemon=True)
        self._main.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._main.join()
        for t in self._threads:
            t.join(timeout=300)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(v: float) -> str:
    return f"{v * 1000:.0f}"


PARTNERS = """\
[organization]
name = "Benchmark Second-Opinion Service"
identifier = { system = "urn:oid:2.16.840.1.113883.3.9999", value = "second-opinion" }

[[partners]]
id = "st-elsewhere"
name = "St Elsewhere Cancer Centre"
identifier = { system = "urn:oid:2.16.840.1.113883.3.9999", value = "st-elsewhere" }

[partners.fhir]
base_url = "http://127.0.0.1:9/fhir"
auth = { type = "none" }
"""


def run_engine(engine: str, entries: int, tmp: Path, pg_url: str | None) -> None:
    """`fhir-gateway serve` in its own process (as in production), the clients here."""
    data_dir = tmp / engine
    data_dir.mkdir()
    (data_dir / "partners.toml").write_text(PARTNERS)  # no secrets: `serve` checks they exist
    ehr_token = mint_dev_token(data_dir, role="ehr", sub="bench", partner="st-elsewhere")
    ehr = {"Authorization": f"Bearer {ehr_token}", "Content-Type": "application/fhir+json"}
    admin = {"Authorization": f"Bearer {mint_dev_token(data_dir, role='admin', sub='bench')}"}
    port = free_port()
    env = {
        **os.environ,
        "FHIR_GATEWAY_LIMITS__MAX_TRANSACTION_ENTRIES": str(entries),
        "FHIR_GATEWAY_LOG_LEVEL": "WARNING",
    }
    if pg_url:
        env["FHIR_GATEWAY_DATABASE_URL"] = pg_url
    cmd = [str(Path(sys.executable).parent / "fhir-gateway"), "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--workers", "0"]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not start")
            time.sleep(0.2)
        for i in range(20):
            resp = requests.post(f"{url}/fhir", json=referral(f"seed{i}"), headers=ehr)
            resp.raise_for_status()
        with Sampler(f"{url}/cases", admin) as idle:
            time.sleep(5)
        print(
            f"{engine:10} idle              GET /cases n={len(idle.latencies):4} "
            f"p50 {ms(pct(idle.latencies, 50))} ms  p99 {ms(pct(idle.latencies, 99))} ms"
        )
        for round_no, label in enumerate(("into empty", "2nd, 8k held")):
            body = json.dumps(big_push(f"big{round_no}", entries)).encode()
            with Sampler(f"{url}/cases", admin) as busy:
                time.sleep(0.5)
                start = time.perf_counter()
                resp = requests.post(f"{url}/fhir", data=body, headers=ehr, timeout=600)
                push_s = time.perf_counter() - start
                time.sleep(0.5)
            created = sum(
                e["response"]["status"].startswith("201") for e in resp.json().get("entry", [])
            )
            lat = busy.latencies
            print(
                f"{engine:10} push {label:12} {resp.status_code} {created} created in "
                f"{push_s:.1f} s ({len(body) / 1e6:.1f} MB) | GET /cases n={len(lat):4} "
                f"p50 {ms(pct(lat, 50))} ms  p99 {ms(pct(lat, 99))} ms  "
                f"max {ms(max(lat) if lat else float('nan'))} ms  "
                f"p99/idle p99 {pct(lat, 99) / pct(idle.latencies, 99):.1f}x  "
                f"errors {busy.errors or 0}"
            )
        bodies = [json.dumps(b).encode() for b in chunks("chunked", entries, 1000)]
        with Sampler(f"{url}/cases", admin) as busy:
            time.sleep(0.5)
            start = time.perf_counter()
            status, created = 0, 0
            for body in bodies:
                resp = requests.post(f"{url}/fhir", data=body, headers=ehr, timeout=600)
                status = max(status, resp.status_code)
                created += sum(
                    e["response"]["status"].startswith("201") for e in resp.json()["entry"]
                )
            push_s = time.perf_counter() - start
            time.sleep(0.5)
        lat = busy.latencies
        print(
            f"{engine:10} push {len(bodies)} x <=1000 {status} {created} created in {push_s:.1f} s "
            f"| GET /cases n={len(lat):4} p50 {ms(pct(lat, 50))} ms  p99 {ms(pct(lat, 99))} ms  "
            f"max {ms(max(lat) if lat else float('nan'))} ms  "
            f"p99/idle p99 {pct(lat, 99) / pct(idle.latencies, 99):.1f}x  "
            f"errors {busy.errors or 0}"
        )
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=8000)
    parser.add_argument("--engines", default="sqlite,postgresql")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-big-push-"))
    print(
        f"{args.entries}-entry transaction; GET /cases every {INTERVAL_S * 1000:.0f} ms (open loop)"
    )
    try:
        with ExitStack() as stack:
            for engine in args.engines.split(","):
                pg_url = None
                if engine == "postgresql":
                    from tests.servers.postgres import postgres_cluster

                    pg_url = stack.enter_context(postgres_cluster())
                run_engine(engine, args.entries, tmp, pg_url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
