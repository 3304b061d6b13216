"""Pure case content over assembled bundles: mCODE claims across sources, completeness per
cancer type, the consult question and specimens, the timeline."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fhir_gateway.casebundle.assemble import SourceBatch, assemble_case_bundle
from fhir_gateway.casebundle.completeness import cancer_types, completeness
from fhir_gateway.casebundle.consult import (
    consult_question,
    question_text,
    specimen_label,
    specimen_summary,
)
from fhir_gateway.casebundle.timeline import sort_key, timeline
from mappers.fhir import InboundResource, resources_to_normalised

MCODE = "http://hl7.org/fhir/us/mcode/StructureDefinition/"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RECEIVED = "2026-01-01T00:00:00Z"
PATIENT = {
    "resourceType": "Patient",
    "id": "p",
    "identifier": [{"system": "urn:mrn", "value": "123"}],
    "name": [{"family": "Test"}],
    "gender": "female",
}


def condition(cid: str, code: str, system: str = SNOMED, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "identifier": [{"system": "urn:cond", "value": cid}],
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "problem-list-item",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": system, "code": code, "display": f"cancer {code}"}]},
        "subject": {"reference": "Patient/p"},
        "onsetDateTime": "2020-03-01",
        **extra,
    }


def stage_group(focus: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "stage",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": "21902-2"}]},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2020-04-01",
        "method": {"coding": [{"system": SNOMED, "code": "897275008"}]},
        "valueCodeableConcept": {"text": "IIIB"},
    }
    if focus:
        out["focus"] = [{"reference": focus}]
    return out


def batch(source: str, resources: list[dict[str, Any]], kind: str = "fhir") -> SourceBatch:
    items = [InboundResource(copy.deepcopy(r), f"{r['resourceType']}/{r['id']}") for r in resources]
    normalised, issues = resources_to_normalised(items, source)
    issues = [
        {**i, "expression": [f"{source}#{e}" for e in i.get("expression", [])]} for i in issues
    ]
    return SourceBatch(source, normalised, issues, kind, source, RECEIVED)


def profiles(resource: dict[str, Any]) -> list[str]:
    return list(resource.get("meta", {}).get("profile", []))


def stages(case: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in case.resources
        if r["resourceType"] == "Observation"
        and any(c.get("code") == "21902-2" for c in r["code"]["coding"])
    ]


# --------------------------------------------------------------------------- claims


def test_staging_without_focus_gets_the_only_primary_cancer_of_the_case() -> None:
    ehr = batch("https://ehr.example/fhir", [PATIENT, condition("c1", "93761005")])
    lab = batch("lab-v2", [PATIENT, stage_group()])
    # per source: the lab's staging has no primary cancer condition beside it
    assert MCODE + "mcode-tnm-stage-group" not in profiles(stages_of(lab))
    assert any("0 primary cancer conditions in this source" in i["diagnostics"] for i in lab.issues)

    case = assemble_case_bundle("p", [ehr, lab])
    [stage] = stages(case)
    primary = next(r for r in case.resources if r["resourceType"] == "Condition")
    assert MCODE + "mcode-tnm-stage-group" in profiles(stage)
    assert stage["focus"] == [{"reference": f"Condition/{primary['id']}"}]
    texts = [i["diagnostics"] for i in case.issues]
    assert not any("0 primary cancer conditions in this source" in t for t in texts)
    assert any("set to the only primary cancer condition of this case" in t for t in texts)
    assert any("tnm-stage-group claimed over the whole case" in t for t in texts)
    patient = case.resources[0]
    assert MCODE + "mcode-cancer-patient" in profiles(patient)


def stages_of(source: SourceBatch) -> dict[str, Any]:
    return next(r for r in source.resources if r["resourceType"] == "Observation")


def test_staging_without_focus_is_not_claimed_when_the_case_has_two_primaries() -> None:
    ehr = batch(
        "https://ehr.example/fhir",
        [PATIENT, condition("c1", "93761005"), condition("c2", "254837009")],
    )
    lab = batch("lab-v2", [PATIENT, stage_group()])
    case = assemble_case_bundle("p", [ehr, lab])
    [stage] = stages(case)
    assert MCODE + "mcode-tnm-stage-group" not in profiles(stage)
    assert "focus" not in stage
    warnings = [
        i for i in case.issues if "2 primary cancer conditions in this case" in i["diagnostics"]
    ]
    assert len(warnings) == 1
    assert warnings[0]["severity"] == "warning"


def test_staging_pointing_at_a_condition_claimed_in_another_source() -> None:
    """The lab's copy of the cancer condition has no clinical status (not claimable there); the
    EHR sends the same condition (same identifier) complete: merged, and the staging is claimed
    over the case."""
    bare = condition("c1", "93761005")
    del bare["clinicalStatus"]
    ehr = batch("https://ehr.example/fhir", [PATIENT, condition("c1", "93761005")])
    lab = batch("lab-feed", [PATIENT, bare, stage_group("Condition/c1")])
    assert MCODE + "mcode-tnm-stage-group" not in profiles(stages_of(lab))
    case = assemble_case_bundle("p", [ehr, lab])
    [stage] = stages(case)
    assert MCODE + "mcode-tnm-stage-group" in profiles(stage)
    assert not any(
        "not a primary cancer condition of this source" in i["diagnostics"] for i in case.issues
    )


def test_surgery_for_a_cancer_condition_of_another_source() -> None:
    bare = condition("c1", "93761005")
    del bare["clinicalStatus"]
    surgery = {
        "resourceType": "Procedure",
        "id": "s1",
        "status": "completed",
        "code": {"coding": [{"system": SNOMED, "code": "387713003"}]},
        "subject": {"reference": "Patient/p"},
        "performedDateTime": "2020-03-20",
        "reasonReference": [{"reference": "Condition/c1"}],
    }
    ehr = batch("https://ehr.example/fhir", [PATIENT, condition("c1", "93761005")])
    ops = batch("theatre", [PATIENT, bare, surgery])
    alone = assemble_case_bundle("p", [ops])
    procedure = next(r for r in alone.resources if r["resourceType"] == "Procedure")
    assert MCODE + "mcode-cancer-related-surgical-procedure" not in profiles(procedure)
    case = assemble_case_bundle("p", [ehr, ops])
    procedure = next(r for r in case.resources if r["resourceType"] == "Procedure")
    assert MCODE + "mcode-cancer-related-surgical-procedure" in profiles(procedure)


# --------------------------------------------------------------------------- completeness


@pytest.mark.parametrize(
    ("code", "system", "expected", "needs"),
    [
        ("93761005", SNOMED, "colorectal", ["cea", "msi_mmr", "kras_nras_braf"]),
        ("C18.7", "http://hl7.org/fhir/sid/icd-10-cm", "colorectal", ["cea"]),
        ("254837009", SNOMED, "breast", ["er", "pr", "her2", "ki67"]),
        ("C50.912", "http://hl7.org/fhir/sid/icd-10-cm", "breast", ["er"]),
        ("C61", "http://hl7.org/fhir/sid/icd-10-cm", "prostate", ["psa", "gleason_grade_group"]),
        ("254637007", SNOMED, "lung", ["egfr", "alk", "pd_l1"]),
    ],
)
def test_cancer_type_from_the_primary_condition(
    code: str, system: str, expected: str, needs: list[str]
) -> None:
    case = assemble_case_bundle("p", [batch("ehr", [PATIENT, condition("c1", code, system)])])
    assert [t["type"] for t in cancer_types(case.resources)] == [expected]
    keys = [c["key"] for c in case.summary["checklist"]]
    general = ["primary_cancer_condition", "pathology_report", "staging", "tumour_markers"]
    assert keys[:5] == [*general, "imaging"]
    assert set(needs) <= set(keys[5:])
    assert set(needs) <= set(case.summary["missing"])


def test_no_cancer_type_without_a_claimed_primary_cancer() -> None:
    benign = condition("c1", "68496003")  # polyp of colon
    case = assemble_case_bundle("p", [batch("ehr", [PATIENT, benign])])
    assert case.summary["cancer"] == []
    assert [c["key"] for c in case.summary["checklist"]] == [
        "primary_cancer_condition",
        "pathology_report",
        "staging",
        "tumour_markers",
        "imaging",
    ]
    assert case.summary["primary_cancer_condition"]["present"] is False


def observation(oid: str, code: str, display: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2020-05-01",
        **extra,
    }


def test_needs_are_supplied_by_code_gene_and_document() -> None:
    kras = observation(
        "v1",
        "69548-6",
        "Genetic variant assessment",
        valueCodeableConcept={"coding": [{"system": LOINC, "code": "LA9633-4"}]},
        component=[
            {
                "code": {"coding": [{"system": LOINC, "code": "48018-6"}]},
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://www.genenames.org",
                            "code": "HGNC:6407",
                            "display": "KRAS",
                        }
                    ]
                },
            }
        ],
    )
    msi = observation(
        "m1", "81695-9", "Microsatellite instability [Interpretation] in Cancer specimen"
    )
    mlh1 = observation("m2", "00000-0", "MLH1 [Presence] in Tissue by Immune stain")
    document: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "status": "current",
        "type": {"coding": [{"system": LOINC, "code": "60568-3"}]},
        "subject": {"reference": "Patient/p"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "eA=="}}],
    }
    case = assemble_case_bundle(
        "p", [batch("ehr", [PATIENT, condition("c1", "93761005"), kras, msi, mlh1, document])]
    )
    checklist = {c["key"]: c for c in case.summary["checklist"]}
    assert checklist["kras_nras_braf"]["count"] == 1
    assert checklist["msi_mmr"]["count"] == 2
    assert checklist["pathology_report"]["resources"][0].startswith("DocumentReference/")
    assert case.summary["missing"] == ["staging", "imaging", "cea"]  # MSI is a tumour marker
    # a document of another type does not count as pathology
    document["type"]["coding"][0]["code"] = "18842-5"
    case = assemble_case_bundle(
        "p", [batch("ehr", [PATIENT, condition("c1", "93761005"), document])]
    )
    assert "pathology_report" in case.summary["missing"]


def test_completeness_over_no_resources() -> None:
    summary = completeness([])
    assert summary["missing"] == [
        "primary_cancer_condition",
        "pathology_report",
        "staging",
        "tumour_markers",
        "imaging",
    ]


# --------------------------------------------------------------------------- question, specimens


def test_consult_question_from_the_referral_service_request() -> None:
    request = {
        "resourceType": "ServiceRequest",
        "id": "sr",
        "status": "active",
        "intent": "order",
        "code": {"text": "Oncology second opinion"},
        "subject": {"reference": "Patient/p"},
        "reasonCode": [{"coding": [{"system": SNOMED, "code": "93761005", "display": "Colon ca"}]}],
        "reasonReference": [{"reference": "Condition/c1"}],
        "note": [{"text": "Is adjuvant chemotherapy indicated?"}],
    }
    other = {**request, "id": "sr2", "note": [{"text": "not the referral"}]}
    referral = batch("referral", [PATIENT, condition("c1", "93761005"), request], "referral")
    pulled = batch("ehr", [PATIENT, other])
    case = assemble_case_bundle("p", [pulled, referral])
    question = case.summary["question"]
    assert question["notes"] == ["Is adjuvant chemotherapy indicated?"]
    assert question["reasons"][0]["coding"][0]["code"] == "93761005"
    assert question["reasonReferences"][0]["display"] == "cancer 93761005"
    assert question_text(question) == (
        "Oncology second opinion for Colon ca; cancer 93761005. Is adjuvant chemotherapy indicated?"
    )
    assert consult_question([]) is None
    assert question_text(None) == ""


def test_specimen_accession_containers_and_parents() -> None:
    slide = {
        "resourceType": "Specimen",
        "id": "slide",
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "system": "urn:lab",
                "value": "S20-99",
            },
            {"system": "urn:placer", "value": "P-1"},
        ],
        "type": {"text": "Slide"},
        "parent": [{"reference": "Specimen/block"}],
        "container": [
            {"identifier": [{"value": "S20-99-B2-3"}], "type": {"text": "Microscope slide"}}
        ],
        "collection": {"collectedPeriod": {"start": "2020-03-20"}},
    }
    summary = specimen_summary(slide)
    assert summary["accession"] == {"system": "urn:lab", "value": "S20-99"}
    assert summary["parents"] == ["Specimen/block"]
    assert summary["containers"] == [
        {"kind": "slide", "type": "Microscope slide", "identifiers": [{"value": "S20-99-B2-3"}]}
    ]
    assert summary["collected"] == "2020-03-20"
    assert specimen_label(summary) == (
        "Slide; accession S20-99; slide S20-99-B2-3; collected 2020-03-20"
    )
    bare = specimen_summary({"resourceType": "Specimen", "id": "x"})
    assert bare == {"resource": "Specimen/x", "accession": None}


# --------------------------------------------------------------------------- timeline


def test_timeline_orders_mixed_precision_and_zones_undated_last() -> None:
    resources = [
        condition("c1", "93761005", onsetDateTime="2020-03"),
        {**observation("o1", "2039-6"), "effectiveDateTime": "2020-03-01T01:00:00+02:00"},
        {
            "resourceType": "ImagingStudy",
            "id": "i1",
            "status": "available",
            "subject": {"reference": "Patient/p"},
            "started": "2020-02-29T23:30:00Z",
            "modality": [{"code": "CT"}],
        },
        {
            "resourceType": "MedicationRequest",
            "id": "m1",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"text": "FOLFOX"},
            "subject": {"reference": "Patient/p"},
        },
        {
            "resourceType": "Procedure",
            "id": "r1",
            "status": "completed",
            "code": {"coding": [{"system": SNOMED, "code": "1217123003", "display": "RT course"}]},
            "subject": {"reference": "Patient/p"},
            "performedPeriod": {"start": "2020-06-01", "end": "2020-07-01"},
        },
    ]
    for r in resources:
        r.setdefault("meta", {})
    resources[1]["meta"]["tag"] = [{"system": "urn:fhir-gateway:class", "code": "tumor-marker"}]
    resources[1]["valueQuantity"] = {
        "value": 5,
        "unit": "ng/mL",
        "code": "ng/mL",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/iso21090-PQ-translation",
                "valueQuantity": {"value": 5, "unit": "ug/L", "code": "ug/L"},
            }
        ],
    }
    events = timeline(resources)
    assert [(e["kind"], e["resource"]) for e in events] == [
        ("tumour-marker", "Observation/o1"),  # 2020-02-29T23:00Z
        ("imaging", "ImagingStudy/i1"),  # 2020-02-29T23:30Z
        ("diagnosis", "Condition/c1"),  # 2020-03 = 2020-03-01T00:00Z
        ("radiotherapy", "Procedure/r1"),
        ("treatment", "MedicationRequest/m1"),  # no date: last
    ]
    assert events[0]["value"]["code"] == "ng/mL"
    assert events[0]["original"]["code"] == "ug/L"
    assert events[1]["display"] == "CT"
    assert events[4]["date"] is None
    assert sort_key("2020") < sort_key("2020-01-01T00:00:01Z") < sort_key(None)
    # lab results that are not markers are no timeline events
    assert timeline([observation("o2", "718-7")]) == []
