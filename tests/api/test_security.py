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
from fhir_gateway.store.models import AuditRow, Case, FhirResource, Job
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
                assert resp.status_code == 401, (method, path, resp.status_code)
                assert resp.json()["resourceType"] == "OperationOutcome"
                checked += 1
    assert checked >= 15


def _counts(store) -> dict[str, int]:
    with store.session() as s:
        return {
            t.__name__: s.scalar(select(func.count()).select_from(t)) or 0
            for t in (Case, FhirResource, Job, AuditRow)
        }


BAD = sorted(p for p in (FIXTURES / "bad").rglob("*") if p.is_file())


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
    post_bundle(client, tokens, referral())  # something stored already
    store = client.app.state.store
    before = _counts(store)
    data = path.read_bytes()
    ctype = {
        ".json": "application/fhir+json",
        ".ndjson": "application/fhir+ndjson",
        ".xml": "application/fhir+xml",
    }.get(path.suffix, "application/octet-stream")
    targets = ["/fhir", "/fhir/Patient", "/fhir/ServiceRequest", "/fhir/Task"]
    for target in targets:
        for content_type in {ctype, "application/fhir+json"}:
            resp = client.post(
                target, content=data, headers=tokens.headers("ehr") | {"Content-Type": content_type}
            )
            assert 400 <= resp.status_code < 500, (target, resp.status_code, resp.text[:300])
            outcome = resp.json()
            assert outcome["resourceType"] == "OperationOutcome"
            assert outcome["issue"][0]["diagnostics"], "a reason is given"
    after = _counts(store)
    assert after == before, "a rejected input changed what is stored"
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
