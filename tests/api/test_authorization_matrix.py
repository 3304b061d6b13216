"""Authorisation matrix (issue 6): every endpoint x every kind of caller -> the expected status.

Callers: no token; the EHR of the partner that sent the referral (A) and of another partner (B);
a reviewer assigned to the case, one not assigned, one whose assignment expired; an admin.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_referral_intake import post_bundle, referral
from tests.conftest import FHIR_JSON, Tokens
from tests.notify_helpers import subscription
from tests.report_helpers import draft_data

CALLERS = ["none", "ehr_a", "ehr_b", "reviewer", "reviewer_other", "reviewer_expired", "admin"]


class Case:
    def __init__(self, client: TestClient, tokens: Tokens) -> None:
        body = post_bundle(client, tokens, referral()).json()
        self.task_id = body["entry"][3]["response"]["location"].split("/")[1]
        admin = tokens.headers("admin")
        self.id = client.get("/cases", headers=admin).json()[0]["id"]
        self.task = client.get(f"/fhir/Task/{self.task_id}", headers=admin).json()
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        for reviewer, expires in (("alice", None), ("carol", past)):
            client.post(
                f"/cases/{self.id}/assignments",
                headers=admin,
                json={"reviewer": reviewer, "expires_at": expires},
            )


def headers(tokens: Tokens, caller: str) -> dict[str, str]:
    return {
        "none": {},
        "ehr_a": tokens.headers("ehr", sub="ehr-a", partner="st-elsewhere"),
        "ehr_b": tokens.headers("ehr", sub="ehr-b", partner="mercy-north"),
        "reviewer": tokens.headers("reviewer", sub="alice"),
        "reviewer_other": tokens.headers("reviewer", sub="bob"),
        "reviewer_expired": tokens.headers("reviewer", sub="carol"),
        "admin": tokens.headers("admin", sub="ops"),
    }[caller]


DRAFT = {
    **draft_data(),
    "findings": [  # no focus: this case holds no pulled Condition
        {k: v for k, v in f.items() if k not in ("focus", "derived_from")}
        for f in draft_data()["findings"]
    ],
}

Request = Callable[[TestClient, Case, dict[str, str]], Any]

# endpoint -> (request, expected status per caller in CALLERS order)
MATRIX: dict[str, tuple[Request, tuple[int, ...]]] = {
    "GET /fhir/Task/{id}": (
        lambda c, k, h: c.get(f"/fhir/Task/{k.task_id}", headers=h),
        (401, 200, 403, 200, 403, 403, 200),
    ),
    "PUT /fhir/Task/{id} (cancel)": (
        lambda c, k, h: c.put(
            f"/fhir/Task/{k.task_id}",
            headers=h | FHIR_JSON,
            json={**k.task, "status": "cancelled", "statusReason": {"text": "withdrawn"}},
        ),
        (401, 200, 403, 403, 403, 403, 200),
    ),
    "POST /fhir (referral)": (
        lambda c, k, h: c.post("/fhir", headers=h | FHIR_JSON, json=referral()),
        (401, 200, 403, 403, 403, 403, 200),
    ),
    "GET /cases": (lambda c, k, h: c.get("/cases", headers=h), (401, 403, 403, 200, 200, 200, 200)),
    "GET /cases/{id}": (
        lambda c, k, h: c.get(f"/cases/{k.id}", headers=h),
        (401, 403, 403, 200, 403, 403, 200),
    ),
    "POST /cases/{id}/assignments": (
        lambda c, k, h: c.post(f"/cases/{k.id}/assignments", headers=h, json={"reviewer": "dan"}),
        (401, 403, 403, 403, 403, 403, 201),
    ),
    "POST /cases/{id}/status": (
        lambda c, k, h: c.post(f"/cases/{k.id}/status", headers=h, json={"status": "accepted"}),
        (401, 403, 403, 403, 403, 403, 200),
    ),
    "GET /fhir/AuditEvent": (
        lambda c, k, h: c.get("/fhir/AuditEvent", headers=h),
        (401, 403, 403, 403, 403, 403, 200),
    ),
    "PUT /cases/{id}/report": (
        lambda c, k, h: c.put(f"/cases/{k.id}/report", headers=h | FHIR_JSON, json=DRAFT),
        (401, 403, 403, 200, 403, 403, 200),
    ),
    "GET /cases/{id}/report": (
        lambda c, k, h: c.get(f"/cases/{k.id}/report", headers=h),
        (401, 403, 403, 404, 403, 403, 404),
    ),
    "GET /cases/{id}/deliveries": (
        lambda c, k, h: c.get(f"/cases/{k.id}/deliveries", headers=h),
        (401, 403, 403, 200, 403, 403, 200),
    ),
    "GET /cases/{id}/bundle": (
        lambda c, k, h: c.get(f"/cases/{k.id}/bundle", headers=h),
        (401, 403, 403, 409, 403, 403, 409),
    ),  # 409: not normalised yet, for those allowed
    "GET /cases/{id}/summary": (
        lambda c, k, h: c.get(f"/cases/{k.id}/summary", headers=h),
        (401, 403, 403, 409, 403, 403, 409),
    ),
    "GET /cases/{id}/timeline": (
        lambda c, k, h: c.get(f"/cases/{k.id}/timeline", headers=h),
        (401, 403, 403, 409, 403, 403, 409),
    ),
    "GET /cases/{id}/dicom-web/studies": (
        lambda c, k, h: c.get(f"/cases/{k.id}/dicom-web/studies", headers=h),
        (401, 403, 403, 200, 403, 403, 200),
    ),
    "GET /admin/jobs": (
        lambda c, k, h: c.get("/admin/jobs", headers=h),
        (401, 403, 403, 403, 403, 403, 200),
    ),
    "GET /admin/partners": (
        lambda c, k, h: c.get("/admin/partners", headers=h),
        (401, 403, 403, 403, 403, 403, 200),
    ),
    "POST /admin/jobs/{id}/$requeue": (
        lambda c, k, h: c.post("/admin/jobs/no-such-job/$requeue", headers=h),
        (401, 403, 403, 403, 403, 403, 404),
    ),
    # TestClient's peer ("testclient") is outside metrics.allow_from: only an admin may scrape
    "GET /metrics": (
        lambda c, k, h: c.get("/metrics", headers=h),
        (401, 403, 403, 403, 403, 403, 200),
    ),
    "GET /admin/held": (
        lambda c, k, h: c.get("/admin/held", headers=h),
        (401, 403, 403, 403, 403, 403, 200),
    ),
    "POST /cases/{id}/held/{held_id}/$release": (
        lambda c, k, h: c.post(f"/cases/{k.id}/held/no-such-item/$release", headers=h),
        (401, 403, 403, 403, 403, 403, 404),
    ),
    "POST /cases/{id}/held/{held_id}/$reject": (
        lambda c, k, h: c.post(f"/cases/{k.id}/held/no-such-item/$reject", headers=h),
        (401, 403, 403, 403, 403, 403, 404),
    ),
    "GET /admin/v2-messages": (
        lambda c, k, h: c.get("/admin/v2-messages", headers=h),
        (401, 403, 403, 403, 403, 403, 200),
    ),
    "POST /admin/v2-messages/{id}/$assign": (
        lambda c, k, h: c.post(
            "/admin/v2-messages/no-such-message/$assign", json={"case": k.id}, headers=h
        ),
        (401, 403, 403, 403, 403, 403, 404),
    ),
    "POST /admin/v2-messages/{id}/$discard": (
        lambda c, k, h: c.post("/admin/v2-messages/no-such-message/$discard", headers=h),
        (401, 403, 403, 403, 403, 403, 404),
    ),
    "GET /cases/{id}/questions": (
        lambda c, k, h: c.get(f"/cases/{k.id}/questions", headers=h),
        (401, 403, 403, 200, 403, 403, 200),
    ),
    "POST /cases/{id}/questions/{qid}/answer": (
        lambda c, k, h: c.post(
            f"/cases/{k.id}/questions/no-such-question/answer", headers=h, json={"text": "x"}
        ),
        (401, 403, 403, 404, 403, 403, 404),
    ),
    "POST /fhir/Subscription": (  # a partner's EHR only, for its own referrals
        lambda c, k, h: c.post(
            "/fhir/Subscription", headers=h | FHIR_JSON, json=subscription("http://127.0.0.1:9/h")
        ),
        (401, 201, 201, 403, 403, 403, 403),
    ),
    "POST /fhir/Communication": (  # about no report delivered to the caller: 422
        lambda c, k, h: c.post(
            "/fhir/Communication",
            headers=h | FHIR_JSON,
            json={
                "resourceType": "Communication",
                "status": "completed",
                "about": [{"reference": "DiagnosticReport/none"}],
                "payload": [{"contentString": "?"}],
            },
        ),
        (401, 422, 422, 403, 403, 403, 403),
    ),
    "POST /cases/{id}/upload-links": (
        lambda c, k, h: c.post(f"/cases/{k.id}/upload-links", headers=h, json={}),
        (401, 403, 403, 403, 403, 403, 201),
    ),
    "GET /cases/{id}/upload-links": (
        lambda c, k, h: c.get(f"/cases/{k.id}/upload-links", headers=h),
        (401, 403, 403, 403, 403, 403, 200),
    ),
    "DELETE /cases/{id}/upload-links/{link}": (
        lambda c, k, h: c.delete(f"/cases/{k.id}/upload-links/no-such-link", headers=h),
        (401, 403, 403, 403, 403, 403, 404),
    ),
    "POST /cases/{id}/uploads/ (tus creation)": (
        lambda c, k, h: c.post(
            f"/cases/{k.id}/uploads/",
            headers=h | {"Tus-Resumable": "1.0.0", "Upload-Length": "4"},
        ),
        (401, 201, 403, 403, 403, 403, 201),
    ),
    "GET /fhir/Basic/{topic}": (
        lambda c, k, h: c.get("/fhir/Basic/referral-task-status", headers=h),
        (401, 200, 200, 200, 200, 200, 200),
    ),
}

CELLS = [
    (endpoint, caller, expected[i])
    for endpoint, (_, expected) in MATRIX.items()
    for i, caller in enumerate(CALLERS)
]


@pytest.mark.parametrize(
    ("endpoint", "caller", "expected"), CELLS, ids=[f"{e} as {c}" for e, c, _ in CELLS]
)
def test_authorization(client, tokens, endpoint: str, caller: str, expected: int) -> None:
    case = Case(client, tokens)
    request, _ = MATRIX[endpoint]
    resp = request(client, case, headers(tokens, caller))
    assert resp.status_code == expected, (endpoint, caller, resp.text[:300])
