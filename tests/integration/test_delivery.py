"""connectors.delivery against a loopback FHIR server (RF-20..24, RS-02..09, RS-40, UC-55).

Exactly once: destination down then recovering, a write accepted but its answer lost, and a
"crash" before the receipt is recorded all leave one report on the server (counted there).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from fhir.resources.R4B.provenance import Provenance
from pytest_httpserver import HTTPServer

from connectors.delivery import (
    REPORT_OUTPUT_CODE,
    DeliveryReceipt,
    FhirReportSink,
    parse_retry_after,
)
from fhir_gateway.errors import (
    ConflictError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)
from fhir_gateway.sandbox.server import free_port
from mappers.report import (
    ReportResources,
    draft_to_report,
    parse_draft,
    report_document_reference,
    report_provenance,
    report_transaction,
)
from tests.fhir_loopback import Fault, LoopbackFhirServer, outcome
from tests.report_helpers import context, draft_data, report_fonts


@pytest.fixture(scope="module")
def report() -> ReportResources:
    return draft_to_report(
        parse_draft(draft_data()), context(), status="final", fonts=report_fonts()
    )


@pytest.fixture
def ehr(httpserver: HTTPServer) -> LoopbackFhirServer:
    return LoopbackFhirServer(httpserver)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def sink(ehr: LoopbackFhirServer, session: requests.Session, **kw: Any) -> FhirReportSink:
    return FhirReportSink(session, ehr.base_url, timeout_s=5, **kw)


def without_server_fields(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def test_deliver_creates_the_report_and_it_reads_back_equal(ehr, session, report):
    receipt = sink(ehr, session).deliver(report.diagnostic_report)
    assert receipt.status_code == 201
    assert receipt.created
    assert receipt.version == "1"
    assert ehr.count("DiagnosticReport") == 1
    stored = ehr.get("DiagnosticReport", receipt.server_id)
    assert without_server_fields(stored) == without_server_fields(report.diagnostic_report)
    method, path, headers = ehr.requests[-1]
    assert (method, path) == ("POST", "/fhir/DiagnosticReport")
    assert headers["If-None-Exist"] == "identifier=urn:fhir-gateway:report|case-1"  # UC-51
    assert headers["Prefer"] == "return=representation"  # RF-24
    assert headers["Content-Type"] == "application/fhir+json; charset=utf-8"  # RS-01
    assert headers["Accept"] == "application/fhir+json"


def test_redelivery_after_a_crash_finds_the_report_instead_of_duplicating(ehr, session, report):
    """(b): the EHR accepted the POST, we died before recording it; the re-run gets 200."""
    first = sink(ehr, session).deliver(report.diagnostic_report)
    # ... the process is killed here: `first` is never stored ...
    again = sink(ehr, session).deliver(report.diagnostic_report)
    assert again.status_code == 200
    assert not again.created
    assert again.server_id == first.server_id
    assert ehr.count("DiagnosticReport") == 1


def test_lost_response_is_retryable_and_the_retry_matches(ehr, session, report):
    """The write commits but the answer is a 502 from a proxy: retry finds it (RS-05)."""
    ehr.faults.append(Fault(502, commit_first=True, methods=("POST",)))
    with pytest.raises(UpstreamUnavailableError):
        sink(ehr, session).deliver(report.diagnostic_report)
    assert ehr.count("DiagnosticReport") == 1
    receipt = sink(ehr, session).deliver(report.diagnostic_report)
    assert receipt.status_code == 200
    assert ehr.count("DiagnosticReport") == 1


def test_destination_down_then_recovering_delivers_once(session, report):
    """(a): connection refused while the EHR is down, then it comes back on the same URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    down = FhirReportSink(session, base, timeout_s=5)
    for _ in range(3):  # the job queue would retry these with backoff
        with pytest.raises(UpstreamUnavailableError) as err:
            down.deliver(report.diagnostic_report)
        assert err.value.retry_after is None
    server = HTTPServer(host="127.0.0.1", port=port)
    server.start()
    try:
        ehr = LoopbackFhirServer(server)
        assert ehr.base_url == base
        ehr.faults += [Fault(503, {"Retry-After": "120"}) for _ in range(2)]  # still warming up
        waits = []
        receipt: DeliveryReceipt | None = None
        for _ in range(5):
            try:
                receipt = down.deliver(report.diagnostic_report)
                break
            except UpstreamUnavailableError as exc:
                waits.append(exc.retry_after)
        assert waits == [120.0, 120.0]
        assert receipt is not None
        assert receipt.created
        assert ehr.count("DiagnosticReport") == 1
    finally:
        server.clear()
        server.stop()


def test_timeout_is_retryable(session, report):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        slow = FhirReportSink(session, f"http://127.0.0.1:{port}/fhir", timeout_s=0.3)
        with pytest.raises(UpstreamUnavailableError, match="timed out"):
            slow.deliver(report.diagnostic_report)


