"""Operability: `/ready` says which check failed, `/metrics` is guarded and labels routes by
template, and every request leaves one access log line without its query string."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from fhir_gateway.app import create_app
from fhir_gateway.sandbox.server import AppServer
from fhir_gateway.settings import MetricsSettings, Settings
from tests.conftest import Tokens
from tests.report_helpers import report_fonts

SECRET = "MRN-QUERY-77342"  # an identifier that must not reach the access log


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(body: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def ready(client: TestClient) -> tuple[int, dict[str, Any]]:
    resp = client.get("/ready")
    body: dict[str, Any] = resp.json()
    return resp.status_code, body


def test_ready_when_everything_is_in_order(client: TestClient) -> None:
    report_fonts()  # skips (or fails in CI) without the Debian fonts
    status, body = ready(client)
    assert (status, body["failed"]) == (200, [])
    assert set(body["checks"]) == {
        "database",
        "migrations",
        "partners",
        "report_fonts",
        "image_store",
    }


def test_ready_503_when_the_image_store_cannot_be_written(
    client: TestClient, data_dir: Path
) -> None:
    # As root (CI) permission bits do not stop a write; a file where the directory must be does.
    (data_dir / "blobs").write_bytes(b"not a directory")
    status, body = ready(client)
    assert status == 503
    assert "image_store" in body["failed"]
    assert client.get("/health").status_code == 200  # liveness is another question


def test_ready_503_when_the_partners_file_became_invalid(
    client: TestClient, data_dir: Path
) -> None:
    (data_dir / "partners.toml").write_text('[[partners]]\nid = "x"\n', encoding="utf-8")
    status, body = ready(client)
    assert status == 503
    assert "partners" in body["failed"]
    assert "image_store" not in body["failed"]


def test_ready_503_when_a_migration_is_pending(client: TestClient) -> None:
    with client.app.state.store.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("UPDATE alembic_version SET version_num = '0003'"))
    status, body = ready(client)
    assert status == 503
    assert "migrations" in body["failed"]
    assert "database" not in body["failed"]


def test_metrics_need_an_allowed_address_or_an_admin(
    settings: Settings, tokens: Tokens, data_dir: Path
) -> None:
    closed = settings.model_copy(update={"metrics": MetricsSettings(allow_from=[])})
    with TestClient(create_app(closed, configure_logs=False)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=tokens.headers("reviewer")).status_code == 403
        resp = c.get("/metrics", headers=tokens.headers("admin"))
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    # default allow-list: loopback, as a Prometheus on the same host scrapes (real HTTP)
    with AppServer(create_app(settings, configure_logs=False), lifespan=True) as server:
        scraped = requests.get(f"{server.url}/metrics", timeout=10)
        assert scraped.status_code == 200
        assert "fhir_gateway_queue_depth" in scraped.text


def test_access_log_has_the_route_template_and_no_query(
    client: TestClient, tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    resp = client.get(
        f"/fhir/Task?identifier=urn:oid:1.2.3|{SECRET}",
        headers=tokens.headers("ehr") | {"X-Request-ID": "abc123"},
    )
    assert resp.status_code == 200
    assert resp.headers["X-Request-ID"] == "abc123"
    client.get(f"/fhir/Patient/{SECRET}", headers=tokens.headers("ehr"))  # a 404 with an id

    lines = [r.msg for r in caplog.records if r.name == "fhir_gateway.access"]
    assert len(lines) == 2, lines
    search, read = lines
    assert isinstance(search, dict)
    assert isinstance(read, dict)
    assert search["request_id"] == "abc123"
    assert (search["method"], search["route"], search["status"]) == (
        "GET",
        "/fhir/{resource_type}",
        200,
    )
    assert isinstance(search["duration_ms"], float)
    assert (read["route"], read["status"]) == ("/fhir/{resource_type}/{rid}", 404)
    for line in lines:
        assert SECRET not in str(line)
        assert "?" not in str(line)
        assert "identifier" not in str(line)

    scraped = client.get("/metrics", headers=tokens.headers("admin")).text
    assert SECRET not in scraped
    counted = samples(scraped)
    key = frozenset(
        {"method": "GET", "route": "/fhir/{resource_type}/{rid}", "status": "404"}.items()
    )
    assert counted[("fhir_gateway_http_requests_total", key)] >= 1
    hist = frozenset({"method": "GET", "route": "/fhir/{resource_type}"}.items())
    assert counted[("fhir_gateway_http_request_duration_seconds_count", hist)] >= 1


def test_unmatched_paths_are_one_label(client: TestClient, tokens: Tokens) -> None:
    client.get(f"/no/such/{SECRET}")
    scraped = client.get("/metrics", headers=tokens.headers("admin")).text
    assert SECRET not in scraped
    assert 'route="unmatched"' in scraped
