"""Referral -> case complete for a big case, against the raw transfers of the same data, one run.

The demo's partner (sandbox EHR with SMART, sandbox PACS) grows: the Synthea patient gets
`--observations` more Observations, and the referral's CT study `--instances` more synthetic
CT images (512x512x16 bit, ~0.5 MB each, same patient). Each sandbox runs in a child process of
its own (a partner's EHR and PACS are separate servers: one does not wait for the other's GIL); the
gateway (uvicorn, 2 job workers, SQLite, file image store) in this one. Timed: POST of the
referral transaction -> both pulls done and the case bundle built (polled every 50 ms by a
child process, as a reviewer's browser polls from outside the gateway).
Anchors, same run: the raw transfers of the same data with requests and curl, no processing:
`$everything` paged (as our pull fetches it) and WADO-RS of the study to /dev/null.
Target: referral -> complete <= 2x the sum of the anchors; gateway peak RSS < 200 MB.

    python tests/benchmarks/bench_case_complete.py            # 5,000 Observations, 500 images
    python tests/benchmarks/bench_case_complete.py --quick    # 1,000 and 100
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CLIENT_ID = "fhir-gateway-demo"


def grow_data(work: Path, observations: int, instances: int) -> tuple[Path, Path]:
    """The demo's EHR and PACS folders plus the extra Observations and CT images."""
    import pydicom
    from pydicom.uid import generate_uid

    from fhir_gateway.demo import DEMO_DATA, _copy_tree
    from tests.benchmarks.bench_wado import synthetic_ct

    ehr = _copy_tree(DEMO_DATA / "ehr", work / "ehr")
    pacs = _copy_tree(DEMO_DATA / "pacs", work / "pacs")
    bundle = json.loads((ehr / "colon_Darin_Skiles.json").read_text())
    patient = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    lines = [
        json.dumps(
            {
                "resourceType": "Observation",
                "id": f"bench-obs-{i}",
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "laboratory",
                            }
                        ]
                    }
                ],
                "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
                "subject": {"reference": f"Patient/{patient['id']}"},
                "effectiveDateTime": f"2020-01-{1 + i % 28:02d}T10:00:00Z",
                "valueQuantity": {"value": i / 10, "unit": "ng/mL"},
            }
        )
        for i in range(observations)
    ]
    (ehr / "bench-observations.ndjson").write_text("\n".join(lines) + "\n")
    like = pydicom.dcmread(pacs / "17106.dcm", stop_before_pixels=True)
    series = [generate_uid() for _ in range(4)]
    for i in range(instances):
        ds = pydicom.dcmread(
            io.BytesIO(synthetic_ct(like.StudyInstanceUID, series[i % 4], i + 1, 512, 512))
        )
        for kw in (
            "PatientID",
            "PatientName",
            "PatientBirthDate",
            "PatientSex",
            "IssuerOfPatientID",
        ):
            if kw in like:
                setattr(ds, kw, like.get(kw))
        ds.save_as(pacs / f"bench-{i:04d}.dcm", enforce_file_format=True)
    return ehr, pacs


def serve_sandbox(work: Path, jwk_path: Path, role: str) -> None:
    """Child: the sandbox EHR (`ehr`) or PACS (`pacs`) up; its URL on stdout; runs until stdin
    closes."""
    from fhir_gateway.sandbox import SandboxClient, SandboxConfig, SandboxServer
    from fhir_gateway.sandbox.pacs import PacsServer

    if role == "pacs":
        with PacsServer(work / "pacs") as pacs:
            print("URLS " + json.dumps({"pacs": pacs.base_url}), flush=True)
            sys.stdin.read()
        return
    jwk = json.loads(jwk_path.read_text())
    config = SandboxConfig(
        data_dir=work / "ehr", clients={CLIENT_ID: SandboxClient(CLIENT_ID, {"keys": [jwk]})}
    )
    with SandboxServer(config) as ehr:
        print("URLS " + json.dumps({"ehr": ehr.base_url}), flush=True)
        sys.stdin.read()


