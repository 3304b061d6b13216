"""SMART token endpoint hardening (SM-21): the jti replay cache lives in the database (shared by
every process, surviving a restart, exactly one winner under concurrency), and `/auth/token` is
rate limited per address and per client with 429 + Retry-After."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fhir_gateway.app import create_app
from fhir_gateway.security.smart_server import DbReplayCache, RateLimiter
from fhir_gateway.store.models import SmartJti
from tests.api.test_smart_server import CLIENT, ask, assertion, smart_app  # noqa: F401


def test_replay_after_a_restart_is_refused(smart_app) -> None:  # noqa: F811
    client, settings = smart_app
    token = assertion()
    assert ask(client, token).status_code == 200
    # A new gateway process on the same database: the jti is remembered there.
    with TestClient(create_app(settings, configure_logs=False)) as restarted:
        resp = restarted.post("/auth/token", data=_form(token))
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"] == "invalid_client"
        assert "replay" in resp.json()["error_description"]
        assert ask(restarted, assertion()).status_code == 200  # a fresh assertion still works


def _form(token: str) -> dict[str, str]:
    from connectors.smart import CLIENT_ASSERTION_TYPE

    return {
        "grant_type": "client_credentials",
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": token,
        "scope": "system/Task.rs",
    }


def test_concurrent_replay_of_one_assertion_gives_one_token(smart_app) -> None:  # noqa: F811
    client, _ = smart_app
    token = assertion()
    barrier = threading.Barrier(8)
    codes: list[int] = []

    def go() -> None:
        barrier.wait()
        codes.append(client.post("/auth/token", data=_form(token)).status_code)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [200] + [401] * 7


def test_db_replay_cache_one_winner_on_each_engine(store: Any) -> None:
    """Sixteen threads present one (client, jti) at once: exactly one is accepted."""
    cache = DbReplayCache(store)
    exp = time.time() + 240
    barrier = threading.Barrier(16)
    results: list[bool] = []

    def go() -> None:
        barrier.wait()
        results.append(cache.check_and_add(CLIENT, "jti-1", exp, time.time()))

    threads = [threading.Thread(target=go) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(True) == 1
    assert results.count(False) == 15
    assert cache.check_and_add("another-client", "jti-1", exp, time.time())  # per client


def test_expired_jtis_are_purged(store: Any) -> None:
    cache = DbReplayCache(store)
    assert cache.check_and_add(CLIENT, "old", time.time() - 10, time.time())
    assert cache.check_and_add(CLIENT, "new", time.time() + 240, time.time())
    with store.session() as s:
        left = s.scalar(select(func.count()).select_from(SmartJti))
    assert left == 1


def test_burst_of_bad_assertions_gets_429_with_retry_after(smart_app) -> None:  # noqa: F811
    client, settings = smart_app
    burst = settings.auth.token_burst_per_address
    answers = [
        client.post("/auth/token", data=_form(assertion(aud="https://elsewhere.example/t")))
        for _ in range(burst + 30)
    ]
    codes = [r.status_code for r in answers]
    assert set(codes) == {401, 429}
    assert codes.count(401) <= burst + 1  # the bucket refills a little while the test runs
    limited = next(r for r in answers if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "temporarily_unavailable"
    assert limited.headers["cache-control"] == "no-store"


def test_per_client_limit_on_verified_requests(smart_app) -> None:  # noqa: F811
    client, settings = smart_app
    burst = settings.auth.token_burst_per_client
    codes = [ask(client, assertion()).status_code for _ in range(burst + 5)]
    assert codes[:burst] == [200] * burst
    assert 429 in codes[burst:]


def test_rate_limiter_refills_on_its_clock() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert limiter.take("a") is None
    assert limiter.take("a") is None
    wait = limiter.take("a")
    assert wait == pytest.approx(1.0)
    assert limiter.take("b") is None  # keys are separate
    now[0] = 1.0
    assert limiter.take("a") is None
