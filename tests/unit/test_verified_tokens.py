"""Verified tokens and session cookies are remembered until they expire, and never longer; the
one-query access check of the hot read paths (`access.case_patient`) decides exactly as
`access.get_case` does, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from fhir_gateway.errors import AuthError, ForbiddenError, NotFoundError
from fhir_gateway.security import access, sessions
from fhir_gateway.security.access import Principal
from fhir_gateway.security.auth import (
    SESSION_KEY_FILE,
    TokenValidator,
    VerifiedCache,
    mint_dev_token,
)
from fhir_gateway.settings import AuthSettings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Assignment, utcnow
from tests.conftest import add_case


def _wait_past(exp: float) -> None:
    while time.time() <= exp + 0.05:
        time.sleep(0.05)


def test_a_verified_token_is_not_verified_again(tmp_path: Path, monkeypatch) -> None:
    v = TokenValidator(AuthSettings(), tmp_path)
    token = mint_dev_token(tmp_path, role="reviewer", sub="alice")
    calls: list[str] = []
    verify = v._verify

    def counting(t: str) -> tuple[Principal, float]:
        calls.append(t)
        return verify(t)

    monkeypatch.setattr(v, "_verify", counting)
    first = v.validate(token)
    assert v.cached(token) == first
    assert v.validate(token) == first
    assert len(calls) == 1
    other = mint_dev_token(tmp_path, role="reviewer", sub="bob")
    assert v.cached(other) is None  # keyed by the exact token
    assert v.validate(other).sub == "bob"
    assert len(calls) == 2


def test_a_remembered_token_expires_with_its_exp(tmp_path: Path) -> None:
    v = TokenValidator(AuthSettings(), tmp_path)
    token = mint_dev_token(tmp_path, role="admin", sub="x", ttl_s=2)
    assert v.validate(token).role == "admin"
    assert v.cached(token) is not None
    _wait_past(time.time() + 2)
    assert v.cached(token) is None
    with pytest.raises(AuthError, match="expired"):
        v.validate(token)


def test_refused_tokens_are_not_remembered(tmp_path: Path) -> None:
    v = TokenValidator(AuthSettings(), tmp_path)
    expired = mint_dev_token(tmp_path, role="admin", sub="x", ttl_s=-5)
    for _ in range(2):
        with pytest.raises(AuthError, match="expired"):
            v.validate(expired)
    assert v.cached(expired) is None
    other_issuer = mint_dev_token(tmp_path / "elsewhere", role="admin", sub="x")
    with pytest.raises(AuthError):
        v.validate(other_issuer)  # signed with another dev key
    assert v.cached(other_issuer) is None


def test_cache_keeps_an_entry_at_most_max_age() -> None:
    cache = VerifiedCache(maxsize=2, max_age_s=0.2)
    cache.put("t", time.time() + 3600, "who")
    assert cache.get("t") == "who"
    time.sleep(0.3)
    assert cache.get("t") is None  # re-verified (the issuer's keys re-read) after max_age
    cache.put("old", time.time() - 1, "who")
    assert cache.get("old") is None  # never stored past its exp
    for i in range(3):
        cache.put(f"k{i}", time.time() + 60, i)
    assert cache.get("k0") is None  # bounded: the oldest went
    assert cache.get("k2") == 2


def test_session_cookies_are_remembered_until_the_key_changes(tmp_path: Path) -> None:
    who = Principal(sub="alice", role="reviewer")
    cookie = sessions.issue(tmp_path, who, lifetime_s=600, secure=False).value
    assert sessions.cached(tmp_path, cookie) is None
    assert sessions.read(tmp_path, cookie) == who
    assert sessions.cached(tmp_path, cookie) == who
    # A replaced session key refuses cookies signed with the old one at once.
    key_file = tmp_path / SESSION_KEY_FILE
    key_file.unlink()
    key_file.write_text("ab" * 32)
    assert sessions.cached(tmp_path, cookie) is None
    with pytest.raises(AuthError, match="session cookie rejected"):
        sessions.read(tmp_path, cookie)


def test_an_expired_session_cookie_is_refused_after_being_remembered(tmp_path: Path) -> None:
    who = Principal(sub="alice", role="reviewer")
    issued = time.time()
    cookie = sessions.issue(tmp_path, who, lifetime_s=2, secure=False).value
    assert sessions.read(tmp_path, cookie) == who
    _wait_past(int(issued) + 2)
    assert sessions.cached(tmp_path, cookie) is None
    with pytest.raises(AuthError, match="expired"):
        sessions.read(tmp_path, cookie)


def _decision(fn, store: Store, case_id: str, who: Principal) -> str:
    try:
        with store.session(readonly=True) as s:
            out = fn(s, case_id, who)
    except NotFoundError:
        return "404"
    except ForbiddenError:
        return "403"
    return out if isinstance(out, str) else out.patient_ref


def test_case_patient_decides_as_get_case(store: Store) -> None:
    add_case(store, "c1", "Patient/p1", partner_id="p1")
    add_case(store, "c2", "Patient/p2", partner_id="p2")
    now = utcnow()
    with store.session() as s:
        s.add(Assignment(case_id="c1", reviewer="alice", assigned_by="adm"))
        s.add(
            Assignment(
                case_id="c1", reviewer="bob", assigned_by="adm", expires_at=now - timedelta(1)
            )
        )
        s.add(
            Assignment(
                case_id="c2", reviewer="bob", assigned_by="adm", expires_at=now + timedelta(1)
            )
        )
    callers = [
        Principal("adm", "admin"),
        Principal("alice", "reviewer"),
        Principal("bob", "reviewer"),
        Principal("carol", "reviewer"),
        Principal("epic", "ehr", partner_id="p1"),
        Principal("epic", "ehr", partner_id="p2"),
        Principal("epic", "ehr"),
        Principal("someone", "auditor"),
    ]
    seen = set()
    for who in callers:
        for case_id in ("c1", "c2", "nope"):
            expected = _decision(access.get_case, store, case_id, who)
            assert _decision(access.case_patient, store, case_id, who) == expected, (who, case_id)
            seen.add(expected)
    assert seen == {"Patient/p1", "Patient/p2", "403", "404"}
    # Spot checks of the rule itself.
    assert _decision(access.case_patient, store, "c1", Principal("bob", "reviewer")) == "403"
    assert _decision(access.case_patient, store, "c2", Principal("bob", "reviewer")) == "Patient/p2"
