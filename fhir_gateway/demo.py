"""`fhir-gateway demo`: the main job on embedded defaults, end to end over real HTTP on loopback.

Starts a sandbox EHR (FHIR R4 + SMART Backend Services) holding a Synthea cancer patient and the
gateway (SQLite, file image store, job workers) in a temporary data directory; pushes a referral
as the hospital's EHR would; the workers pull the records; the case and its work are shown; all
servers are shut down cleanly.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from fhir_gateway.app import create_app
from fhir_gateway.errors import GatewayError
from fhir_gateway.logging import configure_logging
from fhir_gateway.sandbox import SandboxClient, SandboxConfig, SandboxServer
from fhir_gateway.sandbox.cd import write_cd
from fhir_gateway.sandbox.pacs import PacsServer
from fhir_gateway.sandbox.server import AppServer, free_port
from fhir_gateway.security import audit
from fhir_gateway.security.auth import mint_dev_token
from fhir_gateway.security.client_keys import new_key
from fhir_gateway.settings import Settings
from fhir_gateway.store import open_store

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

[partners.dicomweb]
base_url = "{pacs}"
search_by_patient = false

[partners.destination]
base_url = "{ehr}"
auth = {{ type = "smart", client_id = "{client}", key_file = "keys/{partner}.pem", kid = "{kid}" }}

[[partners.recipients]]            # a copy of the report for the pathology lab
name = "pathology-lab"
base_url = "{lab}"
auth = {{ type = "smart", client_id = "{client}", key_file = "keys/{partner}.pem", kid = "{kid}" }}
"""


