"""The workspace's rules without a browser: CSRF on every form, the dev sign-in only on loopback,
the per-case rules of the API, validation errors beside their field with nothing stored, audit."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fhir_gateway.app import create_app
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store, open_store
from fhir_gateway.store.models import AuditRow, Report
from tests.report_helpers import report_settings
from tests.web.workspace_case import build_case

LOOPBACK = ("127.0.0.1", 5000)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = report_settings(tmp_path, "http://127.0.0.1:9/fhir").model_copy(
        update={"public_base_url": "http://127.0.0.1:8080"}
    )
    store = open_store(settings.db_url, key_dir=tmp_path / "keys")
    case_id = build_case(store, settings, "dr.demo")
    yield {"settings": settings, "store": store, "case": case_id}
    store.dispose()


def client_for(settings: Settings, store: Store, peer: tuple[str, int] = LOOPBACK) -> TestClient:
    app = create_app(settings, store=store, configure_logs=False)
    return TestClient(app, client=peer, base_url="http://127.0.0.1:8080")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def sign_in(c: TestClient, sub: str, role: str = "reviewer") -> str:
    token = csrf_of(c.get("/app/sign-in/dev").text)
    resp = c.post(
        "/app/sign-in/dev",
        data={"csrf": token, "reviewer": sub, "role": role},
        follow_redirects=False,
    )
    assert resp.status_code == 303
    return csrf_of(c.get("/app").text)


def test_pages_need_a_session_and_forms_need_the_csrf_token(env):
    c = client_for(env["settings"], env["store"])
    assert c.get("/app", follow_redirects=False).headers["location"] == "/app/sign-in"
    # A forged sign-in (no token from the session) is refused.
    resp = c.post("/app/sign-in/dev", data={"reviewer": "dr.demo", "role": "admin"})
    assert resp.status_code == 403
    assert "CSRF" in resp.text
    token = sign_in(c, "dr.demo")
    before = _reports(env["store"])
    resp = c.post(f"/app/cases/{env['case']}/report", data={"csrf": "wrong", "conclusion": "x"})
    assert resp.status_code == 403
    assert _reports(env["store"]) == before == 0
    assert token


def test_dev_sign_in_only_on_loopback(env):
    off_loopback = client_for(env["settings"], env["store"], peer=("203.0.113.9", 5000))
    assert off_loopback.get("/app/sign-in/dev").status_code == 403
    public = env["settings"].model_copy(update={"public_base_url": "https://gw.example.org"})
    c = client_for(public, env["store"])
    assert c.get("/app/sign-in/dev").status_code == 403
    assert "Development sign-in" not in c.get("/app/sign-in").text


def test_same_per_case_rules_and_audit_as_the_api(env):
    c = client_for(env["settings"], env["store"])
    sign_in(c, "dr.other")
    assert "No cases are assigned" in c.get("/app").text
    assert c.get(f"/app/cases/{env['case']}").status_code == 403
    assert c.get("/app/admin").status_code == 403
    c2 = client_for(env["settings"], env["store"])
    sign_in(c2, "dr.demo")
    before = _audit(env["store"], env["case"])
    page = c2.get(f"/app/cases/{env['case']}")
    assert page.status_code == 200
    assert page.text.count("data-point ") == 3
    actions = _audit_actions(env["store"], env["case"])[before:]
    assert actions == ["case.read", "case.bundle", "case.timeline"]
    assert page.headers["cache-control"] == "no-store"


def test_bad_draft_comes_back_beside_its_field_and_nothing_is_stored(env):
    c = client_for(env["settings"], env["store"])
    token = sign_in(c, "dr.demo")
    form = {
        "csrf": token,
        "kind": "pathology",
        "conclusion": "",
        "findings": "[",
        "reviewer.family": "Zolc",
    }
    resp = c.post(f"/app/cases/{env['case']}/report", data=form)
    assert resp.status_code == 422
    assert 'id="f-findings-error"' in resp.text
    form["findings"] = "[]"
    resp = c.post(f"/app/cases/{env['case']}/report", data=form)
    assert resp.status_code == 422
    assert re.search(r'id="f-conclusion-error">conclusion: String should have', resp.text)
    assert _reports(env["store"]) == 0
    form["conclusion"] = "Agree with the referring diagnosis."
    resp = c.post(f"/app/cases/{env['case']}/report", data=form)
    assert "the reviewer needs an NPI" in resp.text.split('id="f-reviewer-npi-error">')[1][:200]
    form["reviewer.npi"] = "1234567893"
    resp = c.post(f"/app/cases/{env['case']}/report", data=form, follow_redirects=False)
    assert resp.status_code == 303, re.findall(r"field-error[^>]*>([^<]*)", resp.text)
    assert _reports(env["store"]) == 1


def _reports(store: Store) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(Report)) or 0)


def _audit_actions(store: Store, case_id: str) -> list[str]:
    with store.session() as s:
        return list(
            s.scalars(
                select(AuditRow.action).where(AuditRow.case_id == case_id).order_by(AuditRow.id)
            )
        )


def _audit(store: Store, case_id: str) -> int:
    return len(_audit_actions(store, case_id))
