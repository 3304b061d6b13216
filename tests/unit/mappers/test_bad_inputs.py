"""Every file of fixtures/bad/ -> an InputError with a clear reason; no entity expanded, no
network (sockets are blocked while mapping)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fhir_gateway.errors import InputError
from mappers.detect import map_document
from tests.unit.mappers._helpers import bad_files, fixture_id


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a mapper tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("path", bad_files(), ids=fixture_id)
def test_bad_file_gives_clear_input_error(path: Path) -> None:
    with pytest.raises(InputError) as caught:
        map_document(path.read_bytes(), path.name, "bad-source")
    message = caught.value.message
    assert 10 < len(message) < 300
    assert "\n" not in message
    assert "Traceback" not in message
    assert "root:" not in message  # /etc/passwd content of an expanded XXE entity


def test_billion_laughs_is_refused_without_expansion() -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&lol3;</title></ClinicalDocument>'
    )
    with pytest.raises(InputError, match="DOCTYPE"):
        map_document(laughs, "lol.xml", "x")


def test_entity_in_ccda_without_doctype_is_not_expanded() -> None:
    from mappers._xml import parse_xml

    with pytest.raises(InputError, match="not well-formed XML"):
        parse_xml(b'<ClinicalDocument xmlns="urn:hl7-org:v3">&xxe;</ClinicalDocument>', "ccda")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "unrecognised format"),
        (b"hello", "unrecognised format"),
        (
            b'<Patient xmlns="http://hl7.org/fhir"><id value="1"/></Patient>',
            "FHIR XML not supported",
        ),
        (b"<foo/>", "neither C-CDA nor FHIR"),
        (b"[1, 2]", "unrecognised format"),
        (b'{"resourceType": "Patient", "gender": "martian"}', "not a valid code"),
        (
            b'{"resourceType": "Observation", "subject": {"reference": "Bogus/1"}}',
            "unknown resource",
        ),
        (b"MSH|^~\\&|a\rnot a segment", "not an HL7 v2 segment"),
        (b'<ClinicalDocument xmlns="urn:hl7-org:v3"/>', "recordTarget"),
    ],
)
def test_small_bad_inputs(data: bytes, reason: str) -> None:
    with pytest.raises(InputError, match=reason):
        map_document(data, "in", "src")
