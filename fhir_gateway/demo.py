"""`fhir-gateway demo`: the main job on embedded defaults, end to end over real HTTP on loopback.

Starts a sandbox EHR (FHIR R4 + SMART Backend Services) holding a Synthea cancer patient and the
gateway (SQLite, file image store, job workers) in a temporary data directory; pushes a referral
as the hospital's EHR would; the workers pull the records; the case and its work are shown; all
servers are shut down cleanly.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import requests
import uvicorn
from rich.console import Console
from rich.table import Table

from fhir_gateway.app import create_app
from fhir_gateway.auth import mint_dev_token
from fhir_gateway.client_keys import new_key
from fhir_gateway.sandbox import SandboxClient, SandboxConfig, SandboxServer
from fhir_gateway.settings import Settings

DEMO_DATA = resources.files("fhir_gateway.sandbox") / "data"
FHIR_JSON = "application/fhir+json"
PARTNER = "demo-hospital"
CLIENT_ID = "fhir-gateway-demo"
KID = "demo-gw-1"

PARTNERS_TOML = """\
# Written by `fhir-gateway demo`: one hospital whose EHR is the sandbox on loopback.
[organization]
name = "fhir-gateway demo second-opinion service"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "second-opinion" }}

[[partners]]
id = "{partner}"
name = "Demo Hospital (sandbox)"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "{partner}" }}

[partners.fhir]
base_url = "{ehr}"
auth = {{ type = "smart", client_id = "{client}", key_file = "keys/{partner}.pem", kid = "{kid}" }}

[partners.destination]
base_url = "{ehr}"
auth = {{ type = "smart", client_id = "{client}", key_file = "keys/{partner}.pem", kid = "{kid}" }}
"""


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


def _copy_tree(src: Any, dest: Path) -> Path:
    """Copy a package data folder (a Traversable) to a real directory."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            (dest / item.name).write_bytes(item.read_bytes())
    return dest


def run_demo(out: Console, *, keep: bool = False) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fhir-gateway-demo-"))
    data_dir = tmp / "data"
    out.rule("fhir-gateway demo")
    out.print(f"data directory: {data_dir} (SQLite, file image store)")
    try:
        with ExitStack() as stack:
            # Our SMART client key, registered with the sandbox EHR as a partner would.
            jwk = new_key(data_dir / "keys" / f"{PARTNER}.pem", "EC", KID)
            ehr = stack.enter_context(
                SandboxServer(
                    SandboxConfig(
                        data_dir=_copy_tree(DEMO_DATA / "ehr", tmp / "ehr"),
                        clients={CLIENT_ID: SandboxClient(CLIENT_ID, {"keys": [jwk]})},
                    )
                )
            )
            out.print(f"sandbox EHR (FHIR R4, SMART Backend Services, ES384) at {ehr.base_url}")
            (data_dir / "partners.toml").write_text(
                PARTNERS_TOML.format(partner=PARTNER, ehr=ehr.base_url, client=CLIENT_ID, kid=KID)
            )
            port = free_port()
            settings = Settings(
                data_dir=data_dir,
                public_base_url=f"http://127.0.0.1:{port}",
                log_format="console",
                log_level="WARNING",
            )
            base = stack.enter_context(serve_in_thread(create_app(settings, workers=2), port))
            out.print(f"gateway listening on {base} with 2 job workers")
            Demo(out, base, data_dir).run(ehr.base_url)
        out.print("all servers stopped cleanly")
    finally:
        if keep:
            out.print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


