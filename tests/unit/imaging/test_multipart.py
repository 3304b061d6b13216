"""Multipart/related stream reader (RFC 2046 5.1): crafted streams, random chunk splits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.multipart import (
    PartData,
    PartEnd,
    PartStart,
    PartTruncated,
    boundary_of,
    iter_events,
)
from fhir_gateway.errors import ParseError

B = b"xYz-boundary.123"


def body(
    parts: list[bytes], nl: bytes = b"\r\n", preamble: bytes = b"", epilogue: bytes = b""
) -> bytes:
    out = preamble
    for p in parts:
        out += b"--" + B + nl + b"Content-Type: application/dicom" + nl + nl + p + nl
    return out + b"--" + B + b"--" + nl + epilogue


def collect(chunks: list[bytes]) -> list[tuple[dict[str, str], bytes, bool]]:
    """(headers, body, complete) per part."""
    out: list[tuple[dict[str, str], bytes, bool]] = []
    headers: dict[str, str] = {}
    data = b""
    for ev in iter_events(chunks, B):
        if isinstance(ev, PartStart):
            headers, data = ev.headers, b""
        elif isinstance(ev, PartData):
            data += ev.data
        elif isinstance(ev, PartEnd):
            out.append((headers, data, True))
        elif isinstance(ev, PartTruncated):
            out.append((headers, data, False))
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


PAYLOADS = [
    b"",
    b"\r\n",
    b"--" + B[:-1],
    b"\n--" + B[:5] + b"\r",
    b"DICM" * 50,
    bytes(range(256)) * 3,
]


def test_parts_with_headers_crlf():
    parts = collect([body([b"one", b"two\r\nlines"])])
    assert [(h["content-type"], d, ok) for h, d, ok in parts] == [
        ("application/dicom", b"one", True),
        ("application/dicom", b"two\r\nlines", True),
    ]


def test_preamble_lf_and_epilogue_are_tolerated():
    raw = body([b"a", b"b"], nl=b"\n", preamble=b"this is a preamble\r\n", epilogue=b"bye")
    assert [d for _, d, _ in collect([raw])] == [b"a", b"b"]


def test_part_without_headers():
    raw = b"--" + B + b"\r\n\r\nraw\r\n--" + B + b"--\r\n"
    assert collect([raw]) == [({}, b"raw", True)]


def test_transport_padding_after_delimiter():
    raw = b"--" + B + b"  \t\r\nContent-Type: x\r\n\r\nv\r\n--" + B + b"--"
    assert collect([raw]) == [({"content-type": "x"}, b"v", True)]


def test_stream_cut_inside_a_part_truncates_only_that_part():
    raw = body([b"first", b"second-complete"])
    cut = raw[: raw.index(b"second") + 3]
    parts = collect([cut])
    assert parts[0] == ({"content-type": "application/dicom"}, b"first", True)
    assert parts[1][2] is False
    assert len(parts) == 2


def test_no_delimiter_at_all_is_a_parse_error():
    with pytest.raises(ParseError):
        collect([b"<html>oops</html>"])


def test_boundary_of_content_type():
    assert boundary_of('multipart/related; type="application/dicom"; boundary="a b"') == b"a b"
    assert boundary_of("multipart/related; boundary=abc") == b"abc"
    with pytest.raises(ParseError):
        boundary_of("application/dicom")


@settings(max_examples=300, deadline=None)
@given(
    payloads=st.lists(
        st.one_of(st.sampled_from(PAYLOADS), st.binary(max_size=300)), min_size=1, max_size=5
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    nl=st.sampled_from([b"\r\n", b"\n"]),
)
def test_random_chunk_splits_give_the_same_parts(payloads, cuts, nl):
    # Payloads never contain the real delimiter (the sender's boundary guarantees it).
    payloads = [p for p in payloads if b"\n--" + B not in p + nl and not p.endswith(b"\r")]
    raw = body(payloads, nl=nl, preamble=b"pre\r\n")
    expected = collect([raw])
    assert [d for _, d, _ in expected] == payloads
    assert collect(split(raw, cuts)) == expected
    assert collect([bytes([b]) for b in raw]) == expected
