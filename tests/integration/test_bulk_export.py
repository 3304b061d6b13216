"""Bulk Data $export client against the sandbox EHR over real HTTP on loopback, SMART enforced
(STANDARDS BD-01..BD-08): the happy path, `_type`/`_since`/Group, each injected fault, and a
crash-resume. Expected counts come from the fixture bundles, not from the sandbox."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from connectors._http import Http, RetryPolicy
from connectors.bulk import (
    BulkExportClient,
    ExportFailedError,
    ExportState,
    iter_resources,
)
from connectors.smart import SmartTokenProvider
from fhir_gateway.errors import UpstreamUnavailableError
from fhir_gateway.sandbox import Faults, SandboxServer
from tests.conftest import CLIENT_ID, SYNTHEA

EXPORT_TYPES = ("Patient", "Condition", "Observation", "Encounter", "DiagnosticReport")


def expected_counts() -> Counter[str]:
    """Per type, the resources of the fixture bundles that sit in some Patient's compartment."""
    counts: Counter[str] = Counter()
    for path in SYNTHEA.glob("*.json"):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        patients = {
            e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
        }
        for entry in bundle["entry"]:
            r = entry["resource"]
            refs = {
                (r.get(f) or {}).get("reference") for f in ("subject", "patient", "beneficiary")
            }
            if r["resourceType"] == "Patient" or refs & patients:
                counts[r["resourceType"]] += 1
    return counts


