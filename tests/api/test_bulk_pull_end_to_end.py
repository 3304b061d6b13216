"""Referral in -> pull_fhir through Bulk Data `$export` (partner `bulk = "patient"`) ->
normalise_case -> GET /cases/{id}/bundle holds the exported records; the job's progress and the
error file's issues are visible in GET /cases/{id}.

The partner's EHR is the sandbox on a loopback port, SMART enforced, with its export faults.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from fhir_gateway.sandbox import Faults, SandboxServer
from fhir_gateway.settings import Settings
from tests.api.test_case_bundle import run_jobs, store_of
from tests.api.test_pull_end_to_end import pull_job, refer
from tests.conftest import SYNTHEA, Tokens, partner_sandbox

FIXTURE = SYNTHEA / "colon_Lourdes_Alcantar.json"


@pytest.fixture
def bulk_ehr(settings: Settings) -> Iterator[SandboxServer]:
    """The example partner with its EHR (no PACS) pulling by Patient-level `$export`."""
    server = partner_sandbox(
        settings,
        FIXTURE,
        everything=True,  # offered, but the partner is set to use $export
        export_run_s=1.0,  # long enough that the first status poll finds it running
        export_retry_after="0",
        faults=Faults(
            export_kickoff_throttle=1, export_status_errors=1, export_error_types=("Procedure",)
        ),
    )
    partners = settings.data_dir / "partners.toml"
    text = partners.read_text().replace(
        'base_url = "http://127.0.0.1:8181/fhir"',
        f'base_url = "{server.base_url}"\nbulk = "patient"\nbulk_poll_min_s = 0.02',
        1,
    )
    text = re.sub(r"\[partners\.dicomweb\].*?\n\n", "", text, count=1, flags=re.S)
    partners.write_text(text)
    yield server
    server.stop()


def test_referral_pulled_by_bulk_export_reaches_the_bundle(
    bulk_ehr: SandboxServer, client: TestClient, tokens: Tokens, settings: Settings
) -> None:
    case_id = refer(client, tokens)
    run_jobs(store_of(client), settings)
    job = pull_job(client, tokens, case_id)
    assert job["state"] == "done", job
    summary = job["progress"]["summary"]
    assert summary["counts"]["Observation"] == 136  # colon_Lourdes_Alcantar: 136 Observations
    assert "Procedure" not in summary["counts"]  # its Procedures went to the error file...
    assert summary["issue_count"] == 18  # ... and are the pull's issues, one each
    assert all("$export error file: Procedure/" in i["diagnostics"] for i in summary["issues"])
    assert summary["partial_types"] == ["$export"]
    bulk = job["progress"]["bulk"]
    assert bulk["status"] == "done"
    assert "%" in bulk["x_progress"]
    log = [e for e in bulk_ehr.state.log if "$export" in e.path]
    assert [e.status for e in log if e.path.endswith("/$export")] == [429, 202]
    assert not any(e.path.endswith("/$everything") for e in bulk_ehr.state.log)
    assert log[-1].method == "DELETE"

    resp = client.get(f"/cases/{case_id}/bundle", headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text
    types = Counter(e["resource"]["resourceType"] for e in resp.json()["entry"])
    assert types["Patient"] == 1
    assert types["Observation"] >= 136  # the pulled ones (the referral may bring more)
    assert types["Condition"] >= 1
    assert "Procedure" not in types
