"""Benchmark: GET /cases/{id}/bundle of a ~10,000-resource case, through the app.

Run: `python tests/benchmarks/bench_bundle_api.py` (prints numbers; no asserts).

A case whose stored pull holds ~10,000 Synthea resources is normalised (`normalise_case`, rows in
SQLite), then `GET /cases/{id}/bundle` is timed through the ASGI app (TestClient, full request:
auth, audit row, one query, streamed body). Anchor, measured in the same run: serialising the
same Bundle through fhir.resources R4B (`Bundle.model_validate(...).model_dump_json()`).
Targets: < 0.5 s per GET, >= 5x faster than the anchor.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402
from fhir.resources.R4B.bundle import Bundle  # noqa: E402

from fhir_gateway.app import create_app  # noqa: E402
from fhir_gateway.casebundle.normalise import normalise_case  # noqa: E402
from fhir_gateway.security.auth import mint_dev_token  # noqa: E402
from fhir_gateway.settings import Settings  # noqa: E402
from fhir_gateway.store import open_store  # noqa: E402
from fhir_gateway.store.models import StoredResource  # noqa: E402
from tests.benchmarks.bench_normalise import documents  # noqa: E402
from tests.benchmarks.ratios import report  # noqa: E402
from tests.conftest import add_case  # noqa: E402

CASE = "bench-case"
SOURCE = "https://ehr.example/fhir"
RUNS = 5


def big_case(tmp: Path) -> tuple[Settings, int]:
    """A data directory under `tmp` with the example partners and the big case stored (not yet
    normalised): (settings, stored resource count). Shared by the bundle, timeline and case-page
    benchmarks."""
    data_dir = tmp / "data"
    data_dir.mkdir()
    shutil.copy(ROOT / "fixtures/partners/partners.toml", data_dir / "partners.toml")
    settings = Settings(data_dir=data_dir, log_level="WARNING")
    return settings, store_case(settings)


def store_case(settings: Settings) -> int:
    store = open_store(settings.db_url)
    add_case(store, CASE, "Patient/p-bench", partner_id="st-elsewhere")
    count = 0
    with store.session() as s:
        seen: set[tuple[str, str]] = set()
        for doc in documents():
            for entry in json.loads(doc)["entry"]:
                r = entry["resource"]
                key = (r["resourceType"], r["id"])
                if key in seen:
                    continue
                seen.add(key)
                s.add(
                    StoredResource(
                        case_id=CASE,
                        source=SOURCE,
                        resource_type=key[0],
                        source_id=key[1],
                        body=r,
                    )
                )
                count += 1
    store.dispose()
    return count


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    try:
        settings, stored = big_case(tmp)
        store = open_store(settings.db_url)
        start = time.perf_counter()
        built = normalise_case(store, settings, CASE)
        t_normalise = time.perf_counter() - start
        store.dispose()

        headers = {
            "Authorization": f"Bearer {mint_dev_token(settings.data_dir, role='admin', sub='b')}"
        }
        app = create_app(settings, configure_logs=False)
        with TestClient(app) as client:
            client.get(f"/cases/{CASE}/bundle", headers=headers)  # warm-up
            times, body = [], b""
            for _ in range(RUNS):
                start = time.perf_counter()
                resp = client.get(f"/cases/{CASE}/bundle", headers=headers)
                body = resp.content
                times.append(time.perf_counter() - start)
            assert resp.status_code == 200, resp.text
            etag = resp.headers["etag"]
            start = time.perf_counter()
            cached = client.get(f"/cases/{CASE}/bundle", headers=headers | {"If-None-Match": etag})
            t_304 = time.perf_counter() - start
        t_get = statistics.median(times)

        bundle = json.loads(body)
        anchors = []
        for _ in range(2):
            start = time.perf_counter()
            Bundle.model_validate(bundle).model_dump_json()
            anchors.append(time.perf_counter() - start)
        t_anchor = min(anchors)

        print(f"stored source resources: {stored}; bundle entries: {built.resources}")
        print(f"normalise_case (read rows, map, assemble, store): {t_normalise:.2f} s")
        print(
            f"GET /cases/{{id}}/bundle: median {t_get:.3f} s of {RUNS} "
            f"({len(body) / 1e6:.1f} MB) (target < 0.1 s)"
        )
        print(f"GET with If-None-Match -> {cached.status_code}: {t_304 * 1000:.1f} ms")
        print(
            f"anchor fhir.resources R4B Bundle.model_validate + model_dump_json: {t_anchor:.3f} s"
            f" -> GET is {t_anchor / t_get:.1f}x faster (target >= 5x)"
        )
        report(
            f"GET case bundle ({built.resources} entries)",
            t_get,
            t_anchor,
            "< 0.1 s; <= 0.2",
            "fhir.resources dump",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
