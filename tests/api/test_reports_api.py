"""Reports API through create_app(): draft, 422 OperationOutcome, submit, deliveries, access."""

from __future__ import annotations

from fhir_gateway.store import open_store
from tests.report_helpers import draft_data, make_case, report_fonts

JSON = {"Content-Type": "application/json"}


def test_reviewer_drafts_and_submits_on_an_assigned_case(client, settings, tokens):
    report_fonts()
    store = open_store(settings.db_url)
    try:
        case_id = make_case(store, reviewer="dr-zolc")
    finally:
        store.dispose()
    reviewer = tokens.headers("reviewer", sub="dr-zolc", **JSON)

    bad = client.put(f"/cases/{case_id}/report", json={"kind": "pathology"}, headers=reviewer)
    assert bad.status_code == 422
    issues = bad.json()["issue"]
    assert bad.json()["resourceType"] == "OperationOutcome"
    assert [i["expression"] for i in issues] == [["conclusion"], ["reviewer"]]

    ok = client.put(f"/cases/{case_id}/report", json=draft_data(), headers=reviewer)
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "draft"

    stranger = tokens.headers("reviewer", sub="someone-else", **JSON)
    denied = client.put(f"/cases/{case_id}/report", json=draft_data(), headers=stranger)
    assert denied.status_code == 403

    sub1 = client.post(f"/cases/{case_id}/report/$submit", headers=reviewer)
    sub2 = client.post(f"/cases/{case_id}/report/$submit", headers=reviewer)
    assert sub1.status_code == 202, sub1.text
    assert sub1.json()["id"] == sub2.json()["id"]
    assert sub1.json()["status"] == "pending"

    report = client.get(f"/cases/{case_id}/report", headers=reviewer).json()
    assert report["status"] == "submitted"
    assert report["diagnosticReport"]["status"] == "final"
    listed = client.get(f"/cases/{case_id}/deliveries", headers=reviewer).json()
    assert [d["id"] for d in listed] == [sub1.json()["id"]]


def test_config_error_in_a_request_logs_its_reason_not_only_its_class(settings, tokens, caplog):
    """A missing report font is a 500 without internal detail for the caller, but the operator's
    log says which font and what to do (not only `error=ConfigError`)."""
    import logging

    from fastapi.testclient import TestClient

    from fhir_gateway.app import create_app
    from fhir_gateway.settings import ReportSettings

    missing = settings.data_dir / "no-such-font.ttf"
    broken = settings.model_copy(update={"reports": ReportSettings(font_regular=missing)})
    store = open_store(broken.db_url)
    try:
        case_id = make_case(store, reviewer="dr-zolc")
    finally:
        store.dispose()
    reviewer = tokens.headers("reviewer", sub="dr-zolc", **JSON)
    with TestClient(create_app(broken, configure_logs=False)) as client:
        assert client.put(
            f"/cases/{case_id}/report", json=draft_data(), headers=reviewer
        ).is_success
        with caplog.at_level(logging.ERROR):
            resp = client.post(f"/cases/{case_id}/report/$submit", headers=reviewer)
    assert resp.status_code == 500
    assert str(missing) not in resp.text  # paths stay out of the answer
    failed = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    failed = [m for m in failed if m.get("event") == "request.failed"]
    assert failed, caplog.records
    assert failed[0]["error"] == "ConfigError"
    assert str(missing) in failed[0]["reason"]