def _copy_tree(src: Any, dest: Path) -> Path:
    """Copy a package data folder (a Traversable) to a real directory."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            (dest / item.name).write_bytes(item.read_bytes())
    return dest


def run_demo(
    out: Console,
    *,
    keep: bool = False,
    err: Console | None = None,
    collect: dict[str, Any] | None = None,
) -> int:
    """Run the demo; returns the exit code. The story goes to `out`; the services' logs go to
    `demo.log` beside the data directory. On failure the reason and what to do go to `err`
    (default `out`), and the temporary directory is kept for a look at the log and data.
    `collect` (for tests) receives what the gateway produced: the case bundle, its summary and
    timeline, and the delivered DiagnosticReport."""
    err = err or out
    tmp = Path(tempfile.mkdtemp(prefix="fhir-gateway-demo-"))
    data_dir = tmp / "data"
    log_path = tmp / "demo.log"
    out.print("[bold]fhir-gateway demo[/bold]")
    out.print(f"data directory: {data_dir} (SQLite, file image store); log: {log_path}")
    failed = False
    with log_path.open("w", encoding="utf-8") as log_file:
        configure_logging("console", "INFO", stream=log_file)
        try:
            _run(out, tmp, data_dir, collect, keep=keep)
        except (GatewayError, requests.RequestException, RuntimeError) as exc:
            failed = True
            _explain_failure(err, exc, log_path, tmp)
        finally:
            configure_logging("console", "WARNING")  # the log file closes below
    if keep and not failed:
        out.print(f"kept {tmp}")
    elif not failed:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def _run(
    out: Console,
    tmp: Path,
    data_dir: Path,
    collect: dict[str, Any] | None,
    *,
    keep: bool = False,
) -> None:
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
        lab = stack.enter_context(
            SandboxServer(
                SandboxConfig(clients={CLIENT_ID: SandboxClient(CLIENT_ID, {"keys": [jwk]})})
            )
        )
        out.print(f"sandbox pathology lab EHR (a further report recipient) at {lab.base_url}")
        receiver = stack.enter_context(_Receiver())
        pacs = stack.enter_context(PacsServer(_copy_tree(DEMO_DATA / "pacs", tmp / "pacs")))
        out.print(
            "sandbox PACS (DICOMweb: the patient's CT series, and another patient's X-ray) "
            f"at {pacs.base_url}"
        )
        (data_dir / "partners.toml").write_text(
            PARTNERS_TOML.format(
                partner=PARTNER,
                ehr=ehr.base_url,
                pacs=pacs.base_url,
                lab=lab.base_url,
                client=CLIENT_ID,
                kid=KID,
            )
        )
        port = free_port()
        settings = Settings(
            data_dir=data_dir,
            public_base_url=f"http://127.0.0.1:{port}",
            log_format="console",
            log_level="INFO",
        )
        app = create_app(settings, workers=2, configure_logs=False)  # logs: the demo's file
        base = stack.enter_context(AppServer(app, port, lifespan=True)).url
        out.print(f"gateway listening on {base} with 2 job workers")
        demo = Demo(out, base, data_dir)
        demo.receiver = receiver
        demo.run(ehr.base_url)
        if collect is not None:
            collect.update(demo.collected)
        out.print(
            f"reviewer workspace: {base}/app (case page {base}/app/cases/{demo.case_id}); "
            "browser tests and screenshots: docs/screenshots/"
        )
        if keep:
            _serve_until_interrupted(out, base)
    out.print("all servers stopped cleanly")
    store = open_store(Settings(data_dir=data_dir).db_url, key_dir=data_dir / "keys")
    with store.session() as session:
        result = audit.verify(session)
    store.dispose()
    if not result.ok:
        raise RuntimeError(f"audit chain NOT verified: {'; '.join(result.problems)}")
    out.print(f"audit chain verified: {result.count} events")


def _serve_until_interrupted(out: Console, base: str) -> None:
    """`demo --keep`: leave the gateway, the sandbox EHR and PACS running until Ctrl-C."""
    out.print(
        f"[bold]the stack keeps running[/bold]. Workspace: {base}/app\n"
        f"sign in as the demo reviewer: {base}/app/sign-in/dev?reviewer=dr.demo\n"
        f"or as the operator (admin pages): {base}/app/sign-in/dev"
        "?reviewer=demo-operator&role=admin\n"
        "press Ctrl-C to stop",
        soft_wrap=True,
    )
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        out.print("stopping ...")


def _explain_failure(err: Console, exc: BaseException, log_path: Path, tmp: Path) -> None:
    """The reason, the gateway's own error lines (ids and reasons only, never PHI), what next."""
    reason = exc.message if isinstance(exc, GatewayError) else str(exc)
    err.print(f"demo failed: {reason}", markup=False, highlight=False)
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in lines if "[error" in line or "[critical" in line]
    if errors:
        err.print("the gateway logged:", markup=False)
        for line in errors[-5:]:
            err.print(f"  {line.strip()}", markup=False, highlight=False, soft_wrap=True)
    err.print(
        f"log and data kept in {tmp} (log: {log_path.name}). What to do: read the reason above; "
        "run `fhir-gateway demo` again once it is fixed; if it persists, open an issue with "
        "the reason and the log lines (they carry ids, never patient data).",
        markup=False,
        highlight=False,
    )


