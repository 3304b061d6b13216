"""Security sweep: every route needs a token (but the public ones), bad input of every kind in
the corpus's bad/ folder is refused with a reason and changes nothing, no outbound request is
made for it, and expired assignments lose access."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fhir_gateway.app import create_app
from fhir_gateway.intake import hosted
from fhir_gateway.store.models import (
    Assignment,
    AuditRow,
    Case,
    FhirResource,
    Job,
    NormalisedResource,
    Report,
    StoredResource,
)
from tests.api.test_referral_intake import post_bundle, referral
from tests.conftest import FIXTURES

PUBLIC = {
    ("GET", "/health"),
    ("GET", "/ready"),  # readiness for load balancers: check names only, reasons in the log
    ("GET", "/fhir/metadata"),
    ("GET", "/fhir/.well-known/smart-configuration"),
    ("GET", "/.well-known/jwks.json"),
    ("POST", "/auth/token"),  # authenticated by the client assertion in the body
    ("DELETE", "/session"),  # sign-out: only removes the caller's own session cookie
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
# A patient upload link: the token in the path is the credential; an unknown one is 404.
LINK_TOKEN = {("GET", "/upload/{token}"), ("GET", "/upload/{token}/received")}


def test_every_route_needs_a_token(settings) -> None:
    """Every operation of the OpenAPI schema (so every route there is, as it grows)."""
    from fastapi.testclient import TestClient

    app = create_app(settings, configure_logs=False)
    checked = 0
    with TestClient(app) as client:
        for path, operations in app.openapi()["paths"].items():
            for method in operations:
                if (method.upper(), path) in PUBLIC:
                    continue
                url = re.sub(r"\{[^}]+\}", "x", path)
                resp = client.request(method.upper(), url)
                if (method.upper(), path) in LINK_TOKEN:
                    assert resp.status_code == 404, (method, path, resp.status_code)
                    continue
                assert resp.status_code == 401, (method, path, resp.status_code)
                if method != "head":  # a HEAD response has no body (tus HEAD)
                    assert resp.json()["resourceType"] == "OperationOutcome"
                checked += 1
    assert checked >= 15


def _counts(store) -> dict[str, int]:
    with store.session() as s:
        return {
            t.__name__: s.scalar(select(func.count()).select_from(t)) or 0
            for t in (
                Case,
                FhirResource,
                Job,
                AuditRow,
                Assignment,
                Report,
                StoredResource,
                NormalisedResource,
            )
        }


def _versions(store) -> dict[tuple[str, str], str]:
    with store.session() as s:
        return {(r.resource_type, r.id): r.version_id for r in s.scalars(select(FhirResource))}


BAD = sorted(p for p in (FIXTURES / "bad").rglob("*") if p.is_file())


def body_endpoints(case_id: str, task_id: str) -> list[tuple[str, str, str]]:
    """(method, path, role) of every operation that takes a request body."""
    return [
        ("POST", "/fhir", "ehr"),  # transaction
        *[("POST", f"/fhir/{t}", "ehr") for t in sorted(hosted.HOSTED_TYPES)],
        ("PUT", f"/fhir/Task/{task_id}", "ehr"),
        ("PUT", f"/cases/{case_id}/report", "admin"),
        ("POST", f"/cases/{case_id}/assignments", "admin"),
        ("POST", f"/cases/{case_id}/status", "admin"),
        ("POST", "/auth/token", "none"),
        ("POST", "/auth/introspect", "admin"),
        # no such message: refused before or after the body, 4xx either way, nothing stored
        ("POST", "/admin/v2-messages/{message_id}/$assign", "admin"),
        ("POST", "/fhir/Subscription", "ehr"),
        ("POST", "/fhir/Communication", "ehr"),
        ("POST", f"/cases/{case_id}/questions/{{question_id}}/answer", "admin"),
    ]


def test_body_endpoints_cover_every_operation_with_a_body(settings) -> None:
    """The list above is complete: a new endpoint with a body must join the sweep."""
    app = create_app(settings, configure_logs=False)
    with_body = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method, op in operations.items()
        if "requestBody" in op
    }
    listed = {(m, p) for m, p, _ in body_endpoints("{case_id}", "{rid}")}
    listed.add(("POST", "/fhir/{resource_type}"))  # swept as every hosted type
    assert with_body - listed == set()
    assert len(with_body) >= 5


@pytest.fixture
def partner_server(httpserver, data_dir: Path) -> object:
    """The partner's EHR is a counting test server: bad input must never reach it."""
    text = (data_dir / "partners.toml").read_text()
    text = text.replace("http://127.0.0.1:8181/fhir", httpserver.url_for("/fhir"))
    (data_dir / "partners.toml").write_text(text)
    return httpserver


