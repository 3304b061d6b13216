"""Benchmark: referral intake, 5-entry transactions at concurrency 8, through `fhir-gateway
serve` on SQLite and on PostgreSQL, against Medplum's FHIR engine receiving the same
transactions in the same run, with 0, 100,000 and 1,000,000 resources already stored.

    python tests/benchmarks/bench_intake.py                  # 0, 100k, 1M stored (full)
    python tests/benchmarks/bench_intake.py --quick          # 0 and 100k, fewer requests
    python tests/benchmarks/bench_intake.py --stored 0 --requests 300 --engines sqlite,medplum
    python tests/benchmarks/bench_intake.py --explain        # + PostgreSQL auto_explain, SQLite
                                                             #   EXPLAIN QUERY PLAN of intake
    python tests/benchmarks/bench_intake.py --rounds 3       # every size and engine 3 times in
                                                             #   turn; medians, and the median
                                                             #   of each round's 1M/empty ratio

Each request is the referral of fixtures/referrals/referral-transaction.json (Organization,
Patient, ServiceRequest, Task) plus the Condition it is for (ServiceRequest.reasonReference),
with identifiers unique per request so that every one opens a new case. As in the issue's
measurement the fixture's `ifNoneExist` are dropped (the gateway matches every identifier of
the partner anyway: a re-push is still idempotent); `--if-none-exist` keeps them, which makes
Medplum's in-memory engine scan (below). The partner's Organization is found by its identifier
(the first pushes race to create it: the warm-up absorbs that). The bodies are serialised
before the clock starts; the load generator is a raw HTTP/1.1 keep-alive client on asyncio
(one connection per concurrent client); its own CPU is measured and printed.

Stored resources ("N stored") are the gateway's hosted FHIR resources (`fhir_resources`), as
N/4 earlier referrals of the same partner: Patient, ServiceRequest, Task, Condition with 5
identifier keys (`resource_identifiers`), one case, two finished jobs and three audit rows
each, inserted with SQL into the tables the app made (its migrations, so its indexes), then
ANALYZEd (no audit checkpoint: the first audit row of a run counts the chain once). The
seeded databases are cached under .cache/bench/intake-* (SQLite file; stopped PostgreSQL data
directory; 1M: ~2.5 GB each, ~5 min to seed on 2 busy cores) and copied for every run.
Medplum (`@medplum/fhir-router` with its in-memory `MemoryRepository`; the `seed` argument of
tests/servers/medplum/server.mjs) gets the same referrals (Maps by id: creates do not slow
down as it grows). Its search, and so a conditional create, is a linear scan of every
resource of the type with a FHIRPath match each (~4 ms per 100 stored Patients here): with
`--if-none-exist`, run it with `--medplum-max-seed` low or leave it out of `--engines`.

`serve` runs with `--workers 0` (no job workers: the pulls the cases queue stay queued) and
the log level WARNING. Printed per engine and size: rate (tx/s), p50, p99, server CPU per
request (psutil: the server process and its children; for PostgreSQL also the cluster's
processes), the load generator's CPU per request, the server's file reads and writes per
request with their bytes (they do not drift with the VM's speed as CPU time does), then the
ratios: ours / Medplum (rate), and the rate at 100k and 1M relative to the empty store.
`RATIO {...}` lines go to tests/benchmarks/run_all.py (seconds per transaction, ours / anchor).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import requests  # noqa: E402

from fhir_gateway.sandbox.server import free_port  # noqa: E402
from fhir_gateway.security.auth import mint_dev_token  # noqa: E402
from tests.benchmarks.ratios import quick, report  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
MEDPLUM = ROOT / "tests" / "servers" / "medplum"
PARTNER = "st-elsewhere"
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
SEED_VERSION = 2  # bump when the seeded rows or the schema change (cache key)
# The pushing partner, with a FHIR server and a PACS to pull from (nothing listens there: the
# gateway runs without job workers, the pulls stay queued).
PARTNERS = f"""
[organization]
name = "Example Second-Opinion Service"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "second-opinion" }}

[[partners]]
id = "{PARTNER}"
name = "St Elsewhere Cancer Centre"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "{PARTNER}" }}

[partners.fhir]
base_url = "http://127.0.0.1:9/fhir"

