"""Benchmark: Bulk Data `$export` vs `Patient/$everything` vs per-type search, same run.

Sandbox EHR on loopback, SMART enforced, 20 ms injected latency per request; one patient with
10,000 resources in 6 types. Each method is timed to "every resource parsed in this process"
($export also to "files on disk"), three repeats in rotating order, medians. Prints each as a
ratio of the `$export` time (the anchor). `$everything` runs at the server's default page size
(what `FhirEhrClient.everything` does) and with `_count=200`. The sandbox's export job time is
set to 0 (it only simulates a server's work), so the ratio measures transfer and client cost,
not a real server's export queue (minutes on Epic/Cerner), which this cannot measure.

Run: .venv/bin/python tests/benchmarks/bench_bulk.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from connectors._http import Http
from connectors.bulk import BulkExportClient, iter_resources
from connectors.fhir_client import FhirEhrClient
from connectors.smart import SmartTokenProvider, generate_private_key, jwks
from fhir_gateway.sandbox import Faults, SandboxClient, SandboxConfig, SandboxServer
from tests.benchmarks.ratios import quick, report

COUNTS = {
    "Patient": 1,
    "Observation": 6000,
    "Condition": 1000,
    "Encounter": 1000,
    "DiagnosticReport": 1000,
    "Procedure": 999,
}
TOTAL = sum(COUNTS.values())
LATENCY_S = 0.02
PAGE = 200  # the sandbox's max page size
REPEATS = 1 if quick() else 3


def make_data(folder: Path) -> None:
    subject = {"reference": "Patient/bench"}
    lines = [json.dumps({"resourceType": "Patient", "id": "bench"})]
    for rtype, count in COUNTS.items():
        if rtype == "Patient":
            continue
        for i in range(count):
            resource = {
                "resourceType": rtype,
                "id": f"{rtype}-{i}",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
                "subject": subject,
                "note": [{"text": "x" * 200}],
            }
            lines.append(json.dumps(resource))
    (folder / "bench.ndjson").write_text("\n".join(lines) + "\n")


def main() -> None:
    key = generate_private_key("EC")
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        data.mkdir()
        make_data(data)
        config = SandboxConfig(
            data_dir=data,
            clients={"bench": SandboxClient("bench", jwks([key]))},
            faults=Faults(latency_s=LATENCY_S, omit_total_every=0),
            export_run_s=0.0,
            export_file_lines=2000,
        )
        with SandboxServer(config) as server:
            http = Http(requests.Session(), system="ehr", timeout_s=60)
            tokens = SmartTokenProvider(
                http, server.base_url, client_id="bench", key=key, resource_types=("*",)
            )
            fhir = FhirEhrClient(http, server.base_url, tokens=tokens)
            bulk = BulkExportClient(http, server.base_url, tokens=tokens, poll_min_s=0.0)
            tokens.token()  # discovery + token outside the timings
            run = 0

            def export_to_disk() -> int:
                nonlocal run
                run += 1
                result = bulk.export(out / str(run))
                return sum(f.count for f in result.files)

            def export_parsed() -> int:
                nonlocal run
                run += 1
                result = bulk.export(out / str(run))
                return sum(1 for f in result.files for _ in iter_resources(Path(f.path)))

            def everything() -> int:
                return len(fhir.everything("bench").resources)  # the server's page size (50)

            def everything_200() -> int:
                url = f"{server.base_url}/Patient/bench/$everything"
                first = fhir._send("GET", url, params={"_count": str(PAGE)})
                return sum(len(page.matches) for page in fhir._follow(first))

            def per_type(workers: int) -> Callable[[], int]:
                def pull() -> int:
                    def one(rtype: str) -> int:
                        params = {"_count": str(PAGE)}
                        if rtype == "Patient":
                            params["_id"] = "bench"
                        else:
                            params["patient"] = "Patient/bench"
                        return len(fhir.search(rtype, params).resources)

                    with ThreadPoolExecutor(workers) as pool:
                        return sum(pool.map(one, COUNTS))

                return pull

            methods: dict[str, Callable[[], int]] = {
                "$export (files on disk)": export_to_disk,
                "$export (parsed)": export_parsed,
                "$everything (parsed)": everything,
                "$everything _count=200": everything_200,
                "per-type search, sequential": per_type(1),
                "per-type search, 4 workers": per_type(4),
            }
            times: dict[str, list[float]] = {name: [] for name in methods}
            names = list(methods)
            for repeat in range(REPEATS):
                for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                    start = time.perf_counter()
                    got = methods[name]()
                    times[name].append(time.perf_counter() - start)
                    assert got == TOTAL, (name, got)
            requests_by_kind = {
                "export": sum(1 for e in server.state.log if "$export" in e.path),
                "all": len(server.state.log),
            }

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    anchor = medians["$export (parsed)"]
    print(f"{TOTAL} resources in {len(COUNTS)} types, {LATENCY_S * 1000:.0f} ms latency/request")
    print(f"medians of {REPEATS} repeats, rotating order; anchor = $export (parsed)")
    for name, median in medians.items():
        print(f"  {name:<30} {median:7.3f} s   ratio {median / anchor:5.2f}")
        if name != "$export (parsed)":
            report(f"bulk: {name}", median, anchor, "-", "$export (parsed)")
    print(
        f"  (sandbox requests: {requests_by_kind['all']}, of them $export: "
        f"{requests_by_kind['export']})"
    )


if __name__ == "__main__":
    main()
