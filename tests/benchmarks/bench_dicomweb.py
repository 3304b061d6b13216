"""Per-case DICOMweb (`/cases/{id}/dicom-web`) against Orthanc's own DICOMweb, same study, one run.

A synthetic CT study (uncompressed 512x512x16 bit, ~0.5 MB per instance, 4 series) is uploaded
to a real Orthanc + DICOMweb plugin, pulled into the gateway's file image store by the real pull
(`pull_case_images`: the DICOM JSON is taken at ingest), and the gateway is served by uvicorn.
Then curl (to /dev/null) times, per request, the same four calls on both:
WADO-RS RetrieveStudy, QIDO-RS instances of the study, WADO-RS series metadata, QIDO-RS series.
Ours pays what Orthanc does not: the bearer token, the per-case access check and an audit row.
The gateway logs as `serve` does (JSON lines at INFO: an access line per request), to a file.
Ratio = ours / Orthanc; target <= 1.0. The study: median of `--repeat` curl runs. The small
answers (QIDO, metadata: 2-30 ms) in batches: one curl process fetches the URL
`SMALL_BATCH` times over one keep-alive connection, as a viewer does, alternating Orthanc and
ours for `SMALL_ROUNDS` rounds; the median of every transfer's own time. (One fresh curl
process per 3 ms request measured mostly process start and the machine's noise: its ratio swung
0.66-2.26 from run to run.)

    python tests/benchmarks/bench_dicomweb.py            # 500 instances
    python tests/benchmarks/bench_dicomweb.py --quick    # 100 instances, for run_all
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_wado import ACCEPT, upload_study  # noqa: E402
from tests.benchmarks.ratios import report  # noqa: E402

CASE = "bench-dw"
SMALL_BATCH = 75  # transfers of a small call (QIDO, metadata) per curl process
SMALL_ROUNDS = 4  # batches per side, alternating
PATIENT = {
    "name": [{"family": "Bench", "given": ["Synthetic"]}],
    "identifier": [
        {
            "type": {"coding": [{"code": "MR"}]},
            "system": "urn:bench",
            "value": "BENCH-1",
        }
    ],
}


def cpu_s(pid: int, *, skip_main: bool = False) -> float:
    """CPU time (s) a process has run so far, all its threads (but the main one when
    `skip_main`: ours runs curl, not the server), in nanoseconds' resolution
    (`/proc/<pid>/task/*/schedstat`): the server's work per request, which the machine's load
    inflates far less than the wall time."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        if skip_main and stat.parent.name == str(pid):
            continue
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def curl_s(url: str, headers: dict[str, str]) -> tuple[float, int]:
    """Wall time of one GET to /dev/null (curl's own total time) and the bytes received."""
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run([*cmd, url], check=True, capture_output=True, text=True).stdout.split()
    if out[0] != "200":
        raise SystemExit(f"GET {url} -> {out[0]}")
    return float(out[1]), int(out[2])