[partners.dicomweb]
base_url = "http://127.0.0.1:9/dicom-web"
"""

# --- the request -------------------------------------------------------------------------

CONDITION_URN = "urn:uuid:7d2b9a53-0c41-4f6e-9d0e-1a2b3c4d5e05"


def referral_template(if_none_exist: bool = False) -> str:
    """The 5-entry referral as JSON text with `@T@` where each request's unique tag goes."""
    bundle: dict[str, Any] = json.loads(
        (ROOT / "fixtures/referrals/referral-transaction.json").read_text()
    )
    for entry in bundle["entry"]:
        res, req = entry["resource"], entry["request"]
        if res["resourceType"] == "Organization":
            continue
        for ident in res["identifier"]:
            ident["value"] = f"{ident['value']}-@T@"
        if "ifNoneExist" in req:
            req["ifNoneExist"] = req["ifNoneExist"] + "-@T@"
            if not if_none_exist:
                del req["ifNoneExist"]
        if res["resourceType"] == "ServiceRequest":
            res["reasonReference"] = [{"reference": CONDITION_URN}]
    condition = {
        "fullUrl": CONDITION_URN,
        "resource": {
            "resourceType": "Condition",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.3", "value": "COND-@T@"}],
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "active",
                    }
                ]
            },
            "code": {
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": "109838007",
                        "display": "Overlapping malignant neoplasm of colon",
                    }
                ]
            },
            "subject": {"reference": "urn:uuid:7d2b9a53-0c41-4f6e-9d0e-1a2b3c4d5e01"},
        },
        "request": {"method": "POST", "url": "Condition"},
    }
    bundle["entry"].insert(2, condition)  # before the ServiceRequest that points at it
    return json.dumps(bundle)


def bodies(count: int, run: str, if_none_exist: bool) -> list[bytes]:
    template = referral_template(if_none_exist)
    return [template.replace("@T@", f"{run}-{i}").encode() for i in range(count)]


# --- the load generator ------------------------------------------------------------------


@dataclass
class Load:
    latencies: list[float]
    errors: dict[int, int]
    wall_s: float
    client_cpu_s: float


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while True:  # chunked (Node's http sends it so)
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def _drive(
    host: str, port: int, path: str, headers: dict[str, str], payloads: list[bytes], conc: int
) -> Load:
    latencies: list[float] = []
    errors: dict[int, int] = {}
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    todo = iter(payloads)

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for body in todo:
                start = time.perf_counter()
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                status, answer = await _read_response(reader)
                if status == 200 and b"201" in answer:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[status] = errors.get(status, 0) + 1
                    if len(errors) == 1 and errors[status] == 1:
                        print(f"  first error {status}: {answer[:300]!r}", file=sys.stderr)
        finally:
            writer.close()

    me = psutil.Process()
    cpu0, t0 = sum(me.cpu_times()[:2]), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(conc)))
    wall = time.perf_counter() - t0
    return Load(latencies, errors, wall, sum(me.cpu_times()[:2]) - cpu0)


