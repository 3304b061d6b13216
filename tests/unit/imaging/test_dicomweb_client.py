"""connectors.dicomweb request logic (PS3.18 QIDO-RS 10.6, paging, errors, auth) via `responses`."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import requests
import responses

from connectors.dicomweb import DicomwebClient, make_auth
from fhir_gateway.errors import (
    UpstreamNotFoundError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)

BASE = "http://pacs.test/dicom-web"


def study(uid: str) -> dict[str, Any]:
    return {"0020000D": {"vr": "UI", "Value": [uid]}}


def client(**kw) -> DicomwebClient:
    return DicomwebClient(requests.Session(), BASE, page_size=2, **kw)


@responses.activate
def test_query_values_keep_wildcards_and_ranges_unencoded():
    responses.get(f"{BASE}/studies", status=204)
    client().search_studies(
        patient_id="PAT*", issuer_of_patient_id="urn:oid:1.2.3", study_date=("20200101", "")
    )
    url = str(responses.calls[0].request.url)
    assert "PatientID=PAT*" in url
    assert "StudyDate=20200101-" in url
    assert "IssuerOfPatientID=urn:oid:1.2.3" in url
    assert "limit=2" in url
    assert "offset=0" in url


@responses.activate
def test_modalities_comma_list_and_spaces_encoded():
    responses.get(f"{BASE}/studies", status=204)
    client().search_studies(modalities=["CT", "MR"], accession_number="A 1^2")
    url = str(responses.calls[0].request.url)
    assert "ModalitiesInStudy=CT,MR" in url
    # `^` is not a legal URI character: urllib3 encodes it whatever we do (see _QIDO_SAFE).
    assert "AccessionNumber=A%201%5E2" in url


@responses.activate
def test_pages_follow_warning_and_full_pages():
    responses.get(
        f"{BASE}/studies",
        json=[study("1"), study("2")],
        headers={"Warning": '299 pacs: "There are additional results that can be requested"'},
    )
    responses.get(f"{BASE}/studies", json=[study("3"), study("4")])  # full page, no Warning
    responses.get(f"{BASE}/studies", json=[study("5")])
    found = client().search_studies(patient_id="P")
    assert [s["0020000D"]["Value"][0] for s in found] == ["1", "2", "3", "4", "5"]
    offsets = [str(c.request.url).split("offset=")[1].split("&")[0] for c in responses.calls]
    assert offsets == ["0", "2", "4"]


@responses.activate
def test_204_means_no_matches():
    responses.get(f"{BASE}/studies/1.2/series", status=204)
    assert client().search_series("1.2") == []


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (503, UpstreamUnavailableError),
        (429, UpstreamUnavailableError),
        (404, UpstreamNotFoundError),
        (400, UpstreamRejectedError),
        (401, UpstreamRejectedError),
    ],
)
@responses.activate
def test_status_translated(status, error):
    responses.get(f"{BASE}/studies", status=status, headers={"Retry-After": "7"})
    with pytest.raises(error) as info:
        client().search_studies(patient_id="P")
    assert info.value.status == status
    if status in (503, 429):
        assert info.value.retry_after == 7


@responses.activate
def test_connection_error_is_unavailable():
    responses.get(f"{BASE}/studies", body=requests.ConnectionError("refused"))
    with pytest.raises(UpstreamUnavailableError):
        client().search_studies(patient_id="P")


@responses.activate
def test_non_json_answer_rejected():
    responses.get(f"{BASE}/studies", body="<html/>", content_type="text/html")
    with pytest.raises(UpstreamRejectedError, match="not JSON"):
        client().search_studies(patient_id="P")


@responses.activate
def test_auth_kinds():
    responses.get(f"{BASE}/studies", status=204)
    tokens = iter(["t1", "t2"])
    client(auth=make_auth("basic", username="u", password="p")).search_studies()
    client(auth=make_auth("bearer", token="static")).search_studies()
    smart = client(auth=make_auth("smart", token_provider=lambda: next(tokens)))
    smart.search_studies()
    smart.search_studies()
    got = [c.request.headers.get("Authorization") for c in responses.calls]
    assert got == [
        "Basic " + base64.b64encode(b"u:p").decode(),
        "Bearer static",
        "Bearer t1",
        "Bearer t2",
    ]
    assert make_auth("none") is None
    with pytest.raises(ValueError, match="token_provider"):
        make_auth("smart")


@responses.activate
def test_retrieve_non_multipart_rejected(tmp_path):
    responses.get(f"{BASE}/studies/1/series/2", body="{}", content_type="application/json")
    with pytest.raises(UpstreamRejectedError, match="application/json"):
        list(client().retrieve_series("1", "2", tmp_path))


@responses.activate
def test_stow_failed_sop_sequence_rejected():
    responses.post(f"{BASE}/studies", json={"00081198": {"vr": "SQ", "Value": [{}]}})
    with pytest.raises(UpstreamRejectedError, match="STOW"):
        client().store(b"DICM")
    body = responses.calls[0].request.body
    assert isinstance(body, bytes)
    assert body.startswith(b"--fhir-gateway-stow-")
    assert b"Content-Type: application/dicom\r\n\r\nDICM\r\n" in body
