"""mappers.content: a document's real kind from its bytes, and declared-type mismatches."""

from __future__ import annotations

from pathlib import Path

import pytest

from mappers.content import ContentKind, content_kind, identify, normalise_media_type

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"

K = ContentKind


def read(rel: str) -> bytes:
    return (FIXTURES / rel).read_bytes()


@pytest.mark.parametrize(
    ("rel", "kind"),
    [
        ("pdf/text-report.pdf", K.PDF),
        ("pdf/scanned-report.pdf", K.PDF),
        ("ccda/C-CDA_R2-1_CCD.xml", K.CCDA),
        ("ccda/170.314B2_Amb_CCD.xml", K.CCDA),
        ("ccda/Diagnostic_Imaging_Report.xml", K.CCDA),
        ("hl7v2/ORU-R01-01.hl7", K.HL7V2),
        ("hl7v2/LAB-ORU-1.hl7", K.HL7V2),
        ("hl7v2/segmentfinder_a24_custom_delimiters.hl7", K.HL7V2),
        ("fhir/observation-example-f001-glucose.json", K.FHIR_JSON),
        ("fhir/colon_Darin_Skiles.json", K.FHIR_JSON),
        ("fhir/10pt_Patient.000.ndjson", K.FHIR_NDJSON),
        ("dicom/ct/CT_small.dcm", K.DICOM),
        ("bad/fhir/list-bad-syntax.xml", K.XML),
    ],
)
def test_fixture_kinds(rel, kind):
    assert content_kind(read(rel))[0] is kind


def test_every_v2_fixture_is_er7():
    for path in sorted((FIXTURES / "hl7v2").glob("*.hl7")):
        assert content_kind(path.read_bytes())[0] is K.HL7V2, path.name


def test_every_ccda_fixture_is_ccda():
    for path in sorted((FIXTURES / "ccda").glob("*.xml")):
        assert content_kind(path.read_bytes()) == (K.CCDA, "ClinicalDocument"), path.name


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\xef\xbb\xbfMSH|^~\\&|LAB|H|GW|X|20260101||ORU^R01|1|P|2.5.1\r", K.HL7V2),
        (b"\x0bMSH|^~\\&|A|B|C|D|20260101||ADT^A01|9|P|2.3\r\x1c\r", K.HL7V2),  # MLLP-framed
        (b"FHS|^~\\&|A|B\rBHS|^~\\&\rMSH|^~\\&|A\r", K.HL7V2),  # batch file
        (b"MSHALLOW is not a segment", K.TEXT),
        (b'{"resourceType":"Patient","id":"p1"}', K.FHIR_JSON),
        (
            b'{"resourceType":"Patient","id":"a"}\r\n{"resourceType":"Patient","id":"b"}\r\n',
            K.FHIR_NDJSON,
        ),
        (b'{"resourceType":"Patient","id":"a"}\n\n', K.FHIR_JSON),  # one line is one resource
        (b'{"patient": "not FHIR"}', K.TEXT),
        (b'{"resourceType": "Patient", ', K.TEXT),  # broken JSON is text, not FHIR
        (b'{"resourceType":"Patient"}\n{"no":"type"}\n', K.TEXT),
        ('<ClinicalDocument xmlns="urn:hl7-org:v3"/>'.encode("utf-16"), K.CCDA),
        (b'<?xml version="1.0"?>\n<ClinicalDocument xmlns="urn:hl7-org:v3"><id/>', K.CCDA),
        (b"<ClinicalDocument><id/></ClinicalDocument>", K.XML),  # no CDA namespace
        (b'<Patient xmlns="http://hl7.org/fhir"/>', K.XML),
        (b"<not xml at all", K.TEXT),
        (b"Pathology report\nFinal diagnosis: adenocarcinoma\n", K.TEXT),
        ("Résumé clinique, 8-bit".encode("cp1252"), K.TEXT),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", K.UNKNOWN),
        (b"PK\x03\x04\x14\x00\x00\x00", K.UNKNOWN),
        (b"", K.UNKNOWN),
        (b"garbage" * 3 + b"%PDF-1.7\n", K.PDF),  # readers accept junk before the header
        (b"\x00" * 128 + b"DICM" + b"\x02\x00", K.DICOM),
    ],
)
def test_kind_from_bytes(data, kind):
    assert content_kind(data)[0] is kind


def test_xml_with_entities_is_identified_without_expanding_them():
    data = (
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<ClinicalDocument xmlns="urn:hl7-org:v3">&x;</ClinicalDocument>'
    )
    assert content_kind(data)[0] is K.CCDA
    assert content_kind(read("bad/fhir/list-xhtml-xxe1.xml"))[0] is K.XML


@pytest.mark.parametrize(
    ("rel", "declared", "kind", "mismatch"),
    [
        ("pdf/text-report.pdf", "application/pdf", K.PDF, False),
        ("pdf/text-report.pdf", "text/plain", K.PDF, True),
        ("ccda/CCD_2.xml", "application/pdf", K.CCDA, True),  # a CDA sent as "PDF"
        ("ccda/CCD_2.xml", "text/xml", K.CCDA, False),
        ("ccda/CCD_2.xml", "application/cda+xml", K.CCDA, False),
        ("hl7v2/ORU-R01-01.hl7", "text/plain", K.HL7V2, True),
        ("hl7v2/ORU-R01-01.hl7", "x-application/hl7-v2+er7", K.HL7V2, False),
        ("fhir/observation-example-f001-glucose.json", "application/pdf", K.FHIR_JSON, True),
        ("fhir/observation-example-f001-glucose.json", "application/json", K.FHIR_JSON, False),
        ("fhir/10pt_Patient.000.ndjson", "application/fhir+json", K.FHIR_NDJSON, True),
        ("fhir/10pt_Patient.000.ndjson", "application/fhir+ndjson", K.FHIR_NDJSON, False),
        ("dicom/ct/CT_small.dcm", "application/octet-stream", K.DICOM, False),  # says nothing
        ("dicom/ct/CT_small.dcm", "image/jpeg", K.DICOM, False),  # unknown type: no claim
        ("dicom/ct/CT_small.dcm", "application/pdf", K.DICOM, True),
        ("pdf/scanned-report.pdf", "application/dicom", K.PDF, True),
        ("bad/fhir/list-bad-syntax.xml", "application/cda+xml", K.XML, True),
    ],
)
def test_declared_type_mismatch(rel, declared, kind, mismatch):
    found = identify(read(rel), declared)
    assert (found.kind, found.mismatch) == (kind, mismatch)
    assert found.declared_type == normalise_media_type(declared)


def test_identify_without_declared_type_and_media_types():
    found = identify(read("ccda/CCD_2.xml"))
    assert (found.declared_type, found.mismatch, found.media_type) == (
        "",
        False,
        "application/cda+xml",
    )
    assert identify(b"%PDF-1.4", "Application/PDF; name=r.pdf").declared_type == "application/pdf"