def cpu_of(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their children, now."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def io_of(pids: list[int]) -> tuple[int, int, int, int]:
    """(bytes read, read calls, bytes written, write calls) by these processes and their
    children so far, as the kernel counts their read and write calls (page-cache reads
    included; sockets read with recv and written with send, as libpq and asyncio do, are not):
    unlike CPU time, these do not drift with this VM's speed, so they show what a change or a
    larger store does to the database's file I/O per referral."""
    total = [0, 0, 0, 0]
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                io = p.io_counters()
                for i, v in enumerate(
                    (io.read_chars, io.read_count, io.write_chars, io.write_count)
                ):
                    total[i] += v
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    return total[0], total[1], total[2], total[3]


@dataclass
class Result:
    engine: str
    stored: int
    rate: float
    p50: float
    p99: float
    server_cpu_ms: float
    db_cpu_ms: float | None
    client_cpu_ms: float
    ok: int
    errors: dict[int, int]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if values else 0.0


def measure(
    engine: str,
    stored: int,
    url: str,
    headers: dict[str, str],
    payloads: list[bytes],
    conc: int,
    server_pids: list[int],
    db_pids: list[int],
    warmup: int,
    statements_url: str | None = None,
) -> Result:
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, port = host_port.split(":")
    path = "/" + path
    asyncio.run(_drive(host, int(port), path, headers, payloads[:warmup], conc))
    if statements_url:
        pg_statements(statements_url, None)
    cpu0, db0, io0 = cpu_of(server_pids), cpu_of(db_pids), io_of(server_pids)
    load = asyncio.run(_drive(host, int(port), path, headers, payloads[warmup:], conc))
    n = len(load.latencies) + sum(load.errors.values())
    server_cpu = cpu_of(server_pids) - cpu0
    io = [(b - a) / n for a, b in zip(io0, io_of(server_pids), strict=True)]
    db_cpu = cpu_of(db_pids) - db0 if db_pids else None
    res = Result(
        engine,
        stored,
        len(load.latencies) / load.wall_s,
        pct(load.latencies, 50),
        pct(load.latencies, 99),
        server_cpu / n * 1000,
        db_cpu / n * 1000 if db_cpu is not None else None,
        load.client_cpu_s / n * 1000,
        len(load.latencies),
        load.errors,
    )
    db = f" + PostgreSQL {res.db_cpu_ms:5.1f} ms" if res.db_cpu_ms is not None else ""
    print(
        f"{engine:10} {stored:>9,} stored: {res.rate:7.1f} tx/s  p50 {res.p50 * 1000:6.1f} ms  "
        f"p99 {res.p99 * 1000:7.1f} ms  server CPU {res.server_cpu_ms:5.1f} ms/tx{db}  "
        f"load generator {res.client_cpu_ms:4.2f} ms/tx  ({res.ok} ok, errors {res.errors or 0})"
        f"  load {os.getloadavg()[0]:.2f}\n{'':30}server I/O per tx: read {io[0] / 1024:.0f} KB in "
        f"{io[1]:.0f} calls, wrote {io[2] / 1024:.0f} KB in {io[3]:.0f} calls",
        flush=True,
    )
    if statements_url:
        pg_statements(statements_url, n)
    return res


def pg_statements(url: str, per: int | None, limit: int = 25) -> None:
    """pg_stat_statements (`--statements`): `per` None resets it (after the warm-up); else
    prints each statement's calls and execution time per referral, and the totals."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as con:
        if per is None:
            con.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
            con.execute(text("SELECT pg_stat_statements_reset()"))
            con.commit()
            return
        rows = con.execute(
            text(
                "SELECT calls, total_exec_time, query FROM pg_stat_statements "
                "WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY calls DESC, "
                "total_exec_time DESC"
            )
        ).all()
    engine.dispose()
    calls = sum(r[0] for r in rows)
    exec_ms = sum(r[1] for r in rows)
    print(
        f"# pg_stat_statements: {calls / per:.1f} statements per referral, "
        f"{exec_ms / per:.3f} ms execution per referral; the most called:"
    )
    for c, t, q in rows[:limit]:
        print(f"#   {c / per:5.2f}/ref {t / per:7.3f} ms/ref  {' '.join(q.split())[:150]}")


# --- seeding (the gateway's own tables, made by its migrations) ----------------------------


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


SYSTEMS = {
    "mrn": "http://hospital.smarthealthit.org",
    "synthea": "https://github.com/synthetichealth/synthea",
    "ref": "urn:oid:2.16.840.1.113883.3.9999.1",
    "task": "urn:oid:2.16.840.1.113883.3.9999.2",
    "cond": "urn:oid:2.16.840.1.113883.3.9999.3",
}


def _seed_bodies() -> dict[str, str]:
    """Bodies of one seeded referral, `@I@` = its number, `@P@`/`@S@`/`@K@`/`@C@` = ids."""
    template = json.loads(referral_template().replace("@T@", "seed-@I@"))
    out = {}
    ids = {"Patient": "@P@", "ServiceRequest": "@S@", "Task": "@K@", "Condition": "@C@"}
    for entry in template["entry"]:
        res = entry["resource"]
        if res["resourceType"] not in ids:
            continue
        res["id"] = ids[res["resourceType"]]
        res["meta"] = {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00.000Z"}
        text = json.dumps(res, separators=(",", ":"))
        text = text.replace("urn:uuid:7d2b9a53-0c41-4f6e-9d0e-1a2b3c4d5e01", "Patient/@P@")
        text = text.replace("urn:uuid:7d2b9a53-0c41-4f6e-9d0e-1a2b3c4d5e02", "ServiceRequest/@S@")
        text = text.replace(CONDITION_URN, "Condition/@C@")
        text = text.replace("urn:uuid:7d2b9a53-0c41-4f6e-9d0e-1a2b3c4d5e03", "Organization/@O@")
        out[res["resourceType"]] = text
    return out


def _seed_ids(i: int) -> dict[str, str]:
    u = uuid.UUID(bytes=hashlib.md5(str(i).encode()).digest())
    return {k: str(uuid.UUID(int=(u.int + n) % (1 << 128))) for n, k in enumerate("PSKCJ")}


def seed_sqlite(db: Path, stored: int) -> None:
    """Rows for `stored` resources, in big executemany transactions (raw sqlite3)."""
    t_bodies = _seed_bodies()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-512000")  # 500 MB: the random-key indexes stay in memory
    ts = "2026-01-01 00:00:00.000000"
    referrals = stored // 4
    batch = 20_000
    audit_id = 0
    for start in range(0, referrals, batch):
        cases, res, keys, jobs, audits = [], [], [], [], []
        for i in range(start, min(referrals, start + batch)):
            ids = _seed_ids(i)
            case_id = ids["J"]
            cases.append(
                (case_id, PARTNER, "complete", ids["K"], ids["S"], f"Patient/{ids['P']}", ts, ts)
            )
            for rtype, key in (
                ("Patient", "P"),
                ("ServiceRequest", "S"),
                ("Task", "K"),
                ("Condition", "C"),
            ):
                body = t_bodies[rtype]
                for k2 in "PSKC":
                    body = body.replace(f"@{k2}@", ids[k2])
                res.append((rtype, ids[key], 1, PARTNER, case_id, ts, body.replace("@I@", str(i))))
            v = f"-seed-{i}"
            for rtype, system, value in (
                ("Patient", SYSTEMS["synthea"], "5f258739-cc1d-4109-aa6b-28ad184c6258" + v),
                ("Patient", SYSTEMS["mrn"], "5f258739-cc1d-4109-aa6b-28ad184c6258" + v),
                ("ServiceRequest", SYSTEMS["ref"], "REF-2026-0001" + v),
                ("Task", SYSTEMS["task"], "TASK-2026-0001" + v),
                ("Condition", SYSTEMS["cond"], "COND" + v),
            ):
                rid = ids[{"Patient": "P", "ServiceRequest": "S", "Task": "K"}.get(rtype, "C")]
                keys.append((PARTNER, rtype, sha(value), sha(system), rid))
            for kind in ("pull_fhir", "pull_imaging"):
                jobs.append(
                    (
                        str(uuid.uuid5(uuid.NAMESPACE_OID, kind + case_id)),
                        kind,
                        case_id,
                        "{}",
                        f"{kind}:{case_id}",
                        "done",
                        1,
                        8,
                        ts,
                        None,
                        None,
                        None,
                        "{}",
                        ts,
                        ts,
                        ts,
                    )
                )
            for action in ("referral.intake", "case.read", "case.bundle.read"):
                audit_id += 1
                audits.append(
                    (
                        audit_id,
                        ts,
                        action,
                        "0",
                        "bench",
                        "ehr",
                        case_id,
                        f"Patient/{ids['P']}",
                        f'["Task/{ids["K"]}"]',
                        None,
                        sha(str(audit_id - 1)),
                        sha(str(audit_id)),
                    )
                )
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO cases (id, partner_id, status, task_id, service_request_id, "
            "patient_ref, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            cases,
        )
        con.executemany(
            "INSERT INTO fhir_resources (resource_type, id, version_id, partner_id, case_id, "
            "last_updated, body) VALUES (?,?,?,?,?,?,?)",
            res,
        )
        con.executemany(
            "INSERT INTO resource_identifiers (partner_id, resource_type, value_hash, "
            "system_hash, resource_id) VALUES (?,?,?,?,?)",
            keys,
        )
        con.executemany(
            "INSERT INTO jobs (id, kind, case_id, payload, dedup_key, state, attempts, "
            "max_attempts, run_at, lease_owner, lease_expires_at, last_error, progress, "
            "created_at, updated_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            jobs,
        )
        con.executemany(
            "INSERT INTO audit_events (id, recorded, action, outcome, agent, agent_role, case_id, "
            "patient, entity, request_id, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            audits,
        )
        con.execute("COMMIT")
    con.execute("ANALYZE")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


# PostgreSQL: the same rows, generated in the server (generate_series), ids from md5.
PG_SEED = """
CREATE TEMP TABLE seed AS
SELECT i,
       md5(i::text || 'P')::uuid::text AS p, md5(i::text || 'S')::uuid::text AS s,
       md5(i::text || 'K')::uuid::text AS k, md5(i::text || 'C')::uuid::text AS c,
       md5(i::text || 'J')::uuid::text AS j
FROM generate_series(0, :referrals - 1) AS i;
INSERT INTO cases SELECT j, :partner, 'complete', k, s, 'Patient/' || p, :ts, :ts FROM seed;
INSERT INTO fhir_resources (resource_type, id, version_id, partner_id, case_id, last_updated, body)
SELECT t.rtype, CASE t.rtype WHEN 'Patient' THEN p WHEN 'ServiceRequest' THEN s
                             WHEN 'Task' THEN k ELSE c END,
       1, :partner, j, :ts,
       replace(replace(replace(replace(replace(t.body, '@P@', p), '@S@', s), '@K@', k),
               '@C@', c), '@I@', i::text)
FROM seed, (VALUES ('Patient', :b_patient), ('ServiceRequest', :b_sr), ('Task', :b_task),
                   ('Condition', :b_cond)) AS t(rtype, body);
INSERT INTO resource_identifiers (partner_id, resource_type, value_hash, system_hash, resource_id)
SELECT :partner, t.rtype, encode(sha256(convert_to(t.value || '-seed-' || i, 'UTF8')), 'hex'),
       encode(sha256(convert_to(t.system, 'UTF8')), 'hex'),
       CASE t.rtype WHEN 'Patient' THEN p WHEN 'ServiceRequest' THEN s
                    WHEN 'Task' THEN k ELSE c END
FROM seed, (VALUES ('Patient', :sys_synthea, '5f258739-cc1d-4109-aa6b-28ad184c6258'),
                   ('Patient', :sys_mrn, '5f258739-cc1d-4109-aa6b-28ad184c6258'),
                   ('ServiceRequest', :sys_ref, 'REF-2026-0001'),
                   ('Task', :sys_task, 'TASK-2026-0001'),
                   ('Condition', :sys_cond, 'COND')) AS t(rtype, system, value);
INSERT INTO jobs (id, kind, case_id, payload, dedup_key, state, attempts, max_attempts, run_at,
                  progress, created_at, updated_at, finished_at)
SELECT md5(j || kind)::uuid::text, kind, j, '{}', kind || ':' || j, 'done', 1, 8, :ts, '{}',
       :ts, :ts, :ts
FROM seed, (VALUES ('pull_fhir'), ('pull_imaging')) AS k(kind);
INSERT INTO audit_events (recorded, action, outcome, agent, agent_role, case_id, patient, entity,
                          prev_hash, hash)
SELECT :ts, a.action, '0', 'bench', 'ehr', j, 'Patient/' || p, '["Task/' || k || '"]',
       md5(i::text || a.action) || md5(a.action || i::text),
       md5(a.action || i::text) || md5(i::text || a.action)
FROM seed, (VALUES ('referral.intake'), ('case.read'), ('case.bundle.read')) AS a(action)
ORDER BY i, a.action;
"""


def seed_postgres(url: str, stored: int) -> None:
    from sqlalchemy import create_engine, text

    t_bodies = _seed_bodies()
    engine = create_engine(url)
    params = {
        "referrals": stored // 4,
        "partner": PARTNER,
        "ts": "2026-01-01T00:00:00+00:00",
        "b_patient": t_bodies["Patient"],
        "b_sr": t_bodies["ServiceRequest"],
        "b_task": t_bodies["Task"],
        "b_cond": t_bodies["Condition"],
        **{f"sys_{k}": v for k, v in SYSTEMS.items()},
    }
    with engine.begin() as con:
        for statement in PG_SEED.split(";"):
            if statement.strip():
                stmt = text(statement)
                con.execute(stmt, {k: v for k, v in params.items() if f":{k}" in statement})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as con:
        con.execute(text("VACUUM ANALYZE"))
    engine.dispose()


# --- the servers ---------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"PostgreSQL's {name} is not installed")
    return found


def _as_pg(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def pg_cluster(data: Path, *, explain: bool, statements: bool = False) -> Iterator[tuple[str, int]]:
    """Start PostgreSQL on `data` (a data directory) on a free port: (URL, postmaster pid)."""
    port = free_port()
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    if statements:
        opts += (
            " -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
            " -c pg_stat_statements.track_utility=on"
        )
    if explain:
        opts += (
            " -c shared_preload_libraries=auto_explain -c auto_explain.log_min_duration=20"
            " -c auto_explain.log_analyze=on -c auto_explain.log_buffers=on"
            " -c log_min_duration_statement=20"
        )
    log = data / "pg.log"
    subprocess.run(
        _as_pg([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o", opts, "start"]),
        check=True,
        capture_output=True,
    )
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql+psycopg://gateway@127.0.0.1:{port}/gateway", pid
    finally:
        subprocess.run(
            _as_pg([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )


def pg_template(stored: int) -> Path:
    """A stopped PostgreSQL data directory with the schema and `stored` resources (cached)."""
    path = CACHE / f"intake-pg-v{SEED_VERSION}-{stored}"
    if (path / "PG_VERSION").exists():
        return path
    from fhir_gateway.store.db import open_store

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres")
    initdb = [_pg_bin("initdb"), "-D", str(path), "-U", "gateway", "--auth=trust", "-E", "UTF8"]
    subprocess.run(
        _as_pg([*initdb, "--no-sync"]),
        check=True,
        capture_output=True,
    )
    t0 = time.perf_counter()
    with pg_cluster(path, explain=False) as (url, _):
        port = url.rsplit(":", 1)[1].split("/")[0]
        subprocess.run(
            [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", port, "-U", "gateway", "gateway"],
            check=True,
            capture_output=True,
        )
        store = open_store(url, key_dir=CACHE / "keys")
        store.dispose()
        if stored:
            seed_postgres(url, stored)
    print(f"# seeded PostgreSQL with {stored:,} resources in {time.perf_counter() - t0:.0f} s")
    return path


def sqlite_template(stored: int) -> Path:
    path = CACHE / f"intake-sqlite-v{SEED_VERSION}-{stored}.db"
    if path.exists():
        return path
    from fhir_gateway.store.db import open_store

    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    open_store(f"sqlite:///{tmp}", key_dir=CACHE / "keys").dispose()
    if stored:
        seed_sqlite(tmp, stored)
    tmp.rename(path)
    print(f"# seeded SQLite with {stored:,} resources in {time.perf_counter() - t0:.0f} s")
    return path


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.2)


@contextmanager
def gateway(
    data_dir: Path, db_url: str | None, processes: int | None = None, profile: str | None = None
) -> Iterator[tuple[str, dict[str, str], int]]:
    """`fhir-gateway serve` on a free port: (transaction URL, EHR headers, pid). `profile`:
    under `py-spy record` into that file (py-spy's own CPU then counts as the server's)."""
    (data_dir / "partners.toml").write_text(PARTNERS)
    token = mint_dev_token(data_dir, role="ehr", sub="bench", partner=PARTNER)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    port = free_port()
    env = {**os.environ, "FHIR_GATEWAY_LOG_LEVEL": "WARNING"}
    if db_url:
        env["FHIR_GATEWAY_DATABASE_URL"] = db_url
    cmd = [str(Path(sys.executable).parent / "fhir-gateway"), "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--workers", "0"]
    if processes:
        cmd += ["--processes", str(processes)]
    if profile:
        spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--subprocesses", "--gil"]
        cmd = [*spy, "-r", "500", "--format", "raw", "-o", profile, "--", *cmd]
    # its own process group: stopping it stops uvicorn's worker processes too
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, "the gateway")
        yield f"http://127.0.0.1:{port}/fhir", headers, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # py-spy writes its profile on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@contextmanager
def medplum(seed: int) -> Iterator[tuple[str, int]]:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not installed (Medplum's engine is the anchor)")
    if not (MEDPLUM / "node_modules" / "@medplum" / "fhir-router").is_dir():
        subprocess.run(["sh", str(MEDPLUM / "install.sh")], check=True, capture_output=True)
    proc = subprocess.Popen(
        [
            node,
            "--max-old-space-size=6144",
            "--experimental-websocket",
            "server.mjs",
            "0",
            str(seed),
        ],
        cwd=MEDPLUM,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING"):
            raise SystemExit("Medplum's server did not start")
        yield f"http://127.0.0.1:{int(line.split()[1])}/fhir/R4", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()


# --- plans ---------------------------------------------------------------------------------


def sqlite_plans(db: Path) -> None:
    """EXPLAIN QUERY PLAN of the queries intake runs, on the seeded SQLite file."""
    con = sqlite3.connect(db)
    h = sha("x")
    queries = _intake_queries(h, h)
    queries["audit.record lock"] = queries["audit.record previous hash"]  # no FOR UPDATE here
    for name, q in queries.items():
        plan = "; ".join(r[3] for r in con.execute("EXPLAIN QUERY PLAN " + q))
        print(f"# SQLite plan, {name}: {plan}")
    con.close()


def _intake_queries(hit: str, system: str) -> dict[str, str]:
    """The statements intake runs per referral that read stored rows ($n = parameters, as
    SQLAlchemy + psycopg send them), for EXPLAIN."""
    return {
        "find_by_identifier (If-None-Exist)": (
            "SELECT f.* FROM fhir_resources f JOIN resource_identifiers r ON r.resource_type = "
            "f.resource_type AND r.resource_id = f.id WHERE r.resource_type = 'Patient' AND "
            f"r.value_hash = '{hit}' AND r.system_hash = '{system}' AND r.partner_id = "
            f"'{PARTNER}' ORDER BY f.last_updated, f.id"
        ),
        "match_identifiers": (
            "SELECT system_hash, value_hash, resource_id FROM resource_identifiers WHERE "
            f"partner_id = '{PARTNER}' AND resource_type = 'Patient' AND value_hash IN "
            f"('{hit}', '{sha('new')}')"
        ),
        "_load (Organization found)": (
            "SELECT id, version_id, last_updated, case_id FROM fhir_resources WHERE "
            "resource_type = 'Organization' AND id IN ('x')"
        ),
        "hosted.update: delete the Task's keys": (
            "DELETE FROM resource_identifiers WHERE resource_type = 'Task' AND resource_id = 'x'"
        ),
        "jobs.enqueue dedup": "SELECT * FROM jobs WHERE dedup_key = 'pull_fhir:x'",
        "subscriptions of the partner": (
            f"SELECT * FROM subscriptions WHERE partner_id = '{PARTNER}' AND status IN "
            "('requested', 'active') ORDER BY id"
        ),
        "audit.record lock": "SELECT id FROM audit_events ORDER BY id DESC LIMIT 1 FOR UPDATE",
        "audit.record previous hash": "SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1",
        "audit.record count (first row only)": "SELECT count(*) FROM audit_events",
    }


def pg_plans(url: str) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of intake's reading statements on the seeded database."""
    from sqlalchemy import create_engine, text

    value = "5f258739-cc1d-4109-aa6b-28ad184c6258-seed-7"
    engine = create_engine(url)
    with engine.connect() as con:
        for name, q in _intake_queries(sha(value), sha(SYSTEMS["mrn"])).items():
            plan = con.execute(text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + q)).scalars()
            print(f"# PostgreSQL plan, {name}:\n#   " + "\n#   ".join(plan))
            con.rollback()
        # the generic plan psycopg's prepared statements get after 5 executions
        con.execute(text("SET plan_cache_mode = force_generic_plan"))
        con.execute(
            text(
                "PREPARE fbi(text, text, text, text) AS SELECT f.* FROM fhir_resources f JOIN "
                "resource_identifiers r ON r.resource_type = f.resource_type AND "
                "r.resource_id = f.id WHERE r.resource_type = $1 AND r.value_hash = $2 AND "
                "r.system_hash = $3 AND r.partner_id = $4 ORDER BY f.last_updated, f.id"
            )
        )
        args = f"'Patient', '{sha(value)}', '{sha(SYSTEMS['mrn'])}', '{PARTNER}'"
        plan = con.execute(
            text(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE fbi({args})")
        ).scalars()
        print("# PostgreSQL generic plan, find_by_identifier:\n#   " + "\n#   ".join(plan))
    engine.dispose()


def pg_slow_statements(log: Path, limit: int = 8) -> None:
    """The slowest statements auto_explain logged (plans of those over 20 ms)."""
    if not log.exists():
        return
    text = log.read_text(errors="replace")
    chunks = [c for c in text.split("LOG:  duration: ") if "plan:" in c or "statement:" in c]
    chunks.sort(key=lambda c: -float(c.split(" ms", 1)[0]) if c[:1].isdigit() else 0)
    print(f"# PostgreSQL: {len(chunks)} statements over 20 ms; the slowest:")
    for c in chunks[:limit]:
        print("#   " + c.strip()[:1500].replace("\n", "\n#   "))


# --- main ----------------------------------------------------------------------------------


def settle() -> None:
    """Write the copied template to disk before measuring: the kernel's writeback of a 2-4 GB
    copy otherwise runs during the run and costs CPU that would count against the larger
    stores (seen: 1M on SQLite at 0.72x the empty rate without this)."""
    os.sync()
    time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0 and 100k stored, fewer requests")
    parser.add_argument("--stored", default=None, help="comma list (default 0,100000,1000000)")
    parser.add_argument("--requests", type=int, default=None, help="per run (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--engines", default="medplum,sqlite,postgresql")
    parser.add_argument("--medplum-max-seed", type=int, default=1_000_000)
    parser.add_argument(
        "--if-none-exist",
        action="store_true",
        help="keep the fixture's conditional creates (Medplum's in-memory engine then scans)",
    )
    parser.add_argument("--explain", action="store_true", help="query plans (auto_explain)")
    parser.add_argument(
        "--statements",
        action="store_true",
        help="PostgreSQL: statements per referral and their execution time (pg_stat_statements)",
    )
    parser.add_argument("--processes", type=int, help="serve --processes (default: serve's, 1)")
    parser.add_argument("--profile", help="py-spy record each gateway into PROFILE-<run>.txt")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every size and engine N times, alternating; summary = medians",
    )
    args = parser.parse_args()
    short = args.quick or quick()
    stored = [
        int(s) for s in (args.stored or ("0,100000" if short else "0,100000,1000000")).split(",")
    ]
    n_req = args.requests or (300 if short else 1000)
    warmup = 20
    engines = args.engines.split(",")
    cores, load = os.cpu_count(), os.getloadavg()
    print(
        f"# intake: {n_req} referral transactions (5 entries) per run at concurrency "
        f"{args.concurrency} after {warmup} warm-up; {cores} cores; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    results: dict[tuple[str, int], list[Result]] = {}
    tmp_root = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    tmp_root.chmod(0o755)  # PostgreSQL runs as `postgres` when we are root
    try:
        for round_no, n in ((r, n) for r in range(args.rounds) for n in stored):
            if "sqlite" in engines:
                template = sqlite_template(n)
            if "postgresql" in engines:
                pg_tpl = pg_template(n)
            for engine in engines:
                payloads = bodies(
                    n_req + warmup, f"{engine}-{n}-{uuid.uuid4().hex[:8]}", args.if_none_exist
                )
                run_dir = tmp_root / f"{engine}-{n}-{round_no}"
                run_dir.mkdir()
                if engine == "medplum":
                    if n > args.medplum_max_seed:
                        print(f"medplum    {n:>9,} stored: skipped (--medplum-max-seed, see doc)")
                        continue
                    with medplum(n) as (url, pid):
                        result = measure(
                            engine,
                            n,
                            url,
                            {"Content-Type": "application/fhir+json"},
                            payloads,
                            args.concurrency,
                            [pid],
                            [],
                            warmup,
                        )
                    results.setdefault((engine, n), []).append(result)
                elif engine == "sqlite":
                    shutil.copy(template, run_dir / "gateway.db")
                    settle()
                    spy = f"{args.profile}-sqlite-{n}.txt" if args.profile else None
                    with gateway(run_dir, None, args.processes, spy) as (url, headers, pid):
                        result = measure(
                            engine, n, url, headers, payloads, args.concurrency, [pid], [], warmup
                        )
                    results.setdefault((engine, n), []).append(result)
                    if args.explain:
                        sqlite_plans(run_dir / "gateway.db")
                elif engine == "postgresql":
                    data = run_dir / "pgdata"
                    subprocess.run(["cp", "-a", str(pg_tpl), str(data)], check=True)
                    settle()
                    with (
                        pg_cluster(data, explain=args.explain, statements=args.statements) as (
                            db_url,
                            pg_pid,
                        ),
                        gateway(
                            run_dir,
                            db_url,
                            args.processes,
                            f"{args.profile}-postgresql-{n}.txt" if args.profile else None,
                        ) as (url, headers, pid),
                    ):
                        result = measure(
                            engine,
                            n,
                            url,
                            headers,
                            payloads,
                            args.concurrency,
                            [pid],
                            [pg_pid],
                            warmup,
                            db_url if args.statements else None,
                        )
                        if args.explain:
                            pg_plans(db_url)
                    results.setdefault((engine, n), []).append(result)
                    if args.explain:
                        pg_slow_statements(data / "pg.log")
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    summarise(results, stored, engines)


def median_result(runs: list[Result]) -> Result:
    """One result from several rounds: the median of each measure (errors summed)."""
    if len(runs) == 1:
        return runs[0]
    med = statistics.median
    errors: dict[int, int] = {}
    for r in runs:
        for status, k in r.errors.items():
            errors[status] = errors.get(status, 0) + k
    db = [r.db_cpu_ms for r in runs if r.db_cpu_ms is not None]
    return Result(
        runs[0].engine,
        runs[0].stored,
        med(r.rate for r in runs),
        med(r.p50 for r in runs),
        med(r.p99 for r in runs),
        med(r.server_cpu_ms for r in runs),
        med(db) if db else None,
        med(r.client_cpu_ms for r in runs),
        sum(r.ok for r in runs),
        errors,
    )


def summarise(
    runs: dict[tuple[str, int], list[Result]], stored: list[int], engines: list[str]
) -> None:
    results = {key: median_result(rs) for key, rs in runs.items()}
    rounds = max((len(rs) for rs in runs.values()), default=1)
    anchors = sorted((n, r) for (e, n), r in results.items() if e == "medplum")
    if rounds > 1:
        print(f"# medians of {rounds} rounds (each round: every size and engine once, in turn):")
        for (engine, n), med in sorted(results.items()):
            rates = ", ".join(f"{x.rate:.0f}" for x in runs[(engine, n)])
            print(
                f"{engine:10} {n:>9,} stored: {med.rate:7.1f} tx/s  p50 {med.p50 * 1000:6.1f} ms  "
                f"p99 {med.p99 * 1000:6.1f} ms  server CPU {med.server_cpu_ms:5.1f} ms/tx"
                + (f" + {med.db_cpu_ms:.1f} ms" if med.db_cpu_ms is not None else "")
                + f"  (rounds: {rates} tx/s)"
            )
    print("# ratios (rate, higher is better):")
    for engine in (e for e in engines if e != "medplum"):
        empty = results.get((engine, stored[0]))
        for n in stored:
            r = results.get((engine, n))
            if r is None:
                continue
            anchor = next((a for m, a in reversed(anchors) if m <= n), None)
            parts = []
            if anchor is not None:
                parts.append(
                    f"ours/Medplum({anchor.stored:,}) {r.rate / anchor.rate:.3f}x "
                    f"(p99 {r.p99 * 1000:.0f} vs {anchor.p99 * 1000:.0f} ms, CPU/tx "
                    f"{r.server_cpu_ms:.1f} vs {anchor.server_cpu_ms:.1f} ms)"
                )
            vs_empty = None
            if empty is not None and n != stored[0]:
                # Each round's pair was measured minutes apart, not hours: the median of the
                # per-round ratios is steadier than the ratio of the medians on a VM whose
                # speed drifts.
                pairs = list(zip(runs[(engine, stored[0])], runs[(engine, n)], strict=False))
                vs_empty = statistics.median(b.rate / a.rate for a, b in pairs)
                each = ", ".join(f"{b.rate / a.rate:.2f}" for a, b in pairs)
                parts.append(
                    f"rate vs empty {vs_empty:.3f}x (target >= 0.9)"
                    + (f" (rounds: {each})" if len(pairs) > 1 else "")
                )
                cpu, cpu0 = (
                    r.server_cpu_ms + (r.db_cpu_ms or 0),
                    empty.server_cpu_ms + (empty.db_cpu_ms or 0),
                )
                parts.append(f"server CPU/tx vs empty {cpu / cpu0:.3f}x")
            print(f"# {engine:10} {n:>9,} stored: " + "; ".join(parts))
            if anchor is not None:
                report(
                    f"intake {engine} {n:,} stored, s per tx",
                    1 / r.rate,
                    1 / anchor.rate,
                    "rate >= 300/s",
                    f"Medplum engine {anchor.stored:,}",
                )
            if vs_empty is not None:
                report(
                    f"intake {engine} {n:,} vs empty, s per tx",
                    1 / r.rate,
                    vs_empty / r.rate,  # the ratio is 1 / vs_empty
                    "<= 1.11 (0.9x rate)",
                    f"ours, {stored[0]:,} stored",
                )


if __name__ == "__main__":
    main()
