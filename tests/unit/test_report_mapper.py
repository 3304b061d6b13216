"""mappers.report: US Core DR Note (UC-01, RF-20..RF-24), R4B validation, PDF, determinism."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.practitioner import Practitioner
from fhir.resources.R4B.provenance import Provenance

from fhir_gateway.errors import ConfigError, MappingError, ValidationError
from fhir_gateway.reports import fonts as font_lookup
from fhir_gateway.reports.fonts import find_report_fonts
from mappers.report import (
    US_CORE_DR_NOTE,
    draft_to_report,
    npi_is_valid,
    parse_draft,
    report_document_reference,
    report_transaction,
)
from mappers.report_pdf import PdfFonts
from tests.report_helpers import (
    EHR,
    UNICODE_NAMES,
    context,
    draft_data,
    page1_dark_pixels,
    pdf_text,
    report_fonts,
)

KINDS = {
    "pathology": ("LP7839-6", "11526-1"),
    "radiology": ("LP29684-5", "18748-4"),
    "oncology-consultation": ("clinical-note", "11488-4"),
}
STATUSES = ["final", "amended", "corrected", "entered-in-error"]


@pytest.fixture(scope="module")
def fonts() -> PdfFonts:
    return report_fonts()


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_report_validates_as_r4b_for_every_kind_and_status(kind, status, fonts):
    """UC-01 / RF-22: category, code, status and the contained findings validate."""
    out = draft_to_report(parse_draft(draft_data(kind)), context(), status=status, fonts=fonts)
    dr = out.diagnostic_report
    DiagnosticReport.model_validate(dr)
    category, code = KINDS[kind]
    assert dr["status"] == status
    assert dr["meta"]["profile"] == [US_CORE_DR_NOTE]
    assert dr["category"][0]["coding"][0]["code"] == category
    assert dr["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": code,
        "display": dr["code"]["coding"][0]["display"],
    }
    assert {o["status"] for o in out.observations} == {status}
    for obs in out.observations:
        Observation.model_validate(obs)
    Practitioner.model_validate(out.practitioner)
    Provenance.model_validate(out.provenance)


def test_report_links_referral_subject_reviewer_and_results(fonts):
    """RF-20 basedOn absolute, subject, performer/resultsInterpreter, result, stable identifier."""
    out = draft_to_report(parse_draft(draft_data()), context(), status="final", fonts=fonts)
    dr = out.diagnostic_report
    assert dr["basedOn"] == [{"reference": f"{EHR}/ServiceRequest/sr-1"}]
    assert dr["subject"] == {"reference": f"{EHR}/Patient/p-1"}
    assert dr["identifier"][0]["system"] == "urn:fhir-gateway:report"
    assert dr["identifier"][0]["value"] == "case-1"
    assert out.identifier_token == "urn:fhir-gateway:report|case-1"
    assert dr["effectiveDateTime"] == "2026-03-03T09:00:00+00:00"
    assert dr["issued"] == "2026-03-04T10:30:00+00:00"
    contained = {c["id"]: c for c in dr["contained"]}
    assert dr["resultsInterpreter"][0]["reference"] == "#reviewer"
    assert contained["reviewer"]["identifier"][0] == {
        "system": "http://hl7.org/fhir/sid/us-npi",
        "value": "1234567893",
    }
    assert dr["performer"][1]["identifier"] == {"system": "urn:fhir-gateway", "value": "gateway"}
    results = [r["reference"].lstrip("#") for r in dr["result"]]
    assert len(results) == 5
    assert all(contained[r]["resourceType"] == "Observation" for r in results)
    assert dr["conclusion"].startswith("Invasive ductal carcinoma")
    assert dr["conclusionCode"][0]["coding"][0]["code"] == "408643008"


def test_findings_follow_mcode_shapes_and_resolve_case_references(fonts):
    out = draft_to_report(parse_draft(draft_data()), context(), status="final", fonts=fonts)
    by_code = {o["code"]["coding"][0]["code"]: o for o in out.observations}
    histology = by_code["31206-6"]
    assert histology["focus"] == [{"reference": f"{EHR}/Condition/primary-1"}]
    assert histology["valueCodeableConcept"]["coding"][0]["code"] == "8500/3"
    stage = by_code["399588009"]
    assert stage["method"]["coding"][0]["code"] == "897275008"  # MC-22: method 1..1
    assert by_code["C18000"]["category"][0]["coding"][0]["code"] == "laboratory"
    marker = by_code["85337-4"]
    assert marker["derivedFrom"] == [{"reference": f"{EHR}/DiagnosticReport/path-1"}]
    assert by_code["439401001"]["valueString"] == "No change to the primary diagnosis"


def test_subject_by_identifier_when_no_reference_given(fonts):
    ctx = context(patient_reference=None)
    dr = draft_to_report(parse_draft(draft_data()), ctx, status="final", fonts=fonts)
    DiagnosticReport.model_validate(dr.diagnostic_report)
    assert dr.diagnostic_report["subject"] == {
        "type": "Patient",
        "identifier": {"system": "urn:oid:1.2.3.4", "value": "MRN-1"},
    }


def test_report_code_per_partner_overrides_the_default(fonts):
    ctx = context(report_code="60570-9", report_code_display="Pathology Consult note")
    dr = draft_to_report(parse_draft(draft_data()), ctx, status="final", fonts=fonts)
    assert dr.diagnostic_report["code"]["coding"][0]["code"] == "60570-9"


def test_same_input_gives_identical_output_including_pdf(fonts):
    """Deterministic ids and bytes: re-mapping after a crash yields the same report."""
    a = draft_to_report(parse_draft(draft_data()), context(), status="final", fonts=fonts)
    b = draft_to_report(parse_draft(draft_data()), context(), status="final", fonts=fonts)
    assert json.dumps(a.diagnostic_report, sort_keys=True) == json.dumps(
        b.diagnostic_report, sort_keys=True
    )
    other = draft_to_report(
        parse_draft(draft_data()), context(identifier_value="case-2"), status="final", fonts=fonts
    )
    assert other.diagnostic_report["id"] != a.diagnostic_report["id"]
    assert other.observations[0]["id"] != a.observations[0]["id"]


def test_presented_form_pdf_and_text_carry_unicode_names(fonts, tmp_path: Path):
    out = draft_to_report(parse_draft(draft_data()), context(), status="amended", fonts=fonts)
    forms = {f["contentType"]: f for f in out.diagnostic_report["presentedForm"]}
    pdf = base64.b64decode(forms["application/pdf"]["data"])
    assert pdf.startswith(b"%PDF-")
    assert forms["application/pdf"]["size"] == len(pdf)
    text = pdf_text(pdf, tmp_path)
    for name in UNICODE_NAMES:
        assert name in text, name
    assert "Łukasz Żółć" in text
    assert "AMENDED" in text
    assert "Adjuvant endocrine therapy" in text
    dark, total = page1_dark_pixels(pdf, tmp_path)
    assert dark > total // 200, (dark, total)
    plain = base64.b64decode(forms["text/plain; charset=utf-8"]["data"]).decode("utf-8")
    assert UNICODE_NAMES[0] in plain
    assert "Repeat HER2 by ISH" in plain


def test_blank_pdf_would_be_detected(tmp_path: Path, fonts):
    """The pixel check can fail: a page with no text has (almost) no dark pixels."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    dark, _ = page1_dark_pixels(bytes(pdf.output()), tmp_path)
    assert dark == 0


