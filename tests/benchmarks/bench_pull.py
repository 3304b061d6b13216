"""Benchmark: a FHIR pull costs about its longest page chain, not the sum (DESIGN.md).

Sandbox EHR on loopback, SMART enforced, 50 ms injected latency per request; one patient with
5,000 Observations and 9 other types. Prints our pull's wall time as a ratio of (a) the longest
single chain of pages (Observation paged alone, the anchor, measured in the same run; target
<= 1.3) and (b) a sequential pull of the same types.

Run: /opt/venv/bin/python tests/benchmarks/bench_pull.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from connectors._http import Http
from connectors.fhir_client import FhirEhrClient
from connectors.smart import SmartTokenProvider, generate_private_key, jwks
from fhir_gateway.records.pull import PAGE_SIZE, PULL_TYPES, pull_patient_records
from fhir_gateway.sandbox import Faults, SandboxClient, SandboxConfig, SandboxServer
from tests.benchmarks.ratios import quick, report

OBSERVATIONS = 1000 if quick() else 5000
OTHERS = 60  # per other type
LATENCY_S = 0.05


def make_data(folder: Path) -> None:
    subject = {"reference": "Patient/bench"}
    lines = [json.dumps({"resourceType": "Patient", "id": "bench"})]
    for i in range(OBSERVATIONS):
        lines.append(
            json.dumps(
                {
                    "resourceType": "Observation",
                    "id": f"obs-{i}",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
                    "subject": subject,
                    "valueQuantity": {"value": i / 10, "unit": "ng/mL"},
                }
            )
        )
    for t in PULL_TYPES:
        if t in ("Patient", "Observation"):
            continue
        for i in range(OTHERS):
            lines.append(json.dumps({"resourceType": t, "id": f"{t}-{i}", "subject": subject}))
    (folder / "bench.ndjson").write_text("\n".join(lines) + "\n")


def main() -> None:
    key = generate_private_key("EC")
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp))
        config = SandboxConfig(
            data_dir=Path(tmp),
            clients={"bench": SandboxClient("bench", jwks([key]))},
            everything=False,
            faults=Faults(latency_s=LATENCY_S),
        )
        with SandboxServer(config) as server:
            http = Http(requests.Session(), system="ehr", timeout_s=30)
            tokens = SmartTokenProvider(
                http, server.base_url, client_id="bench", key=key, resource_types=PULL_TYPES
            )
            client = FhirEhrClient(http, server.base_url, tokens=tokens)
            tokens.token()  # discovery + token outside the timings

            start = time.perf_counter()
            chain = client.search(
                "Observation", {"patient": "Patient/bench", "_count": str(PAGE_SIZE)}
            )
            anchor = time.perf_counter() - start
            assert len(chain.resources) == OBSERVATIONS

            start = time.perf_counter()
            sequential = pull_patient_records(client, "Patient/bench", max_parallel=1)
            seq_s = time.perf_counter() - start

            start = time.perf_counter()
            parallel = pull_patient_records(client, "Patient/bench", max_parallel=4)
            ours = time.perf_counter() - start
            assert parallel.counts == sequential.counts
            assert parallel.counts["Observation"] == OBSERVATIONS

    print(f"resources pulled: {sum(parallel.counts.values())} in {len(parallel.counts)} types")
    print(f"longest chain (Observation, {chain.pages} pages): {anchor:.3f} s  [anchor]")
    print(f"parallel pull (4 workers): {ours:.3f} s")
    print(f"sequential pull (1 worker): {seq_s:.3f} s")
    print(f"ratio parallel / longest chain: {ours / anchor:.2f}  (target <= 1.3)")
    print(f"ratio parallel / sequential:    {ours / seq_s:.2f}")
    report("FHIR pull, 4 workers", ours, anchor, "<= 1.3", "longest page chain")


if __name__ == "__main__":
    main()