def poll_until_complete() -> None:
    """Child (`--poll`): waits for {"url", "headers"} on stdin, then polls the first case as
    the workspace does, every 50 ms, until both pulls are done and the bundle is built; prints
    {"done": time.monotonic(), "case": ...} (or {"error": ...})."""
    import requests

    line = sys.stdin.readline()
    if not line:  # the benchmark ended before the referral
        return
    order = json.loads(line)
    url, headers = order["url"], order["headers"]
    http = requests.Session()
    case_id = http.get(f"{url}/cases", headers=headers, timeout=60).json()[0]["id"]
    start = time.monotonic()
    while True:
        case = http.get(f"{url}/cases/{case_id}", headers=headers, timeout=60).json()
        states = {j["kind"]: j["state"] for j in case["jobs"]}
        pulls_done = all(states.get(k) in ("done", "dead") for k in ("pull_fhir", "pull_imaging"))
        if pulls_done and case["normalisation"]["state"] == "built":
            print(json.dumps({"done": time.monotonic(), "case": case}), flush=True)
            return
        if time.monotonic() - start > 600:
            print(json.dumps({"error": f"not complete after 600 s: {states}"}), flush=True)
            return
        time.sleep(0.05)


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=5000)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="1,000 Observations, 100 images")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".bench")
    parser.add_argument("--serve", nargs=3, metavar=("WORK", "JWK", "ROLE"), help=argparse.SUPPRESS)
    parser.add_argument("--poll", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll:
        poll_until_complete()
        return
    if args.quick:
        args.observations, args.instances = 1000, 100
    if args.serve:
        # The EHR child makes the data too: the gateway process's peak is then its own.
        if args.serve[2] == "ehr":
            grow_data(Path(args.serve[0]), args.observations, args.instances)
        serve_sandbox(Path(args.serve[0]), Path(args.serve[1]), args.serve[2])
        return

    import requests

    from connectors._http import Http
    from connectors.smart import SmartTokenProvider
    from fhir_gateway.app import create_app
    from fhir_gateway.demo import DEMO_DATA, KID, PARTNER, PARTNERS_TOML
    from fhir_gateway.sandbox.server import AppServer, free_port
    from fhir_gateway.security.auth import mint_dev_token
    from fhir_gateway.security.client_keys import new_key
    from fhir_gateway.settings import Settings
    from tests.benchmarks.ratios import report

    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-case-", dir=args.work_dir))
    children: list[subprocess.Popen[str]] = []
    try:
        data_dir = work / "data"
        jwk = new_key(data_dir / "keys" / f"{PARTNER}.pem", "EC", KID)
        (work / "jwk.json").write_text(json.dumps(jwk))
        urls: dict[str, str] = {}
        for role in ("ehr", "pacs"):  # the EHR child first: it makes the data both serve
            child = subprocess.Popen(
                [
                    *(sys.executable, __file__, "--serve", str(work), str(work / "jwk.json")),
                    role,
                    *("--observations", str(args.observations)),
                    *("--instances", str(args.instances)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            children.append(child)
            assert child.stdout is not None
            line = ""
            while not line.startswith("URLS "):
                line = child.stdout.readline()
                if not line:
                    raise SystemExit(f"the sandbox {role} did not start")
            urls.update(json.loads(line.removeprefix("URLS ")))
        (data_dir / "partners.toml").write_text(
            PARTNERS_TOML.format(
                partner=PARTNER,
                ehr=urls["ehr"],
                pacs=urls["pacs"],
                lab=urls["ehr"],  # the report copy is not part of this benchmark
                client=CLIENT_ID,
                kid=KID,
            )
        )
        # --- anchors: the raw transfers, same data, same servers ---------------------------
        http = requests.Session()
        from connectors.smart import load_private_key
        from fhir_gateway.records.pull import PAGE_SIZE, PULL_TYPES

        tokens = SmartTokenProvider(
            Http(http, system="ehr", timeout_s=60),
            urls["ehr"],
            client_id=CLIENT_ID,
            key=load_private_key(data_dir / "keys" / f"{PARTNER}.pem"),
            kid=KID,
            resource_types=PULL_TYPES,
        )
        auth = {"Authorization": f"Bearer {tokens.token()}"}
        t0 = time.perf_counter()
        url: str | None = (
            f"{urls['ehr']}/Patient/a8cd3462-ed0c-48a4-81cc-45249aa946ca/$everything"
            f"?_count={PAGE_SIZE}"
        )
        fhir_bytes = 0
        while url:
            page = http.get(url, headers=auth, timeout=60)
            page.raise_for_status()
            fhir_bytes += len(page.content)
            url = next(
                (link["url"] for link in page.json().get("link", []) if link["relation"] == "next"),
                None,
            )
        t_fhir = time.perf_counter() - t0
        study = "1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.1"
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
             "-H", f"Accept: {ACCEPT}", f"{urls['pacs']}/studies/{study}"],
            check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        t_wado, wado_bytes = float(out[0]), int(out[1])
        # What storing the study costs before any gateway logic: the same response written to a
        # file on the gateway's disk, and that file's SHA-256 (the image store is content-
        # addressed by it). Printed beside the target; the target's anchor stays the raw transfer.
        import hashlib

        spool = work / "study.multipart"
        disk_out = subprocess.run(
            ["curl", "-s", "-o", str(spool), "-w", "%{time_total}",
             "-H", f"Accept: {ACCEPT}", f"{urls['pacs']}/studies/{study}"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        t_disk = float(disk_out)
        t0 = time.perf_counter()
        with spool.open("rb") as f:
            hashlib.file_digest(f, "sha256")
        t_hash = time.perf_counter() - t0
        spool.unlink()

        # --- ours: referral -> case complete ------------------------------------------------
        port = free_port()
        settings = Settings(
            data_dir=data_dir, public_base_url=f"http://127.0.0.1:{port}", log_level="WARNING"
        )
        # The database made beforehand, as `fhir-gateway init` does: `serve` then starts on a
        # schema at head and does not import Alembic (~11 MB it would keep for its whole life).
        subprocess.run(
            [sys.executable, "-c", "import sys; from fhir_gateway.store import open_store; "
             "open_store(sys.argv[1]).dispose()", settings.db_url],
            check=True, cwd=ROOT,
        )  # fmt: skip
        app = create_app(settings, workers=2, configure_logs=False)
        poller = subprocess.Popen(
            [sys.executable, __file__, "--poll"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        children.append(poller)
        with AppServer(app, port, lifespan=True) as gw:
            ehr_h = {
                "Authorization": "Bearer "
                + mint_dev_token(data_dir, role="ehr", sub="bench-ehr", partner=PARTNER),
                "Content-Type": "application/fhir+json",
            }
            admin = {"Authorization": f"Bearer {mint_dev_token(data_dir, role='admin', sub='b')}"}
            referral = (DEMO_DATA / "referral-transaction.json").read_bytes()
            # Measured warm: what the service loads aside at start (the model classes intake
            # validates, the unit factor table) is done first, as it is long before a referral
            # reaches a running gateway.
            for thread in threading.enumerate():
                if thread.name == "preload":
                    thread.join(60)
            rss0 = vm_rss_mb()
            # The peak from here on: not what the anchors above (3 MB of JSON parsed) reached.
            Path("/proc/self/clear_refs").write_text("5")
            cpu0 = time.process_time()
            t0 = time.monotonic()  # the poller's clock too (CLOCK_MONOTONIC: system-wide)
            samples: list[tuple[float, float]] = []  # (s since the POST, RSS MB)
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(0.02):
                    samples.append((time.monotonic() - t0, vm_rss_mb()))

            threading.Thread(target=sample, daemon=True).start()
            posted = datetime.now(UTC)
            resp = http.post(f"{gw.url}/fhir", data=referral, headers=ehr_h, timeout=60)
            resp.raise_for_status()
            # The workspace's polling runs in a process of its own, as a reviewer's browser
            # does: in this one, its requests and JSON parsing took the gateway's GIL.
            assert poller.stdin is not None
            assert poller.stdout is not None
            poller.stdin.write(json.dumps({"url": gw.url, "headers": admin}) + "\n")
            poller.stdin.flush()
            answer = json.loads(poller.stdout.readline())
            if "error" in answer:
                raise SystemExit(answer["error"])
            t_ours = answer["done"] - t0
            case = answer["case"]
            cpu = time.process_time() - cpu0  # this process: the gateway
            sampling.set()
            jobs = case["jobs"]
        peak = vm_hwm_mb()
        from fhir_gateway.store import open_store
        from fhir_gateway.store.models import Job

        store = open_store(settings.db_url, migrate=False)
        pulls_end = 0.0
        with store.session() as s:  # each job's span from the referral (where the time went)
            for job in sorted(s.query(Job).all(), key=lambda j: j.created_at):
                start = (job.created_at - posted).total_seconds()
                end = ((job.finished_at or job.updated_at) - posted).total_seconds()
                if job.kind in ("pull_fhir", "pull_imaging"):
                    pulls_end = max(pulls_end, end)
                what = ",".join(sorted((job.progress or {}).get("normalise", {}))[:1])
                what = what or ",".join(
                    k for k in ("deferred", "superseded") if k in (job.progress or {})
                )
                print(
                    f"# {job.kind:<15} queued +{start:5.2f} s  ended +{end:5.2f} s  {job.state}"
                    f" {what}"
                )
        store.dispose()
    finally:
        for child in children:
            child.communicate("")
        shutil.rmtree(work, ignore_errors=True)

    builds = sum(
        1
        for j in jobs
        if j["kind"] == "normalise_case"
        and "resources" in (j.get("progress") or {}).get("normalise", {})
    )
    anchor = t_fhir + t_wado
    print(
        f"# case: Synthea patient + {args.observations} Observations ({fhir_bytes / 1e6:.1f} MB "
        f"$everything), {args.instances} + 4 CT images ({wado_bytes / 1e6:.0f} MB)"
    )
    print(
        f"raw $everything pages (requests): {t_fhir:.2f} s; "
        f"raw WADO-RS study (curl): {t_wado:.2f} s"
    )
    print(
        f"the study to a file (curl): {t_disk:.2f} s; its SHA-256: {t_hash:.2f} s; with the "
        f"$everything pages: {t_fhir + t_disk + t_hash:.2f} s = "
        f"{(t_fhir + t_disk + t_hash) / anchor:.2f}x the raw transfers (no gateway logic yet)"
    )
    print(
        f"referral -> case complete: {t_ours:.2f} s = {t_ours / anchor:.2f}x the raw transfers "
        "(target <= 2)"
    )
    print(
        f"normalise builds: {builds} "
        f"(jobs: {sum(1 for j in jobs if j['kind'] == 'normalise_case')})"
    )
    print(f"gateway process peak RSS: {peak:.0f} MB (at the referral {rss0:.0f} MB; target < 200)")
    pulling = max((r for t, r in samples if t <= pulls_end), default=float("nan"))
    building = max((r for t, r in samples if t > pulls_end), default=float("nan"))
    print(f"gateway RSS (sampled every 20 ms): max {pulling:.0f} MB while pulling, "
          f"{building:.0f} MB after (normalise)")  # fmt: skip
    load = os.getloadavg()[0]
    print(f"gateway process CPU during the case: {cpu:.2f} s (load average {load:.2f})")
    report(
        f"referral -> case complete ({args.observations} obs., {args.instances} img.)",
        t_ours,
        anchor,
        "<= 2.0",
        "raw transfers",
    )
    print(f"RSS gateway peak {peak:.0f} MB (target < 200)")


if __name__ == "__main__":
    os.environ.setdefault("FHIR_GATEWAY_LOG_LEVEL", "WARNING")
    main()