def test_429_with_http_date_and_503_without_retry_after(ehr, session, report):
    ehr.faults.append(Fault(429, {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}))
    with pytest.raises(UpstreamUnavailableError) as err:
        sink(ehr, session).deliver(report.diagnostic_report)
    assert err.value.status == 429
    assert err.value.retry_after is not None
    assert err.value.retry_after > 3600
    ehr.faults.append(Fault(503, body=outcome("maintenance", "transient")))
    with pytest.raises(UpstreamUnavailableError, match="maintenance") as err2:
        sink(ehr, session).deliver(report.diagnostic_report)
    assert err2.value.retry_after is None
    assert ehr.count("DiagnosticReport") == 0


def test_parse_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_empty_201_is_read_back_from_location(ehr, session, report):
    """RS-08: a server ignoring return=representation answers 201 with no body."""
    ehr.empty_201 = True
    receipt = sink(ehr, session).deliver(report.diagnostic_report)
    assert receipt.created
    assert receipt.version == "1"
    assert ehr.requests[-1][0] == "GET"
    assert ehr.requests[-1][1] == f"/fhir/DiagnosticReport/{receipt.server_id}/_history/1"


def test_200_without_body_is_resolved_by_search(ehr, session, report):
    first = sink(ehr, session).deliver(report.diagnostic_report)
    ehr.empty_200 = True
    again = sink(ehr, session).deliver(report.diagnostic_report)
    assert again.server_id == first.server_id
    assert not again.created


def test_several_matches_412_is_surfaced_not_retried(ehr, session, report):
    ehr.put_resource({**report.diagnostic_report, "id": "a"})
    ehr.put_resource({**report.diagnostic_report, "id": "b"})
    with pytest.raises(UpstreamRejectedError) as err:
        sink(ehr, session).deliver(report.diagnostic_report)
    assert not isinstance(err.value, UpstreamUnavailableError)
    assert err.value.status == 412
    assert ehr.count("DiagnosticReport") == 2


def test_422_operation_outcome_is_rejected_with_the_ehr_message(ehr, session, report):
    msg = "DiagnosticReport.subject: patient MRN-1 unknown at this facility"
    ehr.faults.append(Fault(422, body=outcome(msg)))
    with pytest.raises(UpstreamRejectedError) as err:
        sink(ehr, session).deliver(report.diagnostic_report)
    assert msg in err.value.message
    assert err.value.status == 422
    assert err.value.outcome is not None
    assert ehr.count("DiagnosticReport") == 0


