"""WADO-RS multipart on the wire (pytest-httpserver): bad parts are rejected one by one."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from connectors.dicomweb import DicomwebClient, RejectedPart, Retrieved, RetrievedInstance
from fhir_gateway.errors import UpstreamRejectedError

DICOM = Path(__file__).resolve().parents[3] / "fixtures" / "dicom"
CT = sorted((DICOM / "series_77654033_CT2").glob("*.dcm"))
BOUNDARY = "wire-test-boundary"


def multipart(parts: list[bytes], close: bool = True) -> bytes:
    out = b"preamble\r\n"
    for i, p in enumerate(parts):
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode()
        out += f"Content-Location: /studies/s/series/x/instances/part{i}\r\n\r\n".encode()
        out += p + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def serve(httpserver: HTTPServer, body: bytes, chunk: int = 777) -> None:
    def handler(_req: Request) -> Response:
        gen = (body[i : i + chunk] for i in range(0, len(body), chunk))  # chunked transfer
        return Response(
            gen,
            content_type=f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
        )

    httpserver.expect_request("/dicom-web/studies/s/series/x").respond_with_handler(handler)


def fetch(httpserver: HTTPServer, tmp_path: Path) -> list[Retrieved]:
    client = DicomwebClient(requests.Session(), httpserver.url_for("/dicom-web"))
    return list(client.retrieve_series("s", "x", tmp_path / "staging"))


def test_truncated_and_header_less_parts_rejected_for_that_instance_only(httpserver, tmp_path):
    good = [p.read_bytes() for p in CT]
    header_less = (DICOM / "bad" / "no_meta.dcm").read_bytes()
    truncated = good[1][: len(good[1]) // 2 | 1]  # odd: mid-element
    serve(httpserver, multipart([good[0], header_less, truncated, good[2], good[3]]))
    results = fetch(httpserver, tmp_path)
    kept = [r for r in results if isinstance(r, RetrievedInstance)]
    rejected = [r for r in results if isinstance(r, RejectedPart)]
    assert [k.path.read_bytes() for k in kept] == [good[0], good[2], good[3]]
    assert [r.sop_uid for r in rejected] == ["part1", "part2"]
    assert "no preamble/DICM" in rejected[0].reason
    assert "truncated" in rejected[1].reason
    # Rejected parts leave no temp file behind.
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == sorted(
        k.path.name for k in kept
    )


def test_stream_cut_mid_part_keeps_earlier_instances(httpserver, tmp_path):
    good = [p.read_bytes() for p in CT]
    body = multipart(good[:2], close=False)
    serve(httpserver, body[: len(body) - 1500])  # the server stops in the middle of part 2
    results = fetch(httpserver, tmp_path)
    assert isinstance(results[0], RetrievedInstance)
    assert results[0].path.read_bytes() == good[0]
    assert isinstance(results[1], RejectedPart)
    assert "stream ended" in results[1].reason
    assert len(results) == 2


def test_body_that_is_not_multipart_is_rejected(httpserver, tmp_path):
    serve(httpserver, b"<html>proxy error page</html>")
    with pytest.raises(UpstreamRejectedError, match="multipart unreadable"):
        fetch(httpserver, tmp_path)
