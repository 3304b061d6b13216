"""Audit you can trust (AU-02, AU-07): refused requests and every PHI read leave an AuditEvent,
and `fhir-gateway audit verify` detects a chain recomputed without the key and deleted newest
rows, naming what is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from fhir_gateway.security import audit
from fhir_gateway.store.models import AuditRow
from tests.api.test_referral_intake import post_bundle, referral
from tests.conftest import FHIR_JSON, Tokens
from tests.report_helpers import draft_data, make_case

ROOT = Path(__file__).resolve().parents[2]


def verify_cli(settings: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FHIR_GATEWAY_DATA_DIR": str(settings.data_dir)}
    cmd = [sys.executable, "-m", "fhir_gateway.cli", "audit", "verify"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    done.stderr = " ".join(done.stderr.split())  # the console wraps long lines
    return done


def some_events(client: Any, tokens: Tokens) -> None:
    post_bundle(client, tokens, referral())
    for _ in range(4):
        client.get("/cases", headers=tokens.headers("admin"))


def test_the_key_is_made_once_under_keys_with_mode_0600(client, tokens, settings) -> None:
    some_events(client, tokens)
    key = settings.data_dir / "keys" / audit.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text())) == 32
    assert verify_cli(settings).returncode == 0


def test_whole_chain_recomputed_without_the_key_is_detected(client, tokens, settings) -> None:
    some_events(client, tokens)
    store = client.app.state.store
    with store.session() as s:  # the attacker rewrites an agent and re-links every row (SHA-256)
        rows = s.scalars(select(AuditRow).order_by(AuditRow.id)).all()
        prev = audit.GENESIS
        for row in rows:
            row.agent = "mallory"
            row.prev_hash = prev
            data = json.dumps(audit._content(row), sort_keys=True, separators=(",", ":"))
            row.hash = hashlib.sha256(prev.encode() + data.encode()).hexdigest()
            prev = row.hash
        first = rows[0].id
    bad = verify_cli(settings)
    assert bad.returncode == 1
    assert f"event {first}: its hash does not match" in bad.stderr
    assert "without the audit key" in bad.stderr


def test_deleting_the_newest_rows_is_detected(client, tokens, settings) -> None:
    some_events(client, tokens)
    store = client.app.state.store
    with store.session() as s:
        ids = s.scalars(select(AuditRow.id).order_by(AuditRow.id.desc()).limit(3)).all()
        s.execute(delete(AuditRow).where(AuditRow.id.in_(ids)))
    bad = verify_cli(settings)
    assert bad.returncode == 1
    assert "truncated: 3 of the newest events are missing" in bad.stderr


def _events(client: Any, tokens: Tokens, **params: str) -> list[dict[str, Any]]:
    resp = client.get("/fhir/AuditEvent", params=params, headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text
    return [e["resource"] for e in resp.json()["entry"]]


def test_refused_requests_are_audited_once_with_a_failure_outcome(client, tokens) -> None:
    assert client.get("/cases").status_code == 401
    assert client.get("/cases", headers={"Authorization": "Bearer not-a-jwt"}).status_code == 401
    assert (
        client.get("/fhir/AuditEvent", headers=tokens.headers("reviewer", sub="rev-9")).status_code
        == 403
    )
    events = _events(client, tokens)
    refused = sorted(
        (e for e in events if e["outcomeDesc"].startswith("request.")), key=lambda e: int(e["id"])
    )
    assert [(e["outcomeDesc"], e["outcome"]) for e in refused] == [
        ("request.unauthenticated", "8"),
        ("request.unauthenticated", "8"),
        ("request.forbidden", "8"),
    ]
    whats = [[x["what"].get("identifier", {}).get("value") for x in e["entity"]] for e in refused]
    assert "route:GET /cases" in whats[0]
    assert "route:GET /fhir/AuditEvent" in whats[2]
    assert refused[0]["agent"][0]["who"]["identifier"]["value"] == "anonymous"
    assert refused[2]["agent"][0]["who"]["identifier"]["value"] == "rev-9"


def test_unassigned_reviewer_refused_on_a_case_is_audited_with_the_case(client, tokens) -> None:
    case_id = make_case(client.app.state.store, reviewer="dr-a")
    resp = client.get(f"/cases/{case_id}/report", headers=tokens.headers("reviewer", sub="dr-b"))
    assert resp.status_code == 403
    with client.app.state.store.session() as s:
        row = s.scalars(select(AuditRow).order_by(AuditRow.id.desc())).first()
        assert row is not None
        assert (row.action, row.case_id, row.agent) == ("request.forbidden", case_id, "dr-b")


def test_every_phi_read_of_the_report_and_deliveries_is_audited(client, tokens) -> None:
    store = client.app.state.store
    case_id = make_case(store, reviewer="dr-a")
    reviewer = tokens.headers("reviewer", sub="dr-a")
    resp = client.put(f"/cases/{case_id}/report", json=draft_data(), headers=reviewer | FHIR_JSON)
    assert resp.status_code == 200, resp.text
    for path in (f"/cases/{case_id}/report", f"/cases/{case_id}/deliveries"):
        assert client.get(path, headers=reviewer).status_code == 200
    assert client.get("/admin/deliveries", headers=tokens.headers("admin")).status_code == 200
    with store.session() as s:
        rows = s.scalars(select(AuditRow).order_by(AuditRow.id)).all()
        reads = [(r.action, r.agent, r.case_id, r.patient is not None) for r in rows]
    assert ("report.read", "dr-a", case_id, True) in reads
    assert ("deliveries.read", "dr-a", case_id, True) in reads
    assert ("deliveries.read", "tester", None, False) in reads
