"""Load: referral transactions POSTed to `/fhir` at concurrency 8 through `fhir-gateway serve`.

Run: `python tests/benchmarks/load_intake.py [--requests 500] [--concurrency 8]
[--engines sqlite,postgresql] [--processes N] [--profile PREFIX]` (prints numbers; no asserts).

Each request is the sandbox's referral (`fhir_gateway/sandbox/data/referral-transaction.json`:
Organization, Patient, two ImagingStudy, ServiceRequest, Task) with every identifier made unique,
so every push opens a new case (the Organization is the partner's own: found, 200). The server
runs in its own process (`--workers 0`: the queued pulls stay queued); PostgreSQL is a throwaway
cluster (tests/servers/postgres.py). Printed per engine: rate, p50/p99 latency, and CPU per
request of the server process tree, of PostgreSQL, and of this load generator (it shares the
machine's cores with the server: its CPU is measured apart and shown), the load average before
and after. The anchor, measured in the same run through the same server: `GET /health` at the
same concurrency (HTTP + auth-free routing + one database round trip), and the ratio of the
referral rate to it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
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

PARTNER = "demo-hospital"
REFERRAL = ROOT / "fhir_gateway/sandbox/data/referral-transaction.json"
PARTNERS_TOML = f"""\
[organization]
name = "load test second-opinion service"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "second-opinion" }}

[[partners]]
id = "{PARTNER}"
name = "Demo Hospital (load test)"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "{PARTNER}" }}

[partners.fhir]
base_url = "http://127.0.0.1:9/fhir"
auth = {{ type = "none" }}
"""
TICKS = os.sysconf("SC_CLK_TCK")


def referral_body(tag: str) -> bytes:
    bundle: dict[str, Any] = json.loads(REFERRAL.read_text())
    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "Organization":
            continue
        for ident in res.get("identifier") or []:
            ident["value"] = f"{ident['value']}-{tag}"
    return json.dumps(bundle).encode()


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process and its reaped children) from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1, 0.0
    ppid = int(fields[1])
    return ppid, sum(int(f) for f in fields[11:15]) / TICKS  # utime stime cutime cstime


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by `root` and every live descendant (and what they reaped)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid, seconds = _stat(int(entry))
            parents[int(entry)], cpu[int(entry)] = ppid, seconds
    total, frontier = 0.0, [root]
    while frontier:
        pid = frontier.pop()
        total += cpu.get(pid, 0.0)
        frontier += [child for child, parent in parents.items() if parent == pid]
    return total


def postmaster_pid(pg_url: str) -> int | None:
    """The PostgreSQL cluster's postmaster, found by its port in the command line."""
    port = pg_url.rsplit(":", 1)[1].split("/", 1)[0]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"postgres") and f"-p {port}".encode() in b" ".join(cmd):
            return int(entry)
    return None


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def drive(
    url: str, bodies: list[bytes] | None, count: int, concurrency: int, headers: dict[str, str]
) -> tuple[float, list[float], dict[int, int]]:
    """`count` requests from `concurrency` threads (one keep-alive session each): POST `bodies`
    in turn, or GET when None. Returns (wall seconds, latencies, status counts)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    next_i = iter(range(count))

    def worker() -> None:
        http = requests.Session()
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            start = time.perf_counter()
            if bodies is None:
                resp = http.get(url, headers=headers, timeout=120)
            else:
                resp = http.post(url, data=bodies[i], headers=headers, timeout=120)
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, statuses


def run_engine(args: argparse.Namespace, engine: str, tmp: Path, pg_url: str | None) -> None:
    data_dir = tmp / engine
    data_dir.mkdir()
    (data_dir / "partners.toml").write_text(PARTNERS_TOML)
    token = mint_dev_token(data_dir, role="ehr", sub="load", partner=PARTNER, ttl_s=7200)
    ehr = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    port = free_port()
    env = {**os.environ, "FHIR_GATEWAY_LOG_LEVEL": "WARNING"}
    if pg_url:
        env["FHIR_GATEWAY_DATABASE_URL"] = pg_url
    cmd = [str(Path(sys.executable).parent / "fhir-gateway"), "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--workers", "0"]
    if args.processes:
        cmd += ["--processes", str(args.processes)]
    if args.profile:
        spy = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--subprocesses",
            "--gil",
            "-r",
            "500",
        ]
        cmd = [*spy, "--format", "raw", "-o", f"{args.profile}-{engine}.txt", "--", *cmd]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    pg_pid = postmaster_pid(pg_url) if pg_url else None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not start")
            time.sleep(0.2)
        warm = [referral_body(f"warm{i}") for i in range(args.concurrency * 4)]
        drive(f"{url}/fhir", warm, len(warm), args.concurrency, ehr)
        # Anchor: the same server and clients, GET /health.
        n_health = args.requests * 2
        h_wall, h_lat, _ = drive(f"{url}/health", None, n_health, args.concurrency, {})
        h_rate = n_health / h_wall
        for rnd in range(args.rounds):
            bodies = [referral_body(f"r{rnd}-{i}") for i in range(args.requests)]
            load0 = os.getloadavg()
            srv0, pg0, me0 = tree_cpu(server.pid), tree_cpu(pg_pid) if pg_pid else 0.0, self_cpu()
            wall, lat, statuses = drive(f"{url}/fhir", bodies, len(bodies), args.concurrency, ehr)
            srv = tree_cpu(server.pid) - srv0
            pg = (tree_cpu(pg_pid) - pg0) if pg_pid else 0.0
            me = self_cpu() - me0
            load1 = os.getloadavg()
            n = len(bodies)
            rate = n / wall
            print(
                f"{engine:10} round {rnd + 1}: {n} referrals in {wall:.2f} s = {rate:.1f}/s  "
                f"p50 {pct(lat, 50) * 1000:.0f} ms  p99 {pct(lat, 99) * 1000:.0f} ms  "
                f"max {max(lat) * 1000:.0f} ms  statuses {statuses}",
                flush=True,
            )
            print(
                f"{'':10}   CPU per referral: server {srv / n * 1000:.1f} ms, "
                f"postgres {pg / n * 1000:.1f} ms, load generator {me / n * 1000:.1f} ms; "
                f"anchor GET /health {h_rate:.0f}/s (p99 {pct(h_lat, 99) * 1000:.0f} ms), "
                f"ratio {rate / h_rate:.3f}; load average {load0[0]:.2f} -> {load1[0]:.2f} "
                f"on {os.cpu_count()} cores",
                flush=True,
            )
    finally:
        server.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --requests each")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument(
        "--processes", type=int, help="serve --processes (default: serve's, one per core)"
    )
    parser.add_argument("--profile", help="py-spy record the server into PROFILE-<engine>.txt")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fhir-gateway-load-"))
    try:
        for engine in args.engines.split(","):
            with ExitStack() as stack:
                pg_url = None
                if engine == "postgresql":
                    from tests.servers.postgres import postgres_cluster

                    pg_url = stack.enter_context(postgres_cluster())
                run_engine(args, engine, tmp, pg_url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