class Demo:
    """The steps, as the partner EHR, an operator and a reviewer would take them over HTTP."""

    def __init__(self, out: Console, base: str, data_dir: Path) -> None:
        self.out, self.base = out, base
        self.http = requests.Session()

        def bearer(role: str, sub: str, partner: str | None = None) -> dict[str, str]:
            token = mint_dev_token(data_dir, role=role, sub=sub, partner=partner)
            return {"Authorization": f"Bearer {token}"}

        self.ehr = bearer("ehr", "demo-ehr", PARTNER)
        self.admin = bearer("admin", "demo-operator")
        self.reviewer = bearer("reviewer", "dr.demo")

    def get(self, path: str, headers: dict[str, str]) -> Any:
        resp = self.http.get(f"{self.base}{path}", headers=headers, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def run(self, ehr_base: str) -> None:
        case_id = self.push_referral()
        self.wait_for_jobs(case_id, ("pull_fhir",))
        self.show_pull(case_id)
        self.report(case_id)
        self.wait_for_jobs(case_id, ("deliver_report",))
        self.show_delivery(case_id, ehr_base)

    def report(self, case_id: str) -> None:
        """An operator assigns a reviewer; the reviewer writes and submits the second opinion."""
        resp = self.http.post(
            f"{self.base}/cases/{case_id}/assignments",
            timeout=30,
            headers=self.admin,
            json={"reviewer": "dr.demo"},
        )
        resp.raise_for_status()
        draft = json.loads((DEMO_DATA / "report-draft.json").read_text())
        resp = self.http.put(
            f"{self.base}/cases/{case_id}/report",
            data=json.dumps(draft),
            headers={**self.reviewer, "Content-Type": "application/json"},
            timeout=30,
        )
        resp.raise_for_status()
        resp = self.http.post(
            f"{self.base}/cases/{case_id}/report/$submit", headers=self.reviewer, timeout=30
        )
        resp.raise_for_status()
        self.out.print(
            f"reviewer dr.demo (assigned by the operator) saved the report and "
            f"submitted it -> {resp.status_code}; delivery queued"
        )

    def show_delivery(self, case_id: str, ehr_base: str) -> None:
        report = self.get(f"/cases/{case_id}/report", self.reviewer)
        deliveries = self.get(f"/cases/{case_id}/deliveries", self.reviewer)
        dest = report.get("destination") or {}
        table = Table(title="second opinion delivered to the treating EHR")
        table.add_column("what")
        table.add_column("value")
        table.add_row(
            "DiagnosticReport on the EHR",
            f"{ehr_base}/{dest.get('type')}/{dest.get('id')} (version {dest.get('version')})",
        )
        table.add_row("report status", f"{report.get('fhirStatus')}")
        for d in deliveries:
            table.add_row(
                f"delivery {str(d.get('id', ''))[:8]}",
                f"{d.get('status')} after {d.get('attempts')} attempt(s), HTTP "
                f"{d.get('lastStatusCode', d.get('last_status_code'))}",
            )
        task_ref = self.get(f"/cases/{case_id}", self.admin)["task"]
        task = self.get(f"/fhir/{task_ref}", self.ehr)
        outputs = [o.get("valueReference", {}).get("reference") for o in task.get("output", [])]
        table.add_row(
            "referral Task (as the partner EHR polls it)",
            f"[bold]{task['status']}[/bold], output {outputs}",
        )
        self.out.print(table)

    def push_referral(self) -> str:
        out = self.out
        meta = self.get("/fhir/metadata", {})
        out.print(f"GET /fhir/metadata -> CapabilityStatement (FHIR {meta['fhirVersion']})")
        bundle = (DEMO_DATA / "referral-transaction.json").read_text()
        resp = self.http.post(
            f"{self.base}/fhir",
            data=bundle.encode(),
            timeout=30,
            headers={**self.ehr, "Content-Type": FHIR_JSON},
        )
        resp.raise_for_status()
        table = Table(title=f"partner EHR: POST /fhir (referral transaction) -> {resp.status_code}")
        table.add_column("status")
        table.add_column("location")
        for e in resp.json()["entry"]:
            table.add_row(e["response"]["status"], e["response"]["location"])
        out.print(table)
        task_loc = resp.json()["entry"][-1]["response"]["location"].split("/_history")[0]
        task = self.get(f"/fhir/{task_loc}", self.ehr)
        out.print(
            f"partner EHR polls GET /fhir/{task_loc}: Task.status = [bold]{task['status']}[/bold]"
        )
        again = self.http.post(
            f"{self.base}/fhir",
            data=bundle.encode(),
            timeout=30,
            headers={**self.ehr, "Content-Type": FHIR_JSON},
        )
        statuses = {e["response"]["status"] for e in again.json()["entry"]}
        cases = self.get("/cases", self.admin)
        out.print(
            f"same referral pushed again -> {again.status_code} {sorted(statuses)}; "
            f"cases: {len(cases)} (no second case)"
        )
        return str(cases[0]["id"])

    def wait_for_jobs(self, case_id: str, kinds: tuple[str, ...], timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        with self.out.status(f"workers running {', '.join(kinds)} ..."):
            while True:
                jobs = {j["kind"]: j for j in self.get(f"/cases/{case_id}", self.admin)["jobs"]}
                states = {k: jobs.get(k, {}).get("state") for k in kinds}
                if all(s in ("done", "dead") for s in states.values()):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jobs did not finish in {timeout_s:.0f} s: {states}")
                time.sleep(0.2)
        for kind in kinds:
            if jobs[kind]["state"] == "dead":
                raise RuntimeError(f"job {kind} failed: {jobs[kind]['lastError']}")

    def show_pull(self, case_id: str) -> None:
        case = self.get(f"/cases/{case_id}", self.admin)
        job = next(j for j in case["jobs"] if j["kind"] == "pull_fhir")
        summary = job["progress"].get("summary", {})
        table = Table(
            title=f"case {case_id}: records pulled from the EHR "
            f"(job {job['state']}, attempt {job['attempts']})"
        )
        table.add_column("resource type")
        table.add_column("count", justify="right")
        for rtype, count in sorted(summary.get("counts", {}).items()):
            table.add_row(rtype, str(count))
        self.out.print(table)
        self.out.print(
            f"stored: {summary.get('added', 0)} resources, {summary.get('binaries', 0)} attachments"
        )
        others = [f"{j['kind']}: {j['state']}" for j in case["jobs"] if j["kind"] != "pull_fhir"]
        if others:
            self.out.print("other jobs: " + ", ".join(others))


__all__ = ["run_demo", "serve_in_thread"]