class Demo:
    """The steps, as the partner EHR, an operator and a reviewer would take them over HTTP."""

    def __init__(self, out: Console, base: str, data_dir: Path) -> None:
        self.out, self.base = out, base
        self.http = requests.Session()
        self.collected: dict[str, Any] = {}
        self.case_id = ""

        def bearer(role: str, sub: str, partner: str | None = None) -> dict[str, str]:
            token = mint_dev_token(data_dir, role=role, sub=sub, partner=partner)
            return {"Authorization": f"Bearer {token}"}

        self.receiver: _Receiver | None = None
        self.ehr = bearer("ehr", "demo-ehr", PARTNER)
        self.admin = bearer("admin", "demo-operator")
        self.reviewer = bearer("reviewer", "dr.demo")

    def get(self, path: str, headers: dict[str, str]) -> Any:
        resp = self.http.get(f"{self.base}{path}", headers=headers, timeout=30)
        _check(resp)
        return resp.json()

    def run(self, ehr_base: str) -> None:
        self.subscribe()
        case_id = self.case_id = self.push_referral()
        self.wait_for_jobs(case_id, ("pull_fhir", "pull_imaging"))
        self.show_pull(case_id)
        self.show_held(case_id)
        self.upload_note(case_id)
        self.patient_link(case_id)
        self.show_documents(case_id)
        self.wait_for_jobs(case_id, ("normalise_case",))
        self.wait_for_bundle(case_id)
        self.show_normalisation(case_id)
        self.review(case_id)
        self.report(case_id)
        self.wait_for_jobs(case_id, ("deliver_report",))
        self.show_delivery(case_id, ehr_base)
        self.follow_up(case_id)
        self.show_notifications()
        self.show_audit(case_id)
        self.show_metrics()

    def wait_for_bundle(self, case_id: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        with self.out.status("normalising the case ..."):
            while self.get(f"/cases/{case_id}", self.admin)["normalisation"]["state"] != "built":
                if time.monotonic() > deadline:
                    raise RuntimeError("the case bundle was not built in time")
                time.sleep(0.2)

    def show_normalisation(self, case_id: str) -> None:
        """Every pull and upload queues a normalisation; the case is built once per change."""
        jobs = self.get(f"/cases/{case_id}", self.admin)["jobs"]
        outcomes: dict[str, int] = {}
        for job in jobs:
            if job["kind"] != "normalise_case":
                continue
            progress = job.get("progress") or {}
            what = next(iter(progress.get("normalise") or {}), None) or next(iter(progress), "")
            what = {"resources": "built", "": job["state"]}.get(what, what)
            outcomes[what] = outcomes.get(what, 0) + 1
        self.out.print(
            "normalisation: "
            + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items()))
            + " (one build per change of inputs: the others waited for a pull, joined the"
            " build under way, or found nothing new)"
        )

    def review(self, case_id: str) -> None:
        """An operator assigns a reviewer, who reads the case summary, bundle and images."""
        resp = self.http.post(
            f"{self.base}/cases/{case_id}/assignments",
            timeout=30,
            headers=self.admin,
            json={"reviewer": "dr.demo"},
        )
        _check(resp)
        summary = self.get(f"/cases/{case_id}/summary", self.reviewer)
        resp = self.http.get(
            f"{self.base}/cases/{case_id}/bundle", headers=self.reviewer, timeout=60
        )
        _check(resp)
        bundle = resp.json()
        patients = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        self.out.print(
            f"GET /cases/{{id}}/bundle -> {len(bundle['entry'])} resources, "
            f"{patients} Patient, {len(summary['issues'])} data-quality issues, "
            f"ETag {resp.headers['ETag']}"
        )
        resources = [e["resource"] for e in bundle["entry"]]
        self.show_cancer(summary, resources)
        started = time.perf_counter()
        timeline = self.get(f"/cases/{case_id}/timeline", self.reviewer)
        self.show_timeline(timeline, elapsed_ms=(time.perf_counter() - started) * 1000)
        self.show_completeness(summary)
        self.collected.update(bundle=bundle, summary=summary, timeline=timeline)
        studies = self.get(f"/cases/{case_id}/dicom-web/studies", self.reviewer)
        instances = sum(int(s.get("00201208", {}).get("Value", [0])[0]) for s in studies)
        self.out.print(
            f"GET /cases/{{id}}/dicom-web/studies -> {len(studies)} "
            f"{'study' if len(studies) == 1 else 'studies'}, "
            f"{instances} instances (QIDO-RS, for a viewer such as OHIF)"
        )
        if studies:
            root = f"/cases/{case_id}/dicom-web/studies/{studies[0]['0020000D']['Value'][0]}"
            series = self.get(f"{root}/series", self.reviewer)
            uid = series[0]["0020000E"]["Value"][0]
            started = time.perf_counter()
            meta = self.get(f"{root}/series/{uid}/metadata", self.reviewer)
            self.out.print(
                f"GET .../series/{{uid}}/metadata -> {len(meta)} instances' DICOM JSON in "
                f"{(time.perf_counter() - started) * 1000:.0f} ms (kept at ingest: no file read)"
            )
            self.show_viewer_access(case_id, studies[0]["0020000D"]["Value"][0])

    def show_viewer_access(self, case_id: str, study_uid: str) -> None:
        """The reviewer's browser session reads a thumbnail, as OHIF at /viewer does."""
        _check(self.http.post(f"{self.base}/session", headers=self.reviewer, timeout=30))
        url = f"{self.base}/cases/{case_id}/dicom-web/studies/{study_uid}/thumbnail"
        thumb = self.http.get(url, timeout=30)  # the session cookie only, no bearer token
        self.http.cookies.clear()
        _check(thumb)
        with Image.open(io.BytesIO(thumb.content)) as image:
            width, height = image.size
        self.out.print(
            f"GET .../studies/{{uid}}/thumbnail with the reviewer's session cookie -> "
            f"{thumb.headers['content-type']} {width}x{height}; the OHIF viewer opens "
            f"/viewer/viewer?StudyInstanceUIDs={{uid}}&case={{id}} (`fhir-gateway viewer install`)"
        )

    def show_cancer(self, summary: dict[str, Any], resources: list[dict[str, Any]]) -> None:
        """The primary cancer condition, the question, and CEA as TumorMarkerTests in one unit."""
        by_ref = {f"{r['resourceType']}/{r['id']}": r for r in resources}
        for found in summary["completeness"].get("cancer", []):
            condition = by_ref.get(found["condition"], {})
            profiles = condition.get("meta", {}).get("profile", [])
            claimed = any(p.endswith("/mcode-primary-cancer-condition") for p in profiles)
            code = found["code"]
            self.out.print(
                f"primary cancer condition: {code.get('display')} (SNOMED {code['code']}) -> "
                f"{found['label']}{', mCODE PrimaryCancerCondition' if claimed else ''}"
            )
        question = summary.get("question") or {}
        for note in question.get("notes", []):
            self.out.print(f"question from the referrer: {note}")
        for specimen in summary.get("specimens", []):
            containers = ", ".join(
                f"{c['kind']} {i['value']}"
                for c in specimen.get("containers", [])
                for i in c.get("identifiers", [])
            )
            accession = (specimen.get("accession") or {}).get("value", "-")
            self.out.print(f"specimen: accession {accession}; {containers}")
        table = Table(title="CEA (LOINC 2039-6) as mCODE TumorMarkerTest, one unit")
        for column in ("date", "value", "as received", "profile"):
            table.add_column(column)
        cea = [
            r
            for r in resources
            if r["resourceType"] == "Observation"
            and any(c.get("code") == "2039-6" for c in r["code"].get("coding", []))
        ]
        for r in sorted(cea, key=lambda r: str(r.get("effectiveDateTime"))):
            q = r.get("valueQuantity", {})
            original = next(
                (e["valueQuantity"] for e in q.get("extension", []) if "valueQuantity" in e), q
            )
            marker = any(
                p.endswith("/mcode-tumor-marker-test") for p in r["meta"].get("profile", [])
            )
            table.add_row(
                str(r.get("effectiveDateTime", ""))[:10],
                f"{q.get('value')} {q.get('code')}",
                f"{original.get('value')} {original.get('code')}",
                "TumorMarkerTest" if marker else "-",
            )
        self.out.print(table)

    def show_timeline(self, timeline: dict[str, Any], elapsed_ms: float, lines: int = 8) -> None:
        table = Table(
            title=f"GET /cases/{{id}}/timeline: {timeline['count']} events in "
            f"{elapsed_ms:.0f} ms, derived once at normalisation and stored with the bundle "
            f"(the case page reads the same row; first {lines})"
        )
        for column in ("date", "kind", "what"):
            table.add_column(column)
        for event in timeline["events"][:lines]:
            value = event.get("value") or {}
            shown = f" = {value['value']} {value.get('code', '')}" if "value" in value else ""
            table.add_row(str(event["date"])[:10], event["kind"], f"{event['display']}{shown}")
        self.out.print(table)

    def show_completeness(self, summary: dict[str, Any]) -> None:
        completeness = summary["completeness"]
        types = ", ".join(c["label"] for c in completeness.get("cancer", [])) or "no cancer type"
        table = Table(title=f"what a second opinion on this case needs ({types})")
        table.add_column("need")
        table.add_column("present", justify="right")
        table.add_column("resources", justify="right")
        for need in completeness.get("checklist", []):
            table.add_row(
                need["key"],
                "yes" if need["present"] else "[red]missing[/red]",
                str(need["count"]),
            )
        self.out.print(table)

    def show_audit(self, case_id: str) -> None:
        patient = self.get(f"/cases/{case_id}", self.admin)["patient"]
        events = self.get(f"/fhir/AuditEvent?patient={patient}&_count=1000", self.admin)
        steps: dict[str, int] = {}
        for e in events["entry"]:
            steps[e["resource"]["outcomeDesc"]] = steps.get(e["resource"]["outcomeDesc"], 0) + 1
        self.out.print(
            "audit events for this patient: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(steps.items()))
        )

    def show_metrics(self) -> None:
        """What an operator's Prometheus scrapes from /metrics after this one case."""
        resp = self.http.get(f"{self.base}/metrics", headers=self.admin, timeout=30)
        _check(resp)
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                key = sample.name
                if key == "fhir_gateway_deliveries_total":
                    key += f":{sample.labels.get('outcome')}"
                totals[key] = totals.get(key, 0.0) + sample.value
        shown = {
            "jobs run": "fhir_gateway_job_duration_seconds_count",
            "FHIR resources pulled": "fhir_gateway_pull_resources_total",
            "DICOM instances pulled": "fhir_gateway_pull_instances_total",
            "bytes pulled": "fhir_gateway_pull_bytes_total",
            "reports delivered": "fhir_gateway_deliveries_total:delivered",
            "HTTP requests": "fhir_gateway_http_requests_total",
        }
        self.out.print(
            "GET /metrics (Prometheus): "
            + ", ".join(f"{label} {totals.get(name, 0.0):.0f}" for label, name in shown.items())
        )

    def report(self, case_id: str) -> None:
        """The reviewer writes and submits the second opinion."""
        draft = json.loads((DEMO_DATA / "report-draft.json").read_text())
        resp = self.http.put(
            f"{self.base}/cases/{case_id}/report",
            data=json.dumps(draft),
            headers={**self.reviewer, "Content-Type": "application/json"},
            timeout=30,
        )
        _check(resp)
        resp = self.http.post(
            f"{self.base}/cases/{case_id}/report/$submit", headers=self.reviewer, timeout=30
        )
        _check(resp)
        self.out.print(
            f"reviewer dr.demo saved the report and submitted it -> {resp.status_code}; "
            "delivery queued"
        )

    def show_delivery(self, case_id: str, ehr_base: str) -> None:
        report = self.get(f"/cases/{case_id}/report", self.reviewer)
        self.collected["diagnosticReport"] = report.get("diagnosticReport")
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
                f"delivery to {d.get('recipient', 'destination')}",
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
        _check(resp)
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
        _check(again)
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
                if all(s in ("done", "dead", "cancelled") for s in states.values()):
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
        self.out.print(
            f"case {case_id}: records pulled from the EHR "
            f"(job {job['state']}, attempt {job['attempts']})"
        )
        table = Table()
        table.add_column("resource type")
        table.add_column("count", justify="right")
        for rtype, count in sorted(summary.get("counts", {}).items()):
            table.add_row(rtype, str(count))
        self.out.print(table)
        partial = summary.get("partial_types") or []
        self.out.print(
            f"stored: {summary.get('added', 0)} resources, {summary.get('binaries', 0)} attachments"
            + (f"; partial (withheld by the EHR): {', '.join(partial)}" if partial else "")
        )
        imaging = next(j for j in case["jobs"] if j["kind"] == "pull_imaging")
        counts = imaging["progress"].get("imaging", {})
        self.out.print(
            f"images pulled from the PACS over DICOMweb (job {imaging['state']}): "
            f"{_n(counts.get('studies', 0), 'study', 'studies')}, {counts.get('instances', 0)} "
            f"instances, {counts.get('bytes', 0)} bytes, "
            f"{counts.get('rejected', 0)} rejected"
        )

    def upload_note(self, case_id: str) -> None:
        """The partner uploads a C-CDA consultation note into its case (multipart/form-data)."""
        note = DEMO_DATA / "uploads" / "consult-note.xml"
        resp = self.http.post(
            f"{self.base}/cases/{case_id}/documents",
            headers=self.ehr,
            files=[("file", ("consult-note.xml", note.read_bytes(), "application/xml"))],
            timeout=60,
        )
        _check(resp)
        (result,) = resp.json()["files"]
        self.out.print(
            f"POST /cases/{{id}}/documents (the partner's C-CDA note) -> {result['result']} "
            f"as {result['kind']}" + (" [held]" if result.get("held") else "")
        )

    def patient_link(self, case_id: str) -> None:
        """An admin makes a patient upload link; the patient's CD folder (3 images + DICOMDIR)
        goes through it over plain tus requests, with the token in the `Upload-Link` header."""
        resp = self.http.post(
            f"{self.base}/cases/{case_id}/upload-links",
            headers=self.admin,
            json={"expiresInDays": 7},
            timeout=30,
        )
        _check(resp)
        link = resp.json()
        token = link["url"].rsplit("/", 1)[1]
        patient = {
            "PatientName": "Skiles^Darin",
            "PatientID": "31c343e9-5d7f-444e-9be4-56b1a6ec6146",
            "IssuerOfPatientID": "2.16.840.1.113883.3.9999.1",
            "PatientBirthDate": "19670121",
            "PatientSex": "M",
        }
        results: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            write_cd(Path(tmp), 3, patient)
            for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                name = path.relative_to(tmp).as_posix()
                results.append(self._tus_link_upload(case_id, token, name, path.read_bytes()))
        self.wait_for_jobs(case_id, ("link_studies",))
        studies = self.get(f"/cases/{case_id}/dicom-web/studies", self.admin)
        from_cd = [
            s for s in studies if "patient CD" in str(s.get("00081030", {}).get("Value", [""])[0])
        ]
        sizes = [s.get("00201208", {}).get("Value", ["?"])[0] for s in from_cd]
        self.out.print(
            f"POST /cases/{{id}}/upload-links -> 201, {link['url'].split('/upload/')[0]}"
            f"/upload/<token> until {link['expires'][:10]} (only its SHA-256 is stored)"
        )
        self.out.print(
            f"patient CD over tus through the link: {results.count('accepted')} received, "
            f"{results.count('ignored')} ignored (DICOMDIR), {results.count('rejected')} refused"
            f" -> the case's DICOMweb: {len(studies)} studies, the CD's with {sizes} instances"
        )

    def _tus_link_upload(self, case_id: str, token: str, name: str, data: bytes) -> str:
        tus = {"Tus-Resumable": "1.0.0", "Upload-Link": token}
        meta = "filename " + base64.b64encode(name.encode()).decode()
        created = self.http.post(
            f"{self.base}/cases/{case_id}/uploads/",
            headers={**tus, "Upload-Length": str(len(data)), "Upload-Metadata": meta},
            timeout=30,
        )
        _check(created)
        sent = self.http.patch(
            created.headers["Location"],
            data=data,
            headers={
                **tus,
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
            },
            timeout=60,
        )
        _check(sent)
        return str(sent.headers["Upload-Result"])

    def show_documents(self, case_id: str) -> None:
        """Every document of the case, read by its content (pulled attachments and uploads)."""
        docs = self.get(f"/cases/{case_id}/documents", self.admin)
        table = Table(title="documents in the case")
        for column in ("kind", "origin", "status", "text"):
            table.add_column(column)
        for doc in docs:
            text = "no text (scanned)" if doc["noTextLayer"] else ("kept" if doc["text"] else "-")
            table.add_row(doc["kind"], doc["origin"], doc["status"], text)
        self.out.print(table)
        pdf = next((d for d in docs if d["kind"] == "pdf" and d["text"]), None)
        if pdf is not None:
            resp = self.http.get(pdf["text"], headers=self.admin, timeout=30)
            _check(resp)
            first = resp.text.strip().splitlines()[0] if resp.text.strip() else ""
            self.out.print(f"GET .../documents/{{doc}}/content?format=text -> {first[:60]!r}")

    def show_held(self, case_id: str) -> None:
        """What the identity check held out of the case (field names only), as an admin sees it."""
        items = self.get(f"/cases/{case_id}", self.admin)["identity"]["items"]
        groups: dict[tuple[str, str, str], int] = {}
        for item in items:
            if item["state"] == "held":
                fields = ", ".join(item["differ"]) or "unconfirmed: " + ", ".join(
                    item["unconfirmed"]
                )
                key = (item["kind"], item["outcome"], fields)
                groups[key] = groups.get(key, 0) + 1
        for (kind, outcome, fields), count in sorted(groups.items()):
            what = _n(count, "study", "studies") if kind == "study" else _n(count, "patient record")
            self.out.print(f"[bold]{what} held: identity {outcome} ({fields})[/bold]")
        waiting = self.get("/admin/held", self.admin)
        self.out.print(
            f"GET /admin/held -> {len(waiting)} awaiting an admin: kept out of the bundle and the "
            "per-case DICOMweb until released (POST /cases/{id}/held/{held_id}/$release)"
        )

    # ---------------------------------------------------------------- closing the loop

    def subscribe(self) -> None:
        """The partner's EHR subscribes to its referrals' Task status changes (rest-hook)."""
        assert self.receiver is not None
        topic = f"{self.base}/fhir/SubscriptionTopic/referral-task-status"
        backport = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
        body = {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "referral progress",
            "criteria": topic,
            "channel": {
                "type": "rest-hook",
                "endpoint": self.receiver.url,
                "payload": FHIR_JSON,
                "_payload": {
                    "extension": [
                        {"url": f"{backport}/backport-payload-content", "valueCode": "id-only"}
                    ]
                },
            },
        }
        resp = self.http.post(
            f"{self.base}/fhir/Subscription",
            data=json.dumps(body),
            headers={**self.ehr, "Content-Type": FHIR_JSON},
            timeout=30,
        )
        _check(resp)
        self.subscription = resp.json()["id"]
        deadline = time.monotonic() + 30
        while not self.receiver.received and time.monotonic() < deadline:
            time.sleep(0.1)
        self.out.print(
            f"partner EHR: POST /fhir/Subscription -> {resp.status_code} (topic-based, "
            f"rest-hook, id-only); handshake received: {bool(self.receiver.received)}"
        )

    def follow_up(self, case_id: str) -> None:
        """The treating team asks about the report; the reviewer answers with an addendum."""
        deliveries = self.get(f"/cases/{case_id}/deliveries", self.reviewer)
        treating = next(d for d in deliveries if d["recipient"] == "destination")
        case = self.get(f"/cases/{case_id}", self.admin)
        sr = self.get(f"/fhir/{case['serviceRequest']}", self.ehr)
        question = {
            "resourceType": "Communication",
            "identifier": [{"system": "urn:demo-hospital:communication", "value": "Q-1"}],
            "status": "completed",
            "basedOn": [{"identifier": sr["identifier"][0]}],
            "about": [{"reference": f"DiagnosticReport/{treating['server']['id']}"}],
            "payload": [{"contentString": "Is adjuvant chemotherapy still advised at 79?"}],
        }
        resp = self.http.post(
            f"{self.base}/fhir/Communication",
            data=json.dumps(question),
            headers={**self.ehr, "Content-Type": FHIR_JSON},
            timeout=30,
        )
        _check(resp)
        [q] = self.get(f"/cases/{case_id}/questions", self.reviewer)
        self.out.print(
            f"treating team: POST /fhir/Communication (question about the report) -> "
            f"{resp.status_code}; the reviewer sees {_n(1, 'open question')}"
        )
        resp = self.http.post(
            f"{self.base}/cases/{case_id}/questions/{q['id']}/answer",
            json={"text": "Yes, if fit: discuss at the tumour board with the geriatric review."},
            headers=self.reviewer,
            timeout=30,
        )
        _check(resp)
        deadline = time.monotonic() + 120
        with self.out.status("delivering the amended report and the reply ..."):
            while True:
                deliveries = self.get(f"/cases/{case_id}/deliveries", self.reviewer)
                jobs = self.get(f"/cases/{case_id}", self.admin)["jobs"]
                reply = [j for j in jobs if j["kind"] == "send_question_reply"]
                if all(d["status"] in ("delivered", "superseded") for d in deliveries) and all(
                    j["state"] == "done" for j in reply
                ):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the amended report was not delivered in time")
                time.sleep(0.2)
        table = Table(title="report deliveries (each recipient exactly once per version)")
        for col in ("version", "recipient", "action", "status", "HTTP"):
            table.add_column(col)
        for d in deliveries:
            table.add_row(
                str(d["reportVersion"]),
                d["recipient"],
                d["action"],
                d["status"],
                str(d["lastStatusCode"]),
            )
        self.out.print(table)
        report = self.get(f"/cases/{case_id}/report", self.reviewer)
        self.out.print(
            f"answer sent: report now [bold]{report['fhirStatus']}[/bold] with the addendum in "
            "its conclusion and PDF; a reply Communication (inResponseTo the question) was "
            "created on the treating EHR"
        )

    def show_notifications(self) -> None:
        assert self.receiver is not None
        events = []
        for bundle in self.receiver.received:
            params = {p["name"]: p for p in bundle["entry"][0]["resource"]["parameter"]}
            if params["type"]["valueCode"] == "event-notification":
                number = params["notification-event"]["part"][0]["valueString"]
                events.append(number)
        status = self.get(f"/fhir/Subscription/{self.subscription}/$status", self.ehr)
        params = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
        since = params["events-since-subscription-start"]["valueString"]
        self.out.print(
            f"rest-hook receiver got {_n(len(events), 'Task notification')} (event numbers "
            f"{', '.join(events)}); $status: eventsSinceSubscriptionStart = {since}"
        )


class _Receiver:
    """The partner EHR's rest-hook endpoint, on loopback (records what it is sent)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/notify"

    def __enter__(self) -> _Receiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def _check(resp: requests.Response) -> None:
    """A failed step ends the demo with the gateway's own words (its OperationOutcome).

    Raises:
        GatewayError: the answer was not 2xx.
    """
    if resp.ok:
        return
    try:
        issues = resp.json().get("issue") or []
        said = "; ".join(str(i.get("diagnostics") or i.get("code")) for i in issues)
    except ValueError:
        said = resp.text[:200]
    path = urlsplit(resp.url).path
    raise GatewayError(f"{resp.request.method} {path} -> HTTP {resp.status_code}: {said}")


__all__ = ["run_demo"]