class Sleeper:
    """Records every wait the client asks for; really sleeps only a little (the sandbox's jobs
    run in real time, but Retry-After values need not be waited out in a test)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        import time

        self.waits.append(seconds)
        time.sleep(min(seconds, 0.05))


def bulk_client(
    server: SandboxServer, key: Any, sleeper: Sleeper, **kwargs: Any
) -> tuple[BulkExportClient, SmartTokenProvider]:
    http = Http(
        requests.Session(),
        system="ehr",
        timeout_s=10,
        retry=RetryPolicy(max_attempts=4),
        sleep=sleeper,
    )
    tokens = SmartTokenProvider(
        http,
        server.base_url,
        client_id=CLIENT_ID,
        key=key,
        resource_types=("*",),
        renew_margin_s=0,
    )
    options: dict[str, Any] = {"poll_min_s": 0.0, **kwargs}
    return BulkExportClient(http, server.base_url, tokens=tokens, **options), tokens


def data_log(server: SandboxServer) -> list[Any]:
    return [e for e in server.state.log if "/$export" in e.path]


def test_patient_export_end_to_end(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0.3, export_file_lines=40)
    sleeper = Sleeper()
    client, _ = bulk_client(server, rsa_key, sleeper)
    progress: list[Any] = []
    saved: list[dict[str, Any]] = []
    anonymous: list[int] = []
    result = client.export(
        tmp_path / "out",
        state=ExportState(),
        save=lambda s: saved.append(json.loads(json.dumps(s.to_json()))),
        on_progress=progress.append,
        # BD-06/BD-08: requiresAccessToken, so a download without the token is refused.
        on_file=lambda f: anonymous.append(requests.get(f.url, timeout=5).status_code),
    )
    expected = expected_counts()
    assert result.counts() == dict(expected)
    # The files really hold those resources, one per line, each type in its own files.
    on_disk: Counter[str] = Counter()
    for f in result.files:
        for resource in iter_resources(Path(f.path)):
            assert resource["resourceType"] == f.type
            on_disk[f.type] += 1
    assert on_disk == expected
    assert max(f.count for f in result.files) <= 40  # several files per big type
    assert result.requires_access_token
    assert result.errors == []
    assert result.transaction_time.endswith("Z")
    # BD-04: polled while running, X-Progress reported, Retry-After (1 s) honoured.
    assert progress
    assert all(p.status == 202 for p in progress)
    assert all(p.progress and "%" in p.progress for p in progress)
    assert sleeper.waits
    assert set(sleeper.waits) == {1.0}
    # BD-01/BD-06/BD-07: headers sent, token on every request, DELETE at the end.
    log = data_log(server)
    assert log[0].path == "/fhir/Patient/$export"
    assert log[0].status == 202
    client_requests = [e for e in log if e.authorized]
    assert len(log) - len(client_requests) == len(anonymous)  # only the probes went without
    assert log[-1].method == "DELETE"
    assert log[-1].status == 202
    assert server.state.exports.jobs == {}
    # The state was saved after kick-off, after the manifest, after each file, after DELETE.
    assert saved[0]["status_url"]
    assert saved[0]["manifest"] is None
    assert saved[1]["manifest"] is not None
    assert len(saved) == 2 + len(result.files) + 1
    assert saved[-1]["deleted"] is True
    assert set(anonymous) == {401}


def test_kickoff_request_headers_and_params(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0)
    client, _ = bulk_client(server, rsa_key, Sleeper())
    seen: list[requests.PreparedRequest] = []
    client._http.session.hooks["response"].append(lambda r, *a, **k: seen.append(r.request))
    client.export(tmp_path, types=["Condition", "Patient"], since="2000-01-01T00:00:00Z")
    kickoff = next(r for r in seen if "$export?" in (r.url or ""))
    assert kickoff.headers["Prefer"] == "respond-async"
    assert kickoff.headers["Accept"] == "application/fhir+json"
    assert "_type=Condition%2CPatient" in (kickoff.url or "")
    assert "_since=2000-01-01T00%3A00%3A00Z" in (kickoff.url or "")
    status = next(r for r in seen if "$export-status" in (r.url or "") and r.method == "GET")
    assert status.headers["Accept"] == "application/json"
    download = next(r for r in seen if "$export-files" in (r.url or ""))
    assert download.headers["Accept"] == "application/fhir+ndjson"


def test_type_since_and_group_level(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0)
    client, _ = bulk_client(server, rsa_key, Sleeper())
    only = client.export(tmp_path / "a", types=["Condition"])
    assert only.counts() == {"Condition": expected_counts()["Condition"]}

    # Nothing changed since the last export's transactionTime: an empty export.
    again = client.export(tmp_path / "b", since=only.transaction_time)
    assert again.counts() == {}
    # One resource changes: an incremental export brings exactly that one.
    condition = server.state.store.all("Condition")[0]
    server.state.store.update({**condition, "clinicalStatus": {"text": "resolved"}}, None)
    delta = client.export(tmp_path / "c", since=only.transaction_time)
    assert delta.counts() == {"Condition": 1}

    patients = server.state.store.all("Patient")
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{patients[0]['id']}"}}],
    }
    group_id = server.state.store.create(group, None).resource["id"]
    grouped = client.export(tmp_path / "d", group_id=group_id, types=["Patient", "Condition"])
    assert grouped.counts()["Patient"] == 1
    conditions = [
        r for f in grouped.files if f.type == "Condition" for r in iter_resources(Path(f.path))
    ]
    assert conditions
    assert {c["subject"]["reference"] for c in conditions} == {f"Patient/{patients[0]['id']}"}


def test_kickoff_429_is_retried_after_retry_after(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0, faults=Faults(export_kickoff_throttle=2, retry_after="3"))
    sleeper = Sleeper()
    client, _ = bulk_client(server, rsa_key, sleeper)
    result = client.export(tmp_path)
    assert result.counts() == dict(expected_counts())
    kickoffs = [e for e in data_log(server) if e.path.endswith("/$export")]
    assert [e.status for e in kickoffs] == [429, 429, 202]
    assert [e.retry_after for e in kickoffs[:2]] == ["3", "3"]
    assert sleeper.waits[:2] == [3.0, 3.0]


def test_status_500_transient_is_retried(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0, faults=Faults(export_status_errors=2))
    client, _ = bulk_client(server, rsa_key, Sleeper())
    result = client.export(tmp_path)
    assert result.counts() == dict(expected_counts())
    polls = [e.status for e in data_log(server) if "$export-status" in e.path]
    assert polls[:3] == [500, 500, 200]


def test_status_errors_beyond_the_limit_keep_the_state_for_a_later_resume(
    sandbox, rsa_key, tmp_path
):
    server = sandbox(export_run_s=0, faults=Faults(export_status_errors=4))
    client, _ = bulk_client(server, rsa_key, Sleeper(), max_status_errors=2)
    state = ExportState()
    with pytest.raises(UpstreamUnavailableError):
        client.export(tmp_path, state=state)
    assert state.status_url is not None  # the job is still there: resume, don't kick off again
    result = client.export(tmp_path, state=state)
    assert result.counts() == dict(expected_counts())
    assert server.state.exports.kickoffs == 1


def test_export_failure_reports_the_outcome_and_resets_the_state(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0, faults=Faults(export_failure="export store is full"))
    client, _ = bulk_client(server, rsa_key, Sleeper())
    state = ExportState()
    with pytest.raises(ExportFailedError) as caught:
        client.export(tmp_path, state=state)
    assert caught.value.status == 500
    assert caught.value.outcome is not None
    assert caught.value.outcome["issue"][0]["diagnostics"] == "export store is full"
    assert state.status_url is None  # the next run starts a new export


def test_error_file_is_read_as_operation_outcomes(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0, faults=Faults(export_error_types=("Encounter",)))
    client, _ = bulk_client(server, rsa_key, Sleeper())
    result = client.export(tmp_path)
    expected = expected_counts()
    assert "Encounter" not in result.counts()
    assert result.counts() == {t: n for t, n in expected.items() if t != "Encounter"}
    assert len(result.error_files) == 1
    assert len(result.errors) == expected["Encounter"]
    assert all(o["resourceType"] == "OperationOutcome" for o in result.errors)
    assert all("Encounter/" in o["issue"][0]["diagnostics"] for o in result.errors)


def test_expiring_tokens_are_renewed_while_polling_and_downloading(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0.2, export_file_lines=100)
    client, tokens = bulk_client(server, rsa_key, Sleeper())
    revoked: list[int] = []

    def revoke(_: Any) -> None:
        if len(revoked) < 2:
            revoked.append(server.state.revoke_tokens())

    result = client.export(tmp_path, on_progress=revoke, on_file=revoke)
    assert result.counts() == dict(expected_counts())
    assert revoked == [1, 1]
    statuses = [e.status for e in data_log(server)]
    assert statuses.count(401) == 2  # one poll and one download, each renewed once
    assert tokens.tokens_issued == 3


def test_crash_resume_does_not_kick_off_again_or_refetch_done_files(sandbox, rsa_key, tmp_path):
    server = sandbox(export_run_s=0.1, export_file_lines=30)
    client, _ = bulk_client(server, rsa_key, Sleeper())
    state_file = tmp_path / "export-state.json"
    out = tmp_path / "out"

    class Crash(Exception):
        pass

    def save(state: ExportState) -> None:
        state_file.write_text(json.dumps(state.to_json()))

    files_before_crash: list[str] = []

    def crash_after_three(done: Any) -> None:
        files_before_crash.append(done.url)
        if len(files_before_crash) == 3:
            (out / ".part-halfway").write_bytes(b'{"resourceType": "Pat')  # a cut-off download
            raise Crash

    with pytest.raises(Crash):
        client.export(out, save=save, on_file=crash_after_three)

    # A new process: a fresh client, the state read back from disk.
    client2, _ = bulk_client(server, rsa_key, Sleeper())
    state = ExportState.from_json(json.loads(state_file.read_text()))
    assert set(state.done) == set(files_before_crash)
    result = client2.export(out, state=state, save=save)

    assert result.counts() == dict(expected_counts())
    assert server.state.exports.kickoffs == 1  # not kicked off again
    downloads = Counter(e.path for e in data_log(server) if "$export-files" in e.path)
    assert set(downloads.values()) == {1}  # no file fetched twice
    assert len(downloads) == len(result.files)
    assert not list(out.glob(".part-*"))
    assert json.loads(state_file.read_text())["deleted"] is True


def test_throttling_on_every_kind_of_request(sandbox, rsa_key, tmp_path):
    """The sandbox's general fault: every 3rd FHIR request answers 429 + Retry-After, so
    kick-off, status polls, downloads and the DELETE all meet it."""
    server = sandbox(
        export_run_s=0.1, export_file_lines=50, faults=Faults(throttle_every=3, retry_after="2")
    )
    sleeper = Sleeper()
    client, _ = bulk_client(server, rsa_key, sleeper)
    result = client.export(tmp_path)
    assert result.counts() == dict(expected_counts())
    throttled = [e for e in data_log(server) if e.status == 429]
    assert {e.path.split("/")[2] for e in throttled} >= {"$export-status", "$export-files"}
    assert sleeper.waits.count(2.0) >= len(throttled)  # every 429's Retry-After was honoured
