"""Retry, Retry-After and error translation in connectors/_http.py (RS-09, RS-40, RS-41)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests
import responses

from connectors._http import Http, RetryPolicy, is_idempotent, parse_retry_after
from fhir_gateway.errors import (
    UpstreamNotFoundError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)

URL = "https://ehr.example.org/fhir/Observation"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def outcome(code: str, text: str) -> dict[str, object]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


def make_http(**policy: float) -> tuple[Http, list[float]]:
    sleeps: list[float] = []
    http = Http(
        requests.Session(),
        system="ehr",
        timeout_s=3,
        retry=RetryPolicy(**policy),  # type: ignore[arg-type]
        sleep=sleeps.append,
        wall_clock=lambda: NOW,
        rand=lambda: 1.0,
    )
    return http, sleeps


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", NOW) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", NOW) == 0.0  # in the past
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("", NOW) is None


@responses.activate
def test_429_with_seconds_then_date_honoured():
    responses.get(URL, status=429, headers={"Retry-After": "7"}, json=outcome("throttled", "x"))
    responses.get(
        URL, status=503, headers={"Retry-After": "Thu, 01 Jan 2026 12:00:02 GMT"}, body="busy"
    )
    responses.get(URL, json={"resourceType": "Bundle"})
    http, sleeps = make_http()
    assert http.request("GET", URL).json() == {"resourceType": "Bundle"}
    assert sleeps == [7.0, 2.0]
    assert all(c.request.req_kwargs["timeout"] == 3 for c in responses.calls)  # type: ignore[attr-defined]


@responses.activate
def test_5xx_without_retry_after_backs_off_exponentially_then_gives_up():
    for _ in range(4):
        responses.get(URL, status=500, json=outcome("exception", "database down"))
    http, sleeps = make_http(max_attempts=4, backoff_base_s=1.0)
    with pytest.raises(UpstreamUnavailableError, match=r"HTTP 500.*database down") as caught:
        http.request("GET", URL)
    assert sleeps == [1.0, 2.0, 4.0]  # rand=1.0: the top of each jitter window
    assert len(responses.calls) == 4
    assert caught.value.status == 500
    assert caught.value.outcome is not None


@responses.activate
def test_jitter_stays_within_half_to_full_window():
    for _ in range(3):
        responses.get(URL, status=502, body="bad gateway")
    responses.get(URL, json={"resourceType": "Bundle"})
    sleeps: list[float] = []
    http = Http(
        requests.Session(),
        retry=RetryPolicy(backoff_base_s=2.0),
        sleep=sleeps.append,
        rand=lambda: 0.0,
    )
    http.request("GET", URL)
    assert sleeps == [1.0, 2.0, 4.0]


@responses.activate
def test_total_wait_capped():
    for _ in range(5):
        responses.get(URL, status=429, headers={"Retry-After": "30"})
    http, sleeps = make_http(max_total_wait_s=70)
    with pytest.raises(UpstreamUnavailableError) as caught:
        http.request("GET", URL)
    assert sleeps == [30.0, 30.0]
    assert caught.value.retry_after == 30.0


@responses.activate
def test_plain_post_never_retried_but_conditional_create_is():
    responses.post(URL, status=503)
    http, sleeps = make_http()
    with pytest.raises(UpstreamUnavailableError):
        http.request("POST", URL, json={"resourceType": "Observation"})
    assert sleeps == []
    responses.post(URL, status=503)
    responses.post(URL, status=201, json={"resourceType": "Observation", "id": "1"})
    got = http.request("POST", URL, headers={"If-None-Exist": "identifier=a|b"}, json={})
    assert got.status_code == 201
    assert len(sleeps) == 1


def test_idempotency_table():
    assert is_idempotent("GET", URL, None)
    assert is_idempotent("PUT", URL, None)
    assert is_idempotent("POST", URL + "/_search", None)
    assert is_idempotent("POST", URL, {"if-none-exist": "x=y"})
    assert not is_idempotent("POST", URL, {})
    assert not is_idempotent("PATCH", URL, None)


@responses.activate
def test_status_table_and_non_fhir_bodies():
    responses.get(URL + "/404", status=404, json=outcome("not-found", "no such thing"))
    responses.get(URL + "/410", status=410, body="<html>gone</html>", content_type="text/html")
    responses.get(URL + "/400", status=400, json=outcome("invalid", "bad param"))
    responses.get(URL + "/401", status=401, json={"error": "invalid_token"})
    http, sleeps = make_http()
    with pytest.raises(UpstreamNotFoundError, match="no such thing"):
        http.request("GET", URL + "/404")
    with pytest.raises(UpstreamNotFoundError, match=r"HTTP 410: non-FHIR body \(text/html\)"):
        http.request("GET", URL + "/410")
    with pytest.raises(UpstreamRejectedError, match=r"\[invalid\] bad param") as caught:
        http.request("GET", URL + "/400")
    assert not isinstance(caught.value, UpstreamUnavailableError)
    with pytest.raises(UpstreamRejectedError, match="error=invalid_token"):
        http.request("GET", URL + "/401")
    assert sleeps == []


@responses.activate
def test_connection_errors_and_timeouts_are_unavailable_and_retried():
    responses.get(URL, body=requests.ConnectionError("refused"))
    responses.get(URL, body=requests.Timeout("slow"))
    responses.get(URL, json={"resourceType": "Bundle"})
    http, sleeps = make_http()
    assert http.request("GET", URL).status_code == 200
    assert len(sleeps) == 2
    responses.get(URL + "/down", body=requests.ConnectionError("refused"))
    http, _ = make_http(max_attempts=1)
    with pytest.raises(UpstreamUnavailableError, match="could not connect"):
        http.request("GET", URL + "/down")


@responses.activate
def test_accept_status_returns_instead_of_raising():
    responses.post(URL, status=400, json={"error": "invalid_client"})
    http, _ = make_http()
    assert http.request("POST", URL, accept_status=(400,)).status_code == 400
