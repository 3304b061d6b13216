"""The FHIR pull over real HTTP on loopback against the sandbox EHR, SMART enforced.

Expected counts come from the fixture bundles themselves, not from the sandbox.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from typing import Any

import pytest
import requests
import structlog

from connectors._http import Http, RetryPolicy
from connectors.fhir_client import FhirEhrClient
from connectors.smart import PrivateKey, SmartTokenProvider
from fhir_gateway.errors import UpstreamRejectedError, UpstreamUnavailableError
from fhir_gateway.records.pull import (
    PULL_TYPES,
    last_updated_since,
    pull_patient_records,
    save_pull,
)
from fhir_gateway.sandbox import Faults, SandboxServer
from fhir_gateway.store import open_store
from fhir_gateway.store.models import Binary, StoredResource
from tests.conftest import CLIENT_ID, SYNTHEA, add_case

PATIENT_FIXTURES = sorted(p.name for p in SYNTHEA.glob("*.json"))


def fixture_patient(name: str) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    """(Patient, counts of PULL_TYPES for them, counts of their whole compartment)."""
    bundle = json.loads((SYNTHEA / name).read_text(encoding="utf-8"))
    resources = [e["resource"] for e in bundle["entry"]]
    patient_entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    target = patient_entry["fullUrl"]
    mine = [patient_entry["resource"]] + [
        r
        for r in resources
        if any((r.get(f) or {}).get("reference") == target for f in ("subject", "patient"))
    ]
    everything = Counter(r["resourceType"] for r in mine)
    per_type = Counter(r["resourceType"] for r in mine if r["resourceType"] in PULL_TYPES)
    return patient_entry["resource"], dict(per_type), dict(everything)


def gateway_client(
    server: SandboxServer,
    key: PrivateKey,
    *,
    renew_margin_s: float = 60.0,
    scope_types: tuple[str, ...] = (*PULL_TYPES, "Binary"),
    **retry: float,
) -> tuple[FhirEhrClient, SmartTokenProvider]:
    http = Http(
        requests.Session(),
        system="ehr",
        timeout_s=10,
        retry=RetryPolicy(**retry),  # type: ignore[arg-type]
    )
    tokens = SmartTokenProvider(
        http,
        server.base_url,
        client_id=CLIENT_ID,
        key=key,
        resource_types=scope_types,
        renew_margin_s=renew_margin_s,
    )
    return FhirEhrClient(http, server.base_url, tokens=tokens), tokens


@pytest.mark.parametrize("name", PATIENT_FIXTURES)
@pytest.mark.parametrize("everything", [True, False], ids=["everything", "per-type"])
def test_full_pull_stores_exactly_what_the_ehr_holds(name, everything, sandbox, rsa_key, tmp_path):
    patient, per_type, _ = fixture_patient(name)
    server = sandbox(everything=everything, max_page_size=20)  # several pages per type
    # The token covers only the types we pull: $everything is asked for those types (`_type`),
    # so nothing we never wanted (Encounter, Claim, ...) is withheld and the pull is complete.
    client, _ = gateway_client(server, rsa_key)
    progress: list[tuple[str, int, int]] = []
    result = pull_patient_records(
        client, f"Patient/{patient['id']}", progress_cb=lambda *a: progress.append(a)
    )
    assert result.used_everything is everything
    assert max(pages for _, _, pages in progress) > 1
    assert result.counts == per_type
    assert not result.partial
    assert progress  # reported page by page
    data_requests = [
        e for e in server.state.log if e.path.startswith("/fhir/") and ".well-known" not in e.path
    ]
    assert data_requests
    assert all(e.authorized for e in data_requests)
    if everything:
        first = next(e for e in data_requests if e.path.endswith("$everything"))
        assert "_type=Patient%2CCondition" in first.query, first.query

    store = open_store(f"sqlite:///{tmp_path}/gw.db")
    add_case(store, "case-1", f"Patient/{patient['id']}")
    saved = save_pull(store, "case-1", server.base_url, result)
    assert (saved.added, saved.updated) == (sum(result.counts.values()), 0)
    with store.session() as s:
        rows = s.query(StoredResource).filter_by(case_id="case-1").all()
        assert Counter(r.resource_type for r in rows) == Counter(result.counts)
        assert {r.source for r in rows} == {server.base_url}
    again = save_pull(store, "case-1", server.base_url, result)  # idempotent
    assert (again.added, again.updated, again.unchanged) == (0, 0, saved.added)
    store.dispose()


def test_repull_since_only_adds_or_updates(sandbox, rsa_key, tmp_path):
    patient, per_type, _ = fixture_patient(PATIENT_FIXTURES[0])
    server = sandbox(everything=False)
    client, _ = gateway_client(server, rsa_key)
    store = open_store(f"sqlite:///{tmp_path}/gw.db")
    add_case(store, "c", "Patient/x")
    first = pull_patient_records(client, f"Patient/{patient['id']}")
    save_pull(store, "c", server.base_url, first)
    since = last_updated_since(store, "c", server.base_url)
    assert since is not None

    changed = dict(next(r for r in first.resources if r["resourceType"] == "Observation"))
    changed["status"] = "amended"
    server.state.store.update(changed, None)
    newer = dict(changed, id="brand-new-obs")
    server.state.store.update(newer, None)

    again = pull_patient_records(client, f"Patient/{patient['id']}", since=since)
    saved = save_pull(store, "c", server.base_url, again)
    assert (saved.added, saved.updated) == (1, 1)
    sent = [e.query for e in server.state.log if e.path == "/fhir/Observation"]
    assert "_lastUpdated=ge" in sent[-1]
    with store.session() as s:
        assert s.query(StoredResource).filter_by(case_id="c").count() == sum(per_type.values()) + 1
        row = s.query(StoredResource).filter_by(source_id=changed["id"]).one()
        assert row.body["status"] == "amended"
    store.dispose()


def test_token_expiring_mid_pull_is_renewed(sandbox, ec_key):
    patient, per_type, _ = fixture_patient(PATIENT_FIXTURES[1])
    server = sandbox(
        everything=False, max_page_size=10, token_lifetime_s=1, faults=Faults(latency_s=0.15)
    )
    # No renewal margin: requests sent in a token's last 150 ms arrive after it expired.
    client, tokens = gateway_client(server, ec_key, renew_margin_s=0)
    result = pull_patient_records(client, f"Patient/{patient['id']}", max_parallel=2)
    assert result.counts == per_type
    statuses = Counter(e.status for e in server.state.log if e.path.startswith("/fhir"))
    assert statuses[401] >= 1  # the old token was refused mid-pull...
    assert tokens.tokens_issued >= 2  # ...and a new one fetched transparently
    token_calls = [e for e in server.state.log if e.path == "/auth/token"]
    assert len(token_calls) == tokens.tokens_issued


def test_429_retry_after_honoured(sandbox, rsa_key):
    patient, per_type, _ = fixture_patient(PATIENT_FIXTURES[0])
    server = sandbox(everything=False, faults=Faults(throttle_every=4, retry_after="1"))
    client, _ = gateway_client(server, rsa_key)
    result = pull_patient_records(client, f"Patient/{patient['id']}", max_parallel=1)
    assert result.counts == per_type
    log = [e for e in server.state.log if e.path.startswith("/fhir/") and "metadata" not in e.path]
    throttled = [i for i, e in enumerate(log) if e.status == 429]
    assert len(throttled) >= 2
    for i in throttled:
        assert log[i].retry_after == "1"
        retry = log[i + 1]  # one request at a time: the next one is the retry
        assert (retry.path, retry.query) == (log[i].path, log[i].query)
        assert retry.t - log[i].t >= 0.95


def test_paging_loop_detected_and_reported(sandbox, rsa_key):
    patient, _, _ = fixture_patient(PATIENT_FIXTURES[0])
    server = sandbox(everything=False, max_page_size=10, faults=Faults(paging_loop=True))
    client, _ = gateway_client(server, rsa_key)
    with pytest.raises(UpstreamRejectedError, match=r"paging loop.*_getpages=") as caught:
        pull_patient_records(client, f"Patient/{patient['id']}")
    assert caught.value.url.startswith(server.base_url + "?_getpages=")


def test_500_burst_retried_then_succeeds(sandbox, rsa_key):
    patient, per_type, _ = fixture_patient(PATIENT_FIXTURES[0])
    server = sandbox(everything=False, faults=Faults(burst_start=2, burst_count=2))
    client, _ = gateway_client(server, rsa_key, backoff_base_s=0.01)
    result = pull_patient_records(client, f"Patient/{patient['id']}", max_parallel=1)
    assert result.counts == per_type
    assert [e.status for e in server.state.log if e.status >= 500] == [500, 500]


def test_500_burst_retried_then_failed_with_reason(sandbox, rsa_key):
    patient, _, _ = fixture_patient(PATIENT_FIXTURES[0])
    server = sandbox(everything=False, faults=Faults(burst_start=1, burst_count=1000))
    client, _ = gateway_client(server, rsa_key, backoff_base_s=0.01, max_attempts=3)
    with pytest.raises(UpstreamUnavailableError) as caught:
        pull_patient_records(client, f"Patient/{patient['id']}", max_parallel=1)
    assert "HTTP 500" in caught.value.message
    assert "injected fault" in caught.value.message  # the server's own reason
    assert caught.value.status == 500
    # attempts capped, and the searches still queued were not started
    assert sum(e.status == 500 for e in server.state.log) == 3


def test_scopes_enforced_withheld_types_make_the_pull_partial(sandbox, rsa_key):
    patient, per_type, _ = fixture_patient(PATIENT_FIXTURES[0])
    server = sandbox(everything=False, scopes=("system/Patient.rs", "system/Condition.rs"))
    client, tokens = gateway_client(server, rsa_key)
    result = pull_patient_records(client, f"Patient/{patient['id']}")
    assert result.counts == {t: per_type[t] for t in ("Patient", "Condition")}
    assert "Observation" in result.partial_types
    assert tokens.granted_scope == {"system/Patient.rs", "system/Condition.rs"}
    assert any(e.status == 403 for e in server.state.log)


def test_attachments_inline_and_binary_stored_by_hash(sandbox, rsa_key, tmp_path):
    data = tmp_path / "att"
    data.mkdir()
    pdf = b"%PDF-1.4 synthetic report"
    resources = [
        {"resourceType": "Patient", "id": "p1"},
        {
            "resourceType": "Binary",
            "id": "b1",
            "contentType": "application/pdf",
            "data": base64.b64encode(pdf).decode(),
        },
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "subject": {"reference": "Patient/p1"},
            "content": [{"attachment": {"contentType": "application/pdf", "url": "Binary/b1"}}],
        },
        {
            "resourceType": "DocumentReference",
            "id": "d2",
            "status": "current",
            "subject": {"reference": "Patient/p1"},
            "content": [{"attachment": {"url": "https://elsewhere.example.com/Binary/9"}}],
        },
        {
            "resourceType": "DiagnosticReport",
            "id": "r1",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"},
            "presentedForm": [
                {"contentType": "text/plain", "data": base64.b64encode(b"inline text").decode()}
            ],
        },
    ]
    (data / "res.ndjson").write_text("\n".join(json.dumps(r) for r in resources) + "\n")
    server = sandbox(data_dir=data, everything=False)
    client, _ = gateway_client(server, rsa_key)
    bins = tmp_path / "binaries"
    result = pull_patient_records(client, "Patient/p1", binary_dir=bins)
    got = {b.resource: b for b in result.binaries}
    assert set(got) == {"DocumentReference/d1", "DiagnosticReport/r1"}
    assert (bins / got["DocumentReference/d1"].sha256).read_bytes() == pdf
    assert (bins / got["DiagnosticReport/r1"].sha256).read_bytes() == b"inline text"
    assert any("DocumentReference/d2" in i["diagnostics"] for i in result.issues)
    binary_reads = [e for e in server.state.log if e.path == "/fhir/Binary/b1"]
    assert binary_reads
    assert all(e.authorized for e in binary_reads)
    store = open_store(f"sqlite:///{tmp_path}/gw.db")
    add_case(store, "c", "Patient/p1")
    save_pull(store, "c", server.base_url, result)
    with store.session() as s:
        assert s.query(Binary).count() == 2
    store.dispose()


def test_no_phi_in_logs_during_a_pull(sandbox, rsa_key, caplog):
    patient, _, _ = fixture_patient(PATIENT_FIXTURES[1])
    phi = {patient["birthDate"]}
    for name in patient.get("name", []):
        phi.update(name.get("given", []))
        phi.add(name["family"])
    # The Synthea identifier whose value is the resource id is an opaque id, allowed in logs.
    phi.update(i["value"] for i in patient["identifier"] if i["value"] != patient["id"])
    server = sandbox(everything=False, faults=Faults(throttle_every=5, retry_after="0"))
    client, _ = gateway_client(server, rsa_key)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        pull_patient_records(client, f"Patient/{patient['id']}")
        with pytest.raises(UpstreamRejectedError):
            client.read("Patient", "does-not-exist")
    text = json.dumps(events) + "\n".join(r.getMessage() for r in caplog.records)
    assert any(e["event"] == "pull.patient.done" for e in events)
    assert any(e["event"] == "http.request.retry" for e in events)
    leaked = sorted(p for p in phi if p and p in text)
    assert leaked == []
