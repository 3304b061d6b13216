"""Benchmark: GET /cases/{id}/timeline of a ~10,000-resource case, through the app.

Run: `python tests/benchmarks/bench_timeline.py` (prints numbers and ratios; no asserts).

The same ~10,000-resource Synthea case as bench_bundle_api.py is normalised, then, in one run and
in rotating order, timed (medians of 5): `GET /cases/{id}/timeline` (the events derived at
normalisation and stored with the bundle, `casebundle.derived`: one row, served as stored) and the
anchor `GET /cases/{id}/bundle` (streams the stored JSON). Also the pure `timeline()` over the
parsed resources against `json.loads` of the same stored bodies (what normalisation now pays
once, and a first read of a case normalised before the case view). Target: the timeline costs
no more than a few bundle reads.
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
from sqlalchemy import select  # noqa: E402

from fhir_gateway.app import create_app  # noqa: E402
from fhir_gateway.casebundle.normalise import normalise_case  # noqa: E402
from fhir_gateway.casebundle.timeline import TIMELINE_TYPES, timeline  # noqa: E402
from fhir_gateway.security.auth import mint_dev_token  # noqa: E402
from fhir_gateway.store import open_store  # noqa: E402
from fhir_gateway.store.models import NormalisedResource  # noqa: E402
from tests.benchmarks.bench_bundle_api import CASE, big_case  # noqa: E402
from tests.benchmarks.ratios import report  # noqa: E402

RUNS = 5


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-timeline-"))
    try:
        settings, stored = big_case(tmp)
        store = open_store(settings.db_url)
        built = normalise_case(store, settings, CASE)
        with store.session() as s:
            bodies = list(
                s.scalars(
                    select(NormalisedResource.body).where(
                        NormalisedResource.case_id == CASE,
                        NormalisedResource.resource_type.in_(sorted(TIMELINE_TYPES)),
                    )
                )
            )
        store.dispose()

        headers = {
            "Authorization": f"Bearer {mint_dev_token(settings.data_dir, role='admin', sub='b')}"
        }
        app = create_app(settings, configure_logs=False)
        paths = {"timeline": f"/cases/{CASE}/timeline", "bundle": f"/cases/{CASE}/bundle"}
        times: dict[str, list[float]] = {k: [] for k in paths}
        events = 0
        with TestClient(app) as client:
            for path in paths.values():
                client.get(path, headers=headers)  # warm-up
            for run in range(RUNS):
                order = list(paths) if run % 2 == 0 else list(reversed(paths))
                for name in order:
                    start = time.perf_counter()
                    resp = client.get(paths[name], headers=headers)
                    _ = resp.content
                    times[name].append(time.perf_counter() - start)
                    assert resp.status_code == 200, resp.text
                    if name == "timeline":
                        events = resp.json()["count"]
        t_timeline = statistics.median(times["timeline"])
        t_bundle = statistics.median(times["bundle"])

        parse, build = [], []
        for _ in range(RUNS):  # parsed one at a time and dropped, as the endpoint does
            start = time.perf_counter()
            for body in bodies:
                json.loads(body)
            parse.append(time.perf_counter() - start)
            start = time.perf_counter()
            timeline(json.loads(body) for body in bodies)
            build.append(time.perf_counter() - start)
        t_parse, t_build = statistics.median(parse), statistics.median(build)

        print(f"stored source resources: {stored}; bundle entries: {built.resources}")
        print(f"timeline events: {events}")
        print(
            f"GET /cases/{{id}}/timeline median {t_timeline:.3f} s vs GET /cases/{{id}}/bundle "
            f"median {t_bundle:.3f} s (same run, {RUNS} each, rotating order): "
            f"{t_timeline / t_bundle:.2f}x the bundle read"
        )
        report("GET case timeline", t_timeline, t_bundle, "-", "GET case bundle")
        print(
            f"timeline(json.loads(body) ...) over {len(bodies)} stored rows of timeline types: "
            f"{t_build * 1000:.1f} ms = {t_build / t_parse:.2f}x json.loads alone of the same "
            f"bodies ({t_parse * 1000:.1f} ms)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
