"""Table-driven tests of classification, code systems, units and v2 statuses.

STANDARDS.md MC-23 (legacy LOINC staging), MC-31 (stage types by code), MC-32 (tumour markers),
MC-40 (88040-1 in, 97509-4 out), MC-42 (genomics report codes), V2-04 (v2 status maps).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mappers import fhir, hl7v2
from mappers.terminology import CLASS_SYSTEM, terminology

LOINC, SCT = "http://loinc.org", "http://snomed.info/sct"


def _obs(system: str, code: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"coding": [{"system": system, "code": code}]}, **extra}  # fmt: skip


def _map(resource: dict[str, Any]) -> dict[str, Any]:
    resources, _ = fhir.resources_to_normalised(fhir.parse_fhir(json.dumps(resource).encode()), "s")
    return resources[0]


def _classes(resource: dict[str, Any]) -> list[str]:
    return [t["code"] for t in resource["meta"].get("tag", []) if t["system"] == CLASS_SYSTEM]


@pytest.mark.parametrize(
    ("system", "code", "expected"),
    [
        (SCT, "399390009", "tnm-stage-group"),
        (SCT, "399537006", "tnm-stage-group"),
        (SCT, "399588009", "tnm-stage-group"),
        (SCT, "78873005", "tnm-primary-tumor-category"),
        (SCT, "399504009", "tnm-primary-tumor-category"),
        (SCT, "384625004", "tnm-primary-tumor-category"),
        (SCT, "277206009", "tnm-regional-nodes-category"),
        (SCT, "399534004", "tnm-regional-nodes-category"),
        (SCT, "371494008", "tnm-regional-nodes-category"),
        (SCT, "277208005", "tnm-distant-metastases-category"),
        (SCT, "399387003", "tnm-distant-metastases-category"),
        (SCT, "371497001", "tnm-distant-metastases-category"),
        (LOINC, "21908-9", "tnm-stage-group"),
        (LOINC, "21902-2", "tnm-stage-group"),
        (LOINC, "21914-7", "tnm-stage-group"),
        (LOINC, "21905-5", "tnm-primary-tumor-category"),
        (LOINC, "21899-0", "tnm-primary-tumor-category"),
        (LOINC, "21906-3", "tnm-regional-nodes-category"),
        (LOINC, "21900-6", "tnm-regional-nodes-category"),
        (LOINC, "21907-1", "tnm-distant-metastases-category"),
        (LOINC, "21901-4", "tnm-distant-metastases-category"),
        (LOINC, "16112-5", "tumor-marker"),
        (LOINC, "48676-1", "tumor-marker"),
        (LOINC, "2857-1", "tumor-marker"),
        (LOINC, "10334-1", "tumor-marker"),
        (LOINC, "24108-3", "tumor-marker"),
        (LOINC, "81695-9", "tumor-marker"),
        (LOINC, "94076-7", "tumor-marker"),
        (LOINC, "85337-4", "tumor-marker"),
        (LOINC, "69548-6", "genomic-variant"),
        (LOINC, "97509-4", "cancer-disease-status"),
        (LOINC, "88040-1", "cancer-disease-status"),
        (LOINC, "21889-1", "tumor-size"),
        ("LN", "21902-2", "tnm-stage-group"),
        ("urn:oid:2.16.840.1.113883.6.1", "2857-1", "tumor-marker"),
    ],
)
def test_observation_classified_by_code_without_category(
    system: str, code: str, expected: str
) -> None:
    assert expected in _classes(_map(_obs(system, code)))


@pytest.mark.parametrize(
    ("category", "expected"),
    [((SCT, "385356007"), "cancer-stage"), ((SCT, "250724005"), "tumor-marker")],
)
def test_observation_classified_by_category(category: tuple[str, str], expected: str) -> None:
    obs = _obs(
        LOINC, "99999-9", category=[{"coding": [{"system": category[0], "code": category[1]}]}]
    )
    assert _classes(_map(obs)) == [expected]


V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


def _cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _report(code: dict[str, Any], *category: tuple[str, str]) -> dict[str, Any]:
    out = {"resourceType": "DiagnosticReport", "status": "final", "code": code}
    return {**out, "category": [_cc(*c) for c in category]} if category else out


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "Condition", "code": _cc(ICD10, "C50.911")}, "primary-cancer-condition"),
        (
            {"resourceType": "Condition", "code": _cc("I10C", "C78.01")},
            "secondary-cancer-condition",
        ),
        (
            {
                "resourceType": "Condition",
                "code": {"text": "x"},
                "category": [_cc(SCT, "372087000")],
            },
            "primary-cancer-condition",
        ),
        (_report(_cc(LOINC, "11526-1"), (V2_0074, "LAB")), "pathology-report"),
        (_report({"text": "x"}, (LOINC, "LP7839-6")), "pathology-report"),
        (
            {
                "resourceType": "DocumentReference",
                "status": "current",
                "type": _cc(LOINC, "60568-3"),
                "content": [{"attachment": {"url": "http://x/1"}}],
            },
            "pathology-report",
        ),
        (_report(_cc(LOINC, "51969-4")), "genomics-report"),
        (_report(_cc(LOINC, "81247-9")), "genomics-report"),
        (
            {"resourceType": "Procedure", "status": "completed", "code": _cc(SCT, "387713003")},
            "cancer-surgery",
        ),
    ],
)
def test_other_resources_classified(resource: dict[str, Any], expected: str) -> None:
    assert expected in _classes(_map({"id": "r1", **resource}))


def test_disease_status_88040_gets_97509_added_and_original_kept() -> None:
    codings = _map(_obs(LOINC, "88040-1"))["code"]["coding"]
    assert [c["code"] for c in codings] == ["88040-1", "97509-4"]


def test_code_system_alias_gets_canonical_coding_added_not_replaced() -> None:
    codings = _map(_obs("urn:oid:2.16.840.1.113883.6.1", "2857-1"))["code"]["coding"]
    assert codings == [
        {"system": "urn:oid:2.16.840.1.113883.6.1", "code": "2857-1"},
        {"system": LOINC, "code": "2857-1"},
    ]


@pytest.mark.parametrize(
    ("unit", "ucum"),
    [
        ("mg/dl", "mg/dL"),
        ("K/uL", "10*3/uL"),
        ("mmHg", "mm[Hg]"),
        ("mg/dL", "mg/dL"),
        ("bogus", None),
    ],
)
def test_units_to_ucum_only_when_exact(unit: str, ucum: str | None) -> None:
    # Glucose (2345-7), not a tumour marker: markers are also converted (test_mcode_units.py).
    quantity = _map(_obs(LOINC, "2345-7", valueQuantity={"value": 1.5, "unit": unit}))[
        "valueQuantity"
    ]
    assert quantity["unit"] == unit  # the original is kept
    assert quantity.get("code") == ucum
    assert (quantity.get("system") == "http://unitsofmeasure.org") is (ucum is not None)


def test_profile_claimed_only_when_it_conforms() -> None:
    marker = _obs(
        LOINC,
        "2857-1",
        subject={"reference": "Patient/p"},
        effectiveDateTime="2024-01-01",
        valueQuantity={"value": 4.1, "unit": "ng/mL"},
        category=[_cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")],
        meta={"profile": ["http://example.org/claimed"]},
    )
    assert _map(marker)["meta"]["profile"] == [
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab",
        "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-tumor-marker-test",
    ]
    del marker["effectiveDateTime"]
    assert "profile" not in _map(marker)["meta"]


@pytest.mark.parametrize(
    ("table", "code", "status"),
    [
        (hl7v2.OBR_STATUS, "F", "final"), (hl7v2.OBR_STATUS, "P", "preliminary"),
        (hl7v2.OBR_STATUS, "C", "corrected"), (hl7v2.OBR_STATUS, "A", "partial"),
        (hl7v2.OBR_STATUS, "R", "partial"), (hl7v2.OBR_STATUS, "I", "registered"),
        (hl7v2.OBR_STATUS, "O", "registered"), (hl7v2.OBR_STATUS, "S", "registered"),
        (hl7v2.OBR_STATUS, "X", "cancelled"), (hl7v2.OBR_STATUS, "Y", "unknown"),
        (hl7v2.OBX_STATUS, "F", "final"), (hl7v2.OBX_STATUS, "P", "preliminary"),
        (hl7v2.OBX_STATUS, "C", "corrected"), (hl7v2.OBX_STATUS, "A", "amended"),
        (hl7v2.OBX_STATUS, "D", "entered-in-error"), (hl7v2.OBX_STATUS, "W", "entered-in-error"),
        (hl7v2.OBX_STATUS, "X", "cancelled"),
    ],
)  # fmt: skip
def test_v2_status_maps(table: dict[str, str], code: str, status: str) -> None:
    assert table[code] == status


def test_terminology_loaded_once() -> None:
    assert terminology() is terminology()


def test_empty_narrative_is_dropped_with_an_issue() -> None:
    patient = {"resourceType": "Patient", "id": "p", "text": {"status": "generated", "div": ""}}
    resources, issues = fhir.resources_to_normalised(
        fhir.parse_fhir(json.dumps(patient).encode()), "s"
    )
    assert "text" not in resources[0]
    assert issues[0]["expression"] == ["Patient.text"]
