"""Benchmark: the workspace's case page (`GET /app/cases/{id}`) of a ~10,000-resource case.

Run: `python tests/benchmarks/bench_case_page.py` (prints numbers; no asserts).

The case of bench_bundle_api (~10,000 Synthea resources, normalised into SQLite) is assigned to a
reviewer who signs in with the dev sign-in; the page is timed through the ASGI app (TestClient,
full request: session, access check, three audit rows, summary, timeline resources parsed, chart,
documents, studies, template). Server time is the gateway's own `duration_ms` as the access log
would record it, approximated here by the request's wall time in process. Anchor, measured in the
same run: `GET /cases/{id}/timeline` (the JSON the page is built from). Target: < 300 ms.
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

from fhir_gateway.app import create_app  # noqa: E402
from fhir_gateway.casebundle.normalise import normalise_case  # noqa: E402
from fhir_gateway.security.auth import mint_dev_token  # noqa: E402
from fhir_gateway.store import open_store  # noqa: E402
from fhir_gateway.store.models import Assignment  # noqa: E402
from tests.benchmarks.bench_bundle_api import CASE, big_case  # noqa: E402

RUNS = 7
REVIEWER = "dr.bench"


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

        print(f"stored source resources: {stored}; bundle entries: {built.resources}")
        print(
            f"GET /app/cases/{{id}}: median {t_page * 1000:.0f} ms of {RUNS} "
            f"({page_bytes / 1e3:.0f} kB HTML) (target < 300 ms)"
        )
        print(
            f"anchor GET /cases/{{id}}/timeline (JSON): median {t_json * 1000:.0f} ms "
            f"({json_bytes / 1e3:.0f} kB) -> page/anchor {t_page / t_json:.2f}x"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
