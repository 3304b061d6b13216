"""HL7 v2 and C-CDA specifics: segment ends, BOM, delimiters, SPM/OBX order, ED, NTE, XPath."""

from __future__ import annotations

import base64

import pytest

from mappers import ccda, hl7v2
from tests.unit.mappers._helpers import FIXTURES

ORU = (
    "MSH|^~\\&|LAB|HOSP|GW|GW|20240101120000+0100||ORU^R01|M1|P|2.5.1\r"
    "PID|1||123^^^HOSP^MR||DOE^JANE||19600101|F\r"
    "OBR|1|P1|F1^LAB|11529-5^Surgical pathology study^LN|||20240101110000+0100|||||||||||||||"
    "20240102110000+0100||SP|F\r"
    "NTE|1||Gross: tan nodule\r"
    "OBX|1|FT|22637-3^Path report.final diagnosis^LN||"
    "Invasive ductal carcinoma\\.br\\grade 2||||||F\r"
    "OBX|2|ED|PDF^Report^L||^application^PDF^Base64^"
    + base64.b64encode(b"%PDF-1.4").decode()
    + "||||||F\r"
    "SPM|1|S1^S1||TUMOR^Tumor^HL70487|||||||||||||20240101100000+0100\r"
    "OBX|3|NM|21889-1^Tumor size^LN||23|mm^mm^UCUM|||||F\r"
    "ZXY|custom\r"
)


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"])
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_segment_endings_and_bom_give_the_same_resources(ending: str, bom: bytes) -> None:
    data = bom + ORU.replace("\r", ending).encode()
    reference = hl7v2.document_to_resources(ORU.encode(), "lab")
    assert hl7v2.document_to_resources(data, "lab").resources == reference.resources


def test_oru_maps_report_text_attachment_specimen_and_late_obx() -> None:
    result = hl7v2.document_to_resources(ORU.encode(), "lab")
    by_type: dict[str, list[dict[str, object]]] = {}
    for r in result.resources:
        by_type.setdefault(str(r["resourceType"]), []).append(r)
    report = by_type["DiagnosticReport"][0]
    assert report["status"] == "final"
    assert report["issued"] == "2024-01-02T11:00:00+01:00"
    assert (
        "Invasive ductal carcinoma\ngrade 2"
        in base64.b64decode(
            report["presentedForm"][-1]["data"]  # type: ignore[index]
        ).decode()
    )
    assert report["presentedForm"][0]["contentType"] == "application/pdf"  # type: ignore[index]
    assert "Gross: tan nodule" in report["text"]["div"]  # type: ignore[index]
    size = next(o for o in by_type["Observation"] if o["code"]["coding"][0]["code"] == "21889-1")  # type: ignore[index]
    assert size["specimen"] == {"reference": f"Specimen/{by_type['Specimen'][0]['id']}"}
    assert size["valueQuantity"] == {
        "value": 23,
        "unit": "mm",
        "system": "http://unitsofmeasure.org",
        "code": "mm",
    }
    assert {"reference": f"Observation/{size['id']}"} in report["result"]  # type: ignore[operator]
    assert any(i["expression"] == ["ZXY[1]"] for i in result.issues)


def test_non_default_delimiters() -> None:
    data = (FIXTURES / "hl7v2" / "segmentfinder_a24_custom_delimiters.hl7").read_bytes()
    patient = hl7v2.document_to_resources(data, "adt").resources[0]
    assert patient["name"] == [{"family": "SMITH", "given": ["JOHN", "TEST"]}]


def test_v2_timestamp_without_zone_keeps_date_only() -> None:
    assert hl7v2.ts_to_datetime("20240101120000") == ("2024-01-01", True)
    assert hl7v2.ts_to_datetime("202401011200-0500") == ("2024-01-01T12:00:00-05:00", False)


def test_ccda_unmapped_entries_reported_with_xpath_and_narrative_kept() -> None:
    data = (FIXTURES / "ccda" / "Diagnostic_Imaging_Report.xml").read_bytes()
    result = ccda.map_bytes(data, "hosp")
    paths = [e for i in result.issues for e in i.get("expression", [])]
    assert any(p.startswith("/ClinicalDocument/component/structuredBody/component") for p in paths)
    docref = next(r for r in result.resources if r["resourceType"] == "DocumentReference")
    texts = [base64.b64decode(c["attachment"]["data"]).decode() for c in docref["content"][1:]]
    assert texts
    assert all(texts)


def test_ccda_results_organizer_becomes_report_with_observations() -> None:
    data = (FIXTURES / "ccda" / "C-CDA_R2-1_CCD.xml").read_bytes()
    resources = ccda.map_bytes(data, "hosp").resources
    reports = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    ids = {f"Observation/{r['id']}" for r in resources if r["resourceType"] == "Observation"}
    assert reports
    assert all(ref["reference"] in ids for r in reports for ref in r["result"])