class RotatingTokens:
    """Token provider whose cached token expired on the server; renews on invalidate()."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.invalidations = 0

    def token(self) -> str | None:
        return self.tokens[min(self.invalidations, len(self.tokens) - 1)]

    def invalidate(self) -> None:
        self.invalidations += 1


def test_401_renews_the_token_once_then_retries(ehr, session, report):
    ehr.valid_token = "fresh"
    tokens = RotatingTokens(["expired", "fresh"])
    receipt = sink(ehr, session, tokens=tokens).deliver(report.diagnostic_report)
    assert receipt.created
    assert tokens.invalidations == 1
    assert [r[2].get("Authorization") for r in ehr.requests] == ["Bearer expired", "Bearer fresh"]


def test_401_after_renewal_is_rejected(ehr, session, report):
    ehr.valid_token = "fresh"
    tokens = RotatingTokens(["bad", "still-bad"])
    with pytest.raises(UpstreamRejectedError) as err:
        sink(ehr, session, tokens=tokens).deliver(report.diagnostic_report)
    assert err.value.status == 401
    assert tokens.invalidations == 1
    assert len(ehr.requests) == 2


@pytest.mark.parametrize("status", [403, 405])
def test_refused_diagnostic_report_falls_back_to_document_reference(ehr, session, report, status):
    """RF-23."""
    ehr.refuse_types["DiagnosticReport"] = status
    doc = report_document_reference(report.diagnostic_report)
    receipt = sink(ehr, session).deliver(report.diagnostic_report, document_reference=doc)
    assert receipt.fallback_used
    assert receipt.resource_type == "DocumentReference"
    assert ehr.count("DocumentReference") == 1
    assert ehr.count("DiagnosticReport") == 0
    again = sink(ehr, session).deliver(report.diagnostic_report, document_reference=doc)
    assert again.server_id == receipt.server_id
    assert ehr.count("DocumentReference") == 1
    with pytest.raises(UpstreamRejectedError) as err:
        sink(ehr, session).deliver(report.diagnostic_report)
    assert err.value.status == status


def test_transaction_delivers_report_findings_and_provenance_once(ehr, session, report):
    bundle = report_transaction(report.diagnostic_report)
    receipt = sink(ehr, session).deliver(report.diagnostic_report, transaction=bundle)
    assert receipt.created
    assert ehr.count("DiagnosticReport") == 1
    assert ehr.count("Observation") == 5
    assert ehr.count("Provenance") == 1
    stored = ehr.get("DiagnosticReport", receipt.server_id)
    assert all(r["reference"].startswith("Observation/") for r in stored["result"])
    provenance = next(r for (t, _), (_, r) in ehr.resources.items() if t == "Provenance")
    assert provenance["target"] == [{"reference": f"DiagnosticReport/{receipt.server_id}"}]
    again = sink(ehr, session).deliver(report.diagnostic_report, transaction=bundle)
    assert not again.created
    assert again.server_id == receipt.server_id
    assert ehr.count("Provenance") == 1


def amended(report: ReportResources, status: str = "amended") -> dict[str, Any]:
    return {**report.diagnostic_report, "status": status, "conclusion": "Revised: grade 3."}


@pytest.mark.parametrize("conflict_status", [409, 412])
def test_amend_updates_the_same_report_and_handles_one_conflict(
    ehr, session, report, conflict_status
):
    """RS-03: If-Match; a conflict re-reads and retries once."""
    ehr.conflict_status = conflict_status
    client = sink(ehr, session)
    first = client.deliver(report.diagnostic_report)
    updated = client.update(amended(report), server_id=first.server_id, version=first.version)
    assert updated.version == "2"
    assert ehr.requests[-1][2]["If-Match"] == 'W/"1"'
    ehr.bump("DiagnosticReport", first.server_id)  # someone edits it on the EHR: version 3
    again = client.update(
        amended(report, "corrected"), server_id=first.server_id, version=updated.version
    )
    assert again.version == "4"
    stored = ehr.get("DiagnosticReport", first.server_id)
    assert stored["status"] == "corrected"
    assert ehr.count("DiagnosticReport") == 1
    puts = [r for r in ehr.requests if r[0] == "PUT"]
    assert [p[2]["If-Match"] for p in puts[-2:]] == ['W/"2"', 'W/"3"']


def test_amend_conflicting_twice_surfaces_a_conflict(ehr, session, report):
    client = sink(ehr, session)
    first = client.deliver(report.diagnostic_report)
    ehr.faults += [Fault(412, body=outcome("changed"), methods=("PUT",)) for _ in range(2)]
    with pytest.raises(ConflictError):
        client.update(amended(report), server_id=first.server_id, version=first.version)
    assert ehr.get("DiagnosticReport", first.server_id)["status"] == "final"


def test_retract_marks_entered_in_error(ehr, session, report):
    client = sink(ehr, session)
    first = client.deliver(report.diagnostic_report)
    ehr.bump("DiagnosticReport", first.server_id)
    receipt = client.retract(
        report.diagnostic_report, server_id=first.server_id, version=first.version
    )
    assert ehr.get("DiagnosticReport", first.server_id)["status"] == "entered-in-error"
    assert receipt.version == "3"


def test_update_of_a_deleted_report_is_not_found(ehr, session, report):
    with pytest.raises(UpstreamError) as err:
        sink(ehr, session).update(amended(report), server_id="gone", version="1")
    assert err.value.status == 404


def test_complete_task_on_the_ehr_is_idempotent(ehr, session, report):
    """RF-21: status completed, output -> the delivered report; a second call changes nothing."""
    task = ehr.put_resource(
        {
            "resourceType": "Task",
            "id": "t1",
            "status": "in-progress",
            "intent": "order",
            "focus": {"reference": "ServiceRequest/sr-1"},
        }
    )
    client = sink(ehr, session)
    receipt = client.deliver(report.diagnostic_report)
    done = client.complete_task("Task/t1", receipt.reference)
    stored = ehr.get("Task", "t1")
    assert stored["status"] == "completed"
    assert stored["output"] == [
        {
            "type": {
                "coding": [{"system": "urn:fhir-gateway:task-output", "code": REPORT_OUTPUT_CODE}]
            },
            "valueReference": {"reference": f"DiagnosticReport/{receipt.server_id}"},
        }
    ]
    assert done.version == "2"
    assert task["meta"]["versionId"] == "1"
    again = client.complete_task(f"{ehr.base_url}/Task/t1", receipt.reference)
    assert again.version == "2"
    assert [r[0] for r in ehr.requests].count("PUT") == 1


def test_provenance_is_created_once_for_the_delivered_report(ehr, session, report):
    """RF-24: a Provenance per delivered report, conditional on its target."""
    prov = report_provenance(report.diagnostic_report, author_by_identifier=True)
    client = sink(ehr, session)
    first = client.deliver(report.diagnostic_report, provenance=prov)
    client.deliver(report.diagnostic_report, provenance=prov)  # a re-run after a crash
    assert ehr.count("Provenance") == 1
    stored = next(r for (t, _), (_, r) in ehr.resources.items() if t == "Provenance")
    Provenance.model_validate(stored)
    assert stored["target"] == [{"reference": f"DiagnosticReport/{first.server_id}"}]
    assert stored["agent"][0]["who"]["identifier"]["value"] == "1234567893"


def test_refused_provenance_does_not_undo_the_delivery(ehr, session, report):
    ehr.refuse_types["Provenance"] = 403
    receipt = sink(ehr, session).deliver(
        report.diagnostic_report, provenance=report_provenance(report.diagnostic_report)
    )
    assert receipt.created
    assert ehr.count("DiagnosticReport") == 1
    assert ehr.count("Provenance") == 0