def test_transaction_bundle_and_document_reference_validate(fonts):
    out = draft_to_report(parse_draft(draft_data()), context(), status="final", fonts=fonts)
    bundle = report_transaction(out.diagnostic_report)
    Bundle.model_validate(bundle)
    entries = bundle["entry"]
    assert [e["resource"]["resourceType"] for e in entries] == [
        "DiagnosticReport",
        *["Observation"] * 5,
        "Practitioner",
        "Provenance",
    ]
    assert entries[0]["request"]["ifNoneExist"] == "identifier=urn:fhir-gateway:report|case-1"
    full_urls = {e["fullUrl"] for e in entries}
    dr = entries[0]["resource"]
    assert "contained" not in dr
    assert all(r["reference"] in full_urls for r in dr["result"])
    assert entries[-1]["resource"]["target"] == [{"reference": entries[0]["fullUrl"]}]
    doc = report_document_reference(out.diagnostic_report)
    DocumentReference.model_validate(doc)
    assert doc["context"]["related"] == [{"reference": f"{EHR}/ServiceRequest/sr-1"}]
    assert doc["content"][0]["attachment"]["contentType"] == "application/pdf"


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        (
            {
                "conclusion_codes": [
                    {"code": "C50.9", "system": "http://hl7.org/fhir/sid/icd-10-cm"}
                ]
            },
            "conclusion_codes",
        ),
        ({"reviewer": {"family": "X", "npi": "1234567890"}}, "reviewer.npi"),
        ({"reviewer": {"family": "X"}}, "reviewer"),
        ({"findings": [{"kind": "grade"}]}, "findings.0"),
        ({"findings": [{"kind": "biomarker", "value_text": "positive"}]}, "findings.0"),
        (
            {"findings": [{"kind": "grade", "value_text": "x", "focus": ["not a ref"]}]},
            "findings.0",
        ),
        ({"kind": "dermatology"}, "kind"),
        ({"conclusion": ""}, "conclusion"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_bad_draft_is_a_422_with_the_path(patch, where):
    with pytest.raises(ValidationError) as err:
        parse_draft(draft_data(**patch))
    assert err.value.status_code == 422
    assert any(e.startswith(where) for e in err.value.expression), err.value.expression
    assert err.value.issues


def test_npi_check_digit():
    assert npi_is_valid("1234567893")
    assert not npi_is_valid("1234567890")
    assert not npi_is_valid("123456789")


@pytest.mark.parametrize(
    ("ctx", "path"),
    [
        ({"patient_reference": None, "patient_identifier": None}, "subject"),
        ({"service_request_url": "ServiceRequest/sr-1"}, "basedOn"),
        ({"references": {}}, "findings[0].focus"),
    ],
)
def test_unusable_context_is_a_mapping_error(ctx, path, fonts):
    with pytest.raises(MappingError) as err:
        draft_to_report(parse_draft(draft_data()), context(**ctx), status="final", fonts=fonts)
    assert err.value.path == path


def test_naive_datetime_is_refused(fonts):
    from datetime import datetime

    with pytest.raises(MappingError):
        draft_to_report(
            parse_draft(draft_data()),
            context(issued=datetime(2026, 1, 1)),
            status="final",
            fonts=fonts,
        )


def test_packaged_fonts_render_cjk_and_cyrillic_without_system_fonts(monkeypatch, tmp_path: Path):
    """A fresh machine has no font packages: the fonts shipped in the package are enough."""
    empty = tmp_path / "usr-share-fonts"
    empty.mkdir()
    monkeypatch.setattr(font_lookup, "FONT_DIRS", (font_lookup.PACKAGED_FONTS, empty))
    found = find_report_fonts()
    for path in (found.regular, found.bold, *found.fallbacks):
        assert path is not None
        assert path.parent == font_lookup.PACKAGED_FONTS, path
    out = draft_to_report(parse_draft(draft_data()), context(), status="final", fonts=found)
    forms = {f["contentType"]: f for f in out.diagnostic_report["presentedForm"]}
    text = pdf_text(base64.b64decode(forms["application/pdf"]["data"]), tmp_path)
    assert "山田 太郎" in text  # CJK: Droid Sans Fallback
    assert "Иван Петров" in text  # Cyrillic: DejaVu Sans
    assert "Ελένη Παπαδοπούλου" in text


def test_missing_font_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"not found under .*reinstall fhir-gateway"):
        find_report_fonts(dirs=[tmp_path])
    with pytest.raises(ConfigError, match="does not exist"):
        find_report_fonts(regular=tmp_path / "none.ttf")


