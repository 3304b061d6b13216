"""FhirEhrClient logic with `responses`: paging, POST search, partial results, 401 renewal."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
import responses

from connectors._http import Http, RetryPolicy
from connectors.fhir_client import FhirEhrClient
from fhir_gateway.errors import UpstreamRejectedError

BASE = "https://ehr.example.org/fhir"


def bundle(
    *resources: dict[str, Any],
    next_url: str | None = None,
    extra_entries: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
    total: int | None = None,
) -> dict[str, Any]:
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    links: list[dict[str, str]] = [{"relation": "self", "url": "x"}]
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries + list(extra_entries),
    }
    if next_url:
        links.append({"relation": "next", "url": next_url})
    if total is not None:
        out["total"] = total
    return out


def obs(i: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": str(i)}


class FakeTokens:
    def __init__(self) -> None:
        self.issued = 0

    def token(self) -> str:
        return f"t{self.issued}"

    def invalidate(self) -> None:
        self.issued += 1

    def auth(self) -> requests.auth.AuthBase:
        tokens = self

        class Auth(requests.auth.AuthBase):
            def __call__(self, r):
                r.headers["Authorization"] = f"Bearer {tokens.token()}"
                return r

        return Auth()


def client(tokens: FakeTokens | None = None) -> FhirEhrClient:
    http = Http(requests.Session(), system="ehr", retry=RetryPolicy(max_attempts=1))
    return FhirEhrClient(http, BASE, tokens=tokens)


@responses.activate
def test_rs20_follows_opaque_next_links_and_counts_only_matches():
    responses.get(
        f"{BASE}/Observation",
        json=bundle(
            obs(1),
            obs(2),
            next_url=f"{BASE}?_getpages=abc&_x=1",
            extra_entries=[
                {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}}
            ],
        ),
    )
    responses.get(f"{BASE}?_getpages=abc&_x=1", json=bundle(obs(3), next_url="/fhir/page/zz"))
    responses.get("https://ehr.example.org/fhir/page/zz", json=bundle(obs(4), total=4))
    result = client().search("Observation", {"patient": "Patient/p", "_count": "2"})
    assert [r["id"] for r in result.resources] == ["1", "2", "3", "4"]
    assert [r["id"] for r in result.included] == ["p"]
    assert result.pages == 3
    assert not result.partial
    first = responses.calls[0].request
    assert parse_qs(str(first.url).split("?", 1)[1]) == {"patient": ["Patient/p"], "_count": ["2"]}
    assert all(c.request.headers["Accept"] == "application/fhir+json" for c in responses.calls)


@responses.activate
def test_paging_loop_is_detected_and_names_the_url():
    responses.get(f"{BASE}/Observation", json=bundle(obs(1), next_url=f"{BASE}?p=2"))
    responses.get(f"{BASE}?p=2", json=bundle(obs(2), next_url=f"{BASE}?p=3"))
    responses.get(f"{BASE}?p=3", json=bundle(obs(3), next_url=f"{BASE}?p=2"))
    with pytest.raises(UpstreamRejectedError, match=r"paging loop.*\?p=2") as caught:
        client().search("Observation")
    assert caught.value.url == f"{BASE}?p=2"
    assert len(responses.calls) == 3


@responses.activate
def test_rs22_long_query_goes_as_post_search():
    responses.post(f"{BASE}/Observation/_search", json=bundle(obs(1)))
    codes = ",".join(f"http://loinc.org|{n}-1" for n in range(10000, 10100))
    result = client().search("Observation", {"code": codes, "patient": "Patient/1"})
    assert len(result.resources) == 1
    request = responses.calls[0].request
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(str(request.body))["code"] == [codes]


@responses.activate
def test_sm14_withheld_outcome_marks_result_partial():
    withheld = {
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "suppressed", "diagnostics": "policy"}],
        },
        "search": {"mode": "outcome"},
    }
    responses.get(f"{BASE}/Observation", json=bundle(obs(1), extra_entries=[withheld]))
    result = client().search("Observation")
    assert result.partial
    assert len(result.resources) == 1
    assert result.issues[0]["code"] == "suppressed"


@responses.activate
def test_sm10_401_renews_token_once_then_gives_up():
    responses.get(f"{BASE}/Patient/1", status=401, json={"resourceType": "OperationOutcome"})
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    tokens = FakeTokens()
    assert client(tokens).read("Patient", "1")["id"] == "1"
    sent = [c.request.headers["Authorization"] for c in responses.calls]
    assert sent == ["Bearer t0", "Bearer t1"]
    responses.get(f"{BASE}/Patient/2", status=401)
    responses.get(f"{BASE}/Patient/2", status=401)
    with pytest.raises(UpstreamRejectedError) as caught:
        client(tokens).read("Patient", "2")
    assert caught.value.status == 401
    assert tokens.issued == 2


@responses.activate
def test_non_bundle_search_response_is_a_typed_error():
    responses.get(f"{BASE}/Observation", json={"resourceType": "Patient", "id": "x"})
    with pytest.raises(UpstreamRejectedError, match="not a Bundle"):
        client().search("Observation")
    responses.get(f"{BASE}/metadata", body="<html/>")
    with pytest.raises(UpstreamRejectedError, match="not JSON"):
        client().capabilities()


@responses.activate
def test_binary_streamed_to_content_addressed_file(tmp_path: Path):
    responses.get(f"{BASE}/Binary/b1", body=b"%PDF-1.4 test", content_type="application/pdf")
    got = client().fetch_binary("Binary/b1", tmp_path, "application/pdf")
    assert got.path.read_bytes() == b"%PDF-1.4 test"
    assert got.path.name == got.sha256
    assert got.size == 13
    assert got.content_type == "application/pdf"
    assert responses.calls[0].request.headers["Accept"].startswith("application/pdf")
    assert [p.name for p in tmp_path.iterdir()] == [got.sha256]  # no temp file left


def test_binary_on_another_server_is_refused(tmp_path: Path):
    with pytest.raises(UpstreamRejectedError, match="another server"):
        client().fetch_binary("https://evil.example.com/fhir/Binary/1", tmp_path)