def curl_batch_s(url: str, headers: dict[str, str], n: int) -> tuple[list[float], int]:
    """Each transfer's own time of `n` GETs of `url` by one curl process (one keep-alive
    connection) to /dev/null, and the bytes of one answer."""
    cmd = ["curl", "-s", "-w", "%{http_code} %{time_total} %{size_download}\\n"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    for _ in range(n):
        cmd += [url, "-o", "/dev/null"]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split("\n")
    times, size = [], 0
    for line in filter(None, lines):
        code, total, size_s = line.split()
        if code != "200":
            raise SystemExit(f"GET {url} -> {code}")
        times.append(float(total))
        size = int(size_s)
    return times, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 instances, 3 runs")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".bench")
    args = parser.parse_args()
    if args.quick:
        args.instances, args.repeat = 100, 3

    import requests

    from connectors.dicomweb import DicomwebClient
    from fhir_gateway.app import create_app
    from fhir_gateway.imaging.retrieval import StudySelector, pull_case_images
    from fhir_gateway.imaging.store import FileImageStore
    from fhir_gateway.logging import configure_logging
    from fhir_gateway.sandbox.server import AppServer
    from fhir_gateway.security.auth import mint_dev_token
    from fhir_gateway.settings import Settings
    from fhir_gateway.store import open_store
    from tests.integration.imaging.cases import make_case
    from tests.servers.orthanc import run_orthanc

    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-", dir=args.work_dir))
    try:
        with run_orthanc(work / "orthanc", aet="BENCHDW") as orthanc:
            study, total = upload_study(orthanc.url, args.instances, 4, 512, 512)
            data_dir = work / "data"
            data_dir.mkdir()
            shutil.copy(ROOT / "fixtures/partners/partners.toml", data_dir / "partners.toml")
            settings = Settings(data_dir=data_dir, log_level="WARNING")
            store = open_store(settings.db_url)
            make_case(store, CASE, patient=PATIENT)
            client = DicomwebClient(requests.Session(), orthanc.dicomweb_url)
            t0 = time.perf_counter()
            counts = pull_case_images(
                store,
                CASE,
                client,
                FileImageStore(store, data_dir),
                [StudySelector(study_uid=study)],
            )
            pull_s = time.perf_counter() - t0
            store.dispose()
            if counts.held:
                raise SystemExit("the bench study was held by the identity check")
            series = [
                s["0020000E"]["Value"][0]
                for s in requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series").json()
            ]
            token = mint_dev_token(data_dir, role="admin", sub="bench")
            log_file = (work / "gateway.log").open("w")
            configure_logging(settings.log_format, "INFO", stream=log_file)
            app = create_app(settings, configure_logs=False)
            with AppServer(app, lifespan=True) as gw:
                ours_root = f"{gw.url}/cases/{CASE}/dicom-web"
                auth = {"Authorization": f"Bearer {token}"}
                calls = {
                    "WADO-RS study": (f"/studies/{study}", {"Accept": ACCEPT}),
                    "QIDO-RS study instances": (f"/studies/{study}/instances", {}),
                    "WADO-RS series metadata": (
                        f"/studies/{study}/series/{series[0]}/metadata",
                        {},
                    ),
                    "QIDO-RS series": (f"/studies/{study}/series", {}),
                }
                rows, cpu_rows = [], []
                own_pid = os.getpid()  # the gateway runs in this process (curl in others)
                orthanc_pid = orthanc.process.pid if orthanc.process else own_pid
                for name, (path, headers) in calls.items():
                    curl_s(orthanc.dicomweb_url + path, headers)  # warm both
                    curl_s(ours_root + path, headers | auth)
                    theirs, ours = [], []
                    cpu_theirs = cpu_ours = 0.0
                    small = not name.startswith("WADO-RS study")
                    rounds = SMALL_ROUNDS if small else args.repeat
                    batch = SMALL_BATCH if small else 1
                    for _ in range(rounds):
                        c0 = cpu_s(orthanc_pid)
                        got, size_theirs = curl_batch_s(orthanc.dicomweb_url + path, headers, batch)
                        theirs += got
                        c1 = cpu_s(own_pid, skip_main=True)
                        got, size_ours = curl_batch_s(ours_root + path, headers | auth, batch)
                        ours += got
                        cpu_ours += cpu_s(own_pid, skip_main=True) - c1
                        cpu_theirs += cpu_s(orthanc_pid) - c0  # (its housekeeping too)
                    runs = rounds * batch
                    t_theirs = statistics.median(theirs)
                    t_ours = statistics.median(ours)
                    rows.append((name, t_ours, t_theirs, size_ours, size_theirs))
                    cpu_rows.append((name, cpu_ours / runs, cpu_theirs / runs))
            configure_logging(settings.log_format, "WARNING")
            log_file.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"# study: {args.instances} instances, {total / 1e6:.0f} MB; pulled into the gateway in "
        f"{pull_s:.1f} s; median of {args.repeat} curl runs (WADO-RS study) or of "
        f"{SMALL_ROUNDS} x {SMALL_BATCH} keep-alive transfers (the others); load average "
        f"{os.getloadavg()}"
    )
    print(
        f"{'call':<26} {'ours s':>8} {'Orthanc s':>10} {'ratio':>6} "
        f"{'ours B':>11} {'Orthanc B':>11}"
    )
    for name, t_ours, t_theirs, b_ours, b_theirs in rows:
        print(
            f"{name:<26} {t_ours:8.3f} {t_theirs:10.3f} {t_ours / t_theirs:6.2f} "
            f"{b_ours:11d} {b_theirs:11d}"
        )
    print(f"{'server CPU per request':<26} {'ours ms':>8} {'Orthanc ms':>10} {'ratio':>6}")
    for name, c_ours, c_theirs in cpu_rows:
        print(f"{name:<26} {c_ours * 1e3:8.2f} {c_theirs * 1e3:10.2f} {c_ours / c_theirs:6.2f}")
    for name, t_ours, t_theirs, _, _ in rows:
        report(f"per-case {name} ({args.instances} inst.)", t_ours, t_theirs, "<= 1.0", "Orthanc")


if __name__ == "__main__":
    os.environ.setdefault("FHIR_GATEWAY_LOG_LEVEL", "WARNING")
    main()
