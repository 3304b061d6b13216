"""Benchmark: the workspace's case page (`GET /app/cases/{id}`) of a ~10,000-resource case.

Run: `python tests/benchmarks/bench_case_page.py` (prints numbers; no asserts).

The case of bench_bundle_api (~10,000 Synthea resources, normalised into SQLite) is assigned to a
reviewer who signs in with the dev sign-in; the page is timed through the ASGI app (TestClient,
full request: session, access check, three audit rows, summary, the stored case view (timeline,
marker ranges, documents, studies: `casebundle.derived`, one row), chart, template). Server time
is approximated by the request's wall time in process. Also timed: `GET /cases/{id}/timeline`
(the same stored view, served as stored), the first page of a case normalised before the view
existed (derived from the ~9,000 bundle rows and stored; the old per-request cost), and the
cases list (`GET /app`) of a reviewer with 500 assigned cases. Anchor, measured in the same run:
`GET /cases/{id}/bundle` (streams the stored bundle JSON, untouched by the case view).
Target: the page < 300 ms; the cases list < 300 ms.
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import delete  # noqa: E402

from fhir_gateway.app import create_app  # noqa: E402
from fhir_gateway.casebundle.normalise import normalise_case  # noqa: E402
from fhir_gateway.security.auth import mint_dev_token  # noqa: E402
from fhir_gateway.store import open_store  # noqa: E402
from fhir_gateway.store.models import (  # noqa: E402
    Assignment,
    Case,
    CaseBundleState,
    CaseView,
)
from tests.benchmarks.bench_bundle_api import CASE, big_case  # noqa: E402
from tests.benchmarks.ratios import report  # noqa: E402

RUNS = 7
REVIEWER = "dr.bench"
LIST_CASES = 500


def more_cases(settings_db: str) -> None:
    """LIST_CASES - 1 further cases assigned to the reviewer, each with a bundle state shaped
    like the big case's (its summary, counts, issues and sources) and its case view."""
    store = open_store(settings_db)
    with store.session() as s:
        big = s.get(CaseBundleState, CASE)
        view = s.get(CaseView, CASE)
        assert big is not None
        assert view is not None
        for n in range(1, LIST_CASES):
            cid = f"bench-list-{n:04d}"
            s.add(
                Case(
                    id=cid,
                    partner_id="st-elsewhere",
                    status="received",
                    task_id=f"task-{cid}",
                    service_request_id=f"sr-{cid}",
                    patient_ref=f"Patient/p-{cid}",
                )
            )
            s.flush()
            s.add(
                CaseBundleState(
                    case_id=cid,
                    patient_id=f"p-{cid}",
                    base_url=big.base_url,
                    etag=big.etag,
                    resource_count=big.resource_count,
                    counts=big.counts,
                    summary=big.summary,
                    issues=big.issues,
                    sources=big.sources,
                )
            )
            s.add(
                CaseView(
                    case_id=cid,
                    etag=view.etag,
                    version=view.version,
                    timeline=view.timeline,
                    page=view.page,
                    glance=view.glance,
                )
            )
            s.add(Assignment(case_id=cid, reviewer=REVIEWER, assigned_by="bench"))
    store.dispose()


def drop_views(settings_db: str) -> None:
    """As if every case had been normalised before migration 0017."""
    store = open_store(settings_db)
    with store.session() as s:
        s.execute(delete(CaseView))
    store.dispose()


def drop_view(settings_db: str) -> None:
    store = open_store(settings_db)
    with store.session() as s:
        view = s.get(CaseView, CASE)
        if view is not None:
            s.delete(view)
    store.dispose()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-case-page-"))
    try:
        settings, stored = big_case(tmp)
        store = open_store(settings.db_url)
        built = normalise_case(store, settings, CASE)
        with store.session() as s:
            s.add(Assignment(case_id=CASE, reviewer=REVIEWER, assigned_by="bench"))
        store.dispose()

        token = mint_dev_token(settings.data_dir, role="reviewer", sub=REVIEWER)
        headers = {"Authorization": f"Bearer {token}"}
        app = create_app(settings, configure_logs=False)
        with TestClient(app, client=("127.0.0.1", 5000)) as client:
            page = client.get("/app/sign-in/dev")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf is not None
            client.post(
                "/app/sign-in/dev",
                data={"csrf": csrf.group(1), "reviewer": REVIEWER, "role": "reviewer"},
            )

            def timed(path: str, **kw: object) -> tuple[float, int, int]:
                times, size, status = [], 0, 0
                client.get(path, **kw)  # type: ignore[arg-type]  # warm-up
                for _ in range(RUNS):
                    start = time.perf_counter()
                    resp = client.get(path, **kw)  # type: ignore[arg-type]
                    times.append(time.perf_counter() - start)
                    size, status = len(resp.content), resp.status_code
                return statistics.median(times), size, status

            t_page, page_bytes, status = timed(f"/app/cases/{CASE}")
            assert status == 200, status
            t_json, json_bytes, _ = timed(f"/cases/{CASE}/timeline", headers=headers)
            t_bundle, bundle_bytes, _ = timed(f"/cases/{CASE}/bundle", headers=headers)
            first = []
            for _ in range(3):  # a case normalised before the case view: derived on first read
                drop_view(settings.db_url)
                start = time.perf_counter()
                assert client.get(f"/app/cases/{CASE}").status_code == 200
                first.append(time.perf_counter() - start)
            t_first = statistics.median(first)
            more_cases(settings.db_url)
            t_list, list_bytes, status = timed("/app")
            assert status == 200, status
            drop_views(settings.db_url)
            t_legacy, _, status = timed("/app")
            assert status == 200, status

        print(f"stored source resources: {stored}; bundle entries: {built.resources}")
        print(
            f"GET /app/cases/{{id}}: median {t_page * 1000:.0f} ms of {RUNS} "
            f"({page_bytes / 1e3:.0f} kB HTML) (target < 300 ms) -> {t_page / t_bundle:.2f}x "
            "the bundle read"
        )
        print(
            f"GET /cases/{{id}}/timeline (JSON): median {t_json * 1000:.0f} ms "
            f"({json_bytes / 1e3:.0f} kB) -> {t_json / t_bundle:.2f}x the bundle read"
        )
        print(
            f"first GET /app/cases/{{id}} of a case without a stored view (derived, stored): "
            f"median {t_first * 1000:.0f} ms of 3 -> {t_first / t_bundle:.2f}x the bundle read"
        )
        print(
            f"GET /app with {LIST_CASES} cases: median {t_list * 1000:.0f} ms of {RUNS} "
            f"({list_bytes / 1e3:.0f} kB HTML) (target < 300 ms) -> "
            f"{t_list / t_bundle:.2f}x the bundle read"
        )
        print(
            f"  the same, every case normalised before the case view (summaries parsed): "
            f"median {t_legacy * 1000:.0f} ms -> {t_legacy / t_bundle:.2f}x the bundle read"
        )
        print(
            f"anchor GET /cases/{{id}}/bundle: median {t_bundle * 1000:.0f} ms "
            f"({bundle_bytes / 1e6:.1f} MB)"
        )
        report("GET case page (workspace)", t_page, t_bundle, "< 0.3 s", "GET case bundle")
        report("GET case timeline (stored view)", t_json, t_bundle, "-", "GET case bundle")
        report(
            f"GET cases list ({LIST_CASES} cases)", t_list, t_bundle, "< 0.3 s", "GET case bundle"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
