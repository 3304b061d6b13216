"""`fhir-gateway demo`: the main job on embedded defaults, end to end over real HTTP on loopback.

Starts the service (SQLite + file store in a temporary data dir) on a free loopback port, pushes
a sample referral as a partner EHR would, polls the Task, and shows the case and its work.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import requests
import uvicorn
from rich.console import Console
from rich.table import Table

from fhir_gateway.app import create_app
from fhir_gateway.auth import mint_dev_token
from fhir_gateway.settings import Settings

DEMO_DATA = resources.files("fhir_gateway.sandbox") / "data"
FHIR_JSON = "application/fhir+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_in_thread(app: Any, port: int) -> Iterator[str]:
    """Run an ASGI app with uvicorn on 127.0.0.1:port in a thread; yield its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def run_demo(out: Console, *, keep: bool = False) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fhir-gateway-demo-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    (data_dir / "partners.toml").write_text((DEMO_DATA / "partners.toml").read_text())
    port = free_port()
    settings = Settings(
        data_dir=data_dir,
        public_base_url=f"http://127.0.0.1:{port}",
        log_format="console",
        log_level="WARNING",
    )
    out.rule("fhir-gateway demo")
    out.print(f"data directory: {data_dir} (SQLite, file image store)")
    try:
        app = create_app(settings, workers=0)
        with serve_in_thread(app, port) as base:
            out.print(f"service listening on {base}")
            _push_referral(out, base, data_dir)
        out.print("service stopped cleanly")
    finally:
        if keep:
            out.print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _push_referral(out: Console, base: str, data_dir: Path) -> None:
    http = requests.Session()
    ehr = {
        "Authorization": "Bearer "
        + mint_dev_token(data_dir, role="ehr", sub="demo-ehr", partner="demo-hospital")
    }
    admin = {
        "Authorization": "Bearer " + mint_dev_token(data_dir, role="admin", sub="demo-operator")
    }
    meta = http.get(f"{base}/fhir/metadata", timeout=10)
    meta.raise_for_status()
    out.print(
        f"GET /fhir/metadata -> {meta.status_code} CapabilityStatement "
        f"(FHIR {meta.json()['fhirVersion']})"
    )

    bundle = json.loads((DEMO_DATA / "referral-transaction.json").read_text())
    resp = http.post(
        f"{base}/fhir",
        data=json.dumps(bundle),
        timeout=30,
        headers={**ehr, "Content-Type": FHIR_JSON},
    )
    resp.raise_for_status()
    table = Table(title=f"POST /fhir (referral transaction) -> {resp.status_code}")
    table.add_column("entry")
    table.add_column("status")
    table.add_column("location")
    for i, e in enumerate(resp.json()["entry"]):
        table.add_row(str(i), e["response"]["status"], e["response"]["location"])
    out.print(table)
    task_loc = resp.json()["entry"][-1]["response"]["location"].split("/_history")[0]

    task = http.get(f"{base}/fhir/{task_loc}", headers=ehr, timeout=10)
    task.raise_for_status()
    out.print(
        f"GET /fhir/{task_loc} -> {task.status_code}, ETag {task.headers['ETag']}, "
        f"Task.status = [bold]{task.json()['status']}[/bold]"
    )

    again = http.post(
        f"{base}/fhir",
        data=json.dumps(bundle),
        timeout=30,
        headers={**ehr, "Content-Type": FHIR_JSON},
    )
    statuses = [e["response"]["status"] for e in again.json()["entry"]]
    out.print(
        f"same referral pushed again -> {again.status_code}, entries {statuses} (no second case)"
    )

    cases = http.get(f"{base}/cases", headers=admin, timeout=10).json()
    case = http.get(f"{base}/cases/{cases[0]['id']}", headers=admin, timeout=10).json()
    table = Table(title=f"case {case['id']} - status {case['status']} ({len(cases)} case)")
    for col in ("job", "kind", "state", "attempts"):
        table.add_column(col)
    for j in case["jobs"]:
        table.add_row(j["id"][:8], j["kind"], j["state"], str(j["attempts"]))
    out.print(table)