@pytest.mark.parametrize("path", BAD, ids=[str(p.relative_to(FIXTURES)) for p in BAD])
def test_bad_corpus_files_are_refused_and_change_nothing(
    client, tokens, partner_server, path: Path
) -> None:
    """Each bad/ file at every endpoint that takes a body (as its own media type and as FHIR
    JSON): 4xx with an OperationOutcome that gives a reason, and nothing stored changes."""
    first = post_bundle(client, tokens, referral())  # something stored already
    task_id = first.json()["entry"][3]["response"]["location"].split("/")[1]
    store = client.app.state.store
    case_id = client.get("/cases", headers=tokens.headers("admin")).json()[0]["id"]
    before, versions = _counts(store), _versions(store)
    data = path.read_bytes()
    ctype = {
        ".json": "application/fhir+json",
        ".ndjson": "application/fhir+ndjson",
        ".xml": "application/fhir+xml",
    }.get(path.suffix, "application/octet-stream")
    checked = 0
    for method, target, role in body_endpoints(case_id, task_id):
        auth = {} if role == "none" else tokens.headers(role)
        for content_type in sorted({ctype, "application/fhir+json", "application/json"}):
            resp = client.request(
                method, target, content=data, headers=auth | {"Content-Type": content_type}
            )
            where = (method, target, content_type, resp.status_code, resp.text[:300])
            assert 400 <= resp.status_code < 500, where
            body = resp.json()
            if target.startswith("/auth/"):  # OAuth 2.0 error JSON (RFC 6749 5.2)
                assert body["error"] == "invalid_request", where
            else:
                assert body["resourceType"] == "OperationOutcome", where
                assert body["issue"][0]["diagnostics"], "a reason is given"
            checked += 1
    assert checked >= 17 * 2
    assert _counts(store) == before, "a rejected input changed what is stored"
    assert _versions(store) == versions, "a rejected input changed a stored resource"
    assert len(partner_server.log) == 0, "bad input made an outbound request"


def test_xml_with_entities_is_never_parsed(client, tokens) -> None:
    xxe = (FIXTURES / "bad" / "fhir" / "list-xhtml-xxe1.xml").read_bytes()
    resp = client.post(
        "/fhir",
        content=xxe,
        headers=tokens.headers("ehr") | {"Content-Type": "application/fhir+xml"},
    )
    assert resp.status_code == 415
    assert "/etc/passwd" not in resp.text


def test_expired_assignment_loses_access(client, tokens) -> None:
    post_bundle(client, tokens, referral())
    case_id = client.get("/cases", headers=tokens.headers("admin")).json()[0]["id"]
    alice = tokens.headers("reviewer", sub="alice")
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    admin = tokens.headers("admin")
    client.post(
        f"/cases/{case_id}/assignments",
        json={"reviewer": "alice", "expires_at": future},
        headers=admin,
    )
    assert client.get(f"/cases/{case_id}", headers=alice).status_code == 200
    client.post(
        f"/cases/{case_id}/assignments",
        json={"reviewer": "alice", "expires_at": past},
        headers=admin,
    )
    assert client.get(f"/cases/{case_id}", headers=alice).status_code == 403
    assert client.get("/cases", headers=alice).json() == []


def test_keys_are_private_files(client, settings) -> None:
    for key in (settings.data_dir / "keys").glob("*"):
        assert key.stat().st_mode & 0o077 == 0, key


def test_admin_requeues_a_dead_job_and_sees_partners_without_secrets(client, tokens) -> None:
    from fhir_gateway.store.models import Job

    post_bundle(client, tokens, referral())
    store = client.app.state.store
    with store.session() as s:
        job = s.scalars(select(Job)).first()
        assert job is not None
        job.state, job.last_error = "dead", "UpstreamRejectedError: 403"
        job_id = job.id
    admin = tokens.headers("admin")
    dead = client.get("/admin/jobs", params={"state": "dead"}, headers=admin).json()
    assert [j["id"] for j in dead] == [job_id]
    resp = client.post(f"/admin/jobs/{job_id}/$requeue", headers=admin)
    assert resp.status_code == 200
    assert (resp.json()["state"], resp.json()["attempts"]) == ("queued", 0)
    assert client.post(f"/admin/jobs/{job_id}/$requeue", headers=admin).status_code == 409
    partners = client.get("/admin/partners", headers=admin).json()
    st = next(p for p in partners if p["id"] == "st-elsewhere")
    assert st["endpoints"]["fhir"]["auth"] == "smart"
    assert "key_file" not in str(partners)
    assert "PASSWORD" not in str(partners)