def test_unusable_font_file_is_a_config_error(tmp_path: Path):
    bad = tmp_path / "bad.ttf"
    bad.write_bytes(b"not a font")
    with pytest.raises(ConfigError, match="not a TrueType"):
        find_report_fonts(regular=bad)


def test_question_and_specimens_in_report_pdf_and_text(fonts, tmp_path: Path):
    """The consult question and the specimen identifiers are carried into the report: the PDF,
    the text form, the narrative, and DiagnosticReport.specimen (reference and accession)."""
    from mappers.report import ReportSpecimen

    specimens = (
        ReportSpecimen(
            "Colon resection specimen; accession S17-0412; block S17-0412-A1",
            reference=f"{EHR}/Specimen/sp-1",
            identifier=("urn:oid:2.16.840.1.113883.3.9999.5", "S17-0412"),
        ),
        ReportSpecimen("Slide; accession S17-0413", identifier=("", "S17-0413")),
    )
    question = "Oncology second opinion for Colon ca. Is adjuvant chemotherapy indicated?"
    ctx = context(question=question, specimens=specimens)
    out = draft_to_report(parse_draft(draft_data()), ctx, status="final", fonts=fonts)
    dr = out.diagnostic_report
    DiagnosticReport.model_validate(dr)
    assert dr["meta"]["profile"] == [US_CORE_DR_NOTE]
    assert dr["specimen"] == [
        {
            "reference": f"{EHR}/Specimen/sp-1",
            "identifier": {"system": "urn:oid:2.16.840.1.113883.3.9999.5", "value": "S17-0412"},
            "display": specimens[0].label,
        },
        {"identifier": {"value": "S17-0413"}, "display": specimens[1].label},
    ]
    assert "Question from the referrer:\n" + question in out.text
    assert "- Slide; accession S17-0413" in out.text
    assert "adjuvant chemotherapy" in dr["text"]["div"]
    text = " ".join(pdf_text(out.pdf, tmp_path).split())
    assert "Question from the referrer" in text
    assert "S17-0412-A1" in text
    assert "S17-0413" in text
    # without a question or specimens the report has neither section
    plain = draft_to_report(parse_draft(draft_data()), context(), status="final", fonts=fonts)
    assert "specimen" not in plain.diagnostic_report
    assert "Question from the referrer" not in plain.text
