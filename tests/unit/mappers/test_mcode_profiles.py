"""mCODE STU4 / US Core 6.1.0 claims in meta.profile: positive and negative per profile.

STANDARDS.md §1.2 (profile rules), MC-20..MC-28, MC-32; rules in docs/normalisation.md.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mappers import fhir
from mappers.units import PQ_TRANSLATION, convert
from tests.unit.mappers._helpers import FIXTURES, map_one

LOINC, SCT = "http://loinc.org", "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
MCODE = "http://hl7.org/fhir/us/mcode/StructureDefinition/"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0487 = "http://terminology.hl7.org/CodeSystem/v2-0487"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
PATIENT = {
    "resourceType": "Patient", "id": "p", "gender": "female", "name": [{"family": "Doe"}],
    "identifier": [{"system": "urn:oid:1.2.3", "value": "1"}],
}  # fmt: skip


def _cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _condition(
    system: str, code: str, cid: str = "c1", category: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Condition", "id": cid, "subject": {"reference": "Patient/p"},
        "code": _cc(system, code),
        "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
    }  # fmt: skip
    if category:
        out["category"] = [_cc(COND_CAT, category)]
    return out


def _obs(system: str, code: str, oid: str = "o1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": oid, "status": "final", "code": _cc(system, code),
        "subject": {"reference": "Patient/p"}, "effectiveDateTime": "2024-01-01",
        "category": [_cc(OBS_CAT, "laboratory")], **extra,
    }  # fmt: skip


def _map(*resources: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    bundle = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [{"resource": r} for r in (PATIENT, *resources)],
    }  # fmt: skip
    out, issues = fhir.resources_to_normalised(fhir.parse_fhir(json.dumps(bundle).encode()), "s")
    return {r["resourceType"] + ":" + str(i): r for i, r in enumerate(out)}, issues


def _profiles(resource: dict[str, Any]) -> list[str]:
    return list(resource["meta"].get("profile", []))


def _nth(mapped: dict[str, dict[str, Any]], n: int) -> dict[str, Any]:
    return list(mapped.values())[n]


# --- cancer conditions (PrimaryCancerDisorderVS / SecondaryCancerDisorderVS) ---------------


@pytest.mark.parametrize(
    ("system", "code", "profile"),
    [
        (ICD10, "C18.9", "mcode-primary-cancer-condition"),  # colon
        (ICD10, "C50.911", "mcode-primary-cancer-condition"),
        (ICD10, "D05.10", "mcode-primary-cancer-condition"),  # carcinoma in situ (CIS VS)
        (ICD10, "D03.9", "mcode-primary-cancer-condition"),  # melanoma in situ (MIS VS)
        (ICD10, "C7A.010", "mcode-primary-cancer-condition"),  # malignant carcinoid
        (SCT, "363406005", "mcode-primary-cancer-condition"),  # malignant tumour of colon
        (SCT, "109355002", "mcode-primary-cancer-condition"),  # carcinoma in situ root
        (SCT, "189758001", "mcode-primary-cancer-condition"),  # melanoma in situ root
        (ICD10, "C78.01", "mcode-secondary-cancer-condition"),
        (ICD10, "C7B.02", "mcode-secondary-cancer-condition"),
        (SCT, "94225005", "mcode-secondary-cancer-condition"),
    ],
)
@pytest.mark.parametrize("category", ["encounter-diagnosis", "problem-list-item", None])
def test_cancer_condition_claimed_whatever_its_category(
    system: str, code: str, profile: str, category: str | None
) -> None:
    mapped, _ = _map(_condition(system, code, category=category))
    condition = _nth(mapped, 1)
    assert MCODE + profile in _profiles(condition)
    assert US_CORE + "us-core-condition-problems-health-concerns" in _profiles(condition)
    codes = {c["code"] for cat in condition["category"] for c in cat["coding"]}
    assert "problem-list-item" in codes
    assert category is None or category in codes
    assert MCODE + "mcode-cancer-patient" in _profiles(_nth(mapped, 0))


@pytest.mark.parametrize(
    ("system", "code"),
    [(ICD10, "I10"), (ICD10, "D18.01"), (ICD10, "D36.9"), (SCT, "38341003"), (SCT, "126906006")],
)
def test_non_cancer_condition_not_claimed(system: str, code: str) -> None:
    mapped, _ = _map(_condition(system, code, category="problem-list-item"))
    assert not [p for p in _profiles(_nth(mapped, 1)) if p.startswith(MCODE)]
    assert MCODE + "mcode-cancer-patient" not in _profiles(_nth(mapped, 0))


def test_secondary_with_stage_and_bad_evidence_not_claimed() -> None:
    staged = {**_condition(ICD10, "C78.01"), "stage": [{"summary": {"text": "IV"}}]}
    evidence = {**_condition(ICD10, "C18.9", "c2"), "evidence": [{"code": [_cc(SCT, "71388002")]}]}
    mapped, _ = _map(staged, evidence)
    assert not [p for r in (_nth(mapped, 1), _nth(mapped, 2)) for p in _profiles(r) if "mcode" in p]


def test_histology_extension_and_body_site_kept() -> None:
    ext = {
        "url": MCODE + "mcode-histology-morphology-behavior",
        "valueCodeableConcept": _cc(SCT, "35917007"),
    }
    cond = {**_condition(ICD10, "C50.911"), "extension": [ext], "bodySite": [_cc(SCT, "80248007")]}
    condition = _nth(_map(cond)[0], 1)
    assert condition["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "35917007"
    assert condition["bodySite"][0]["coding"][0]["code"] == "80248007"
    assert MCODE + "mcode-primary-cancer-condition" in _profiles(condition)


# --- TNM staging: focus must be a primary cancer condition ---------------------------------

METHOD = _cc(SCT, "897275008")


def _stage(focus: str | None = None, **extra: Any) -> dict[str, Any]:
    out = _obs(SCT, "399537006", "s1", valueCodeableConcept=_cc(SCT, "1222806003"), method=METHOD)
    out["category"] = [_cc(OBS_CAT, "survey")]
    if focus:
        out["focus"] = [{"reference": focus}]
    return {**out, **extra}


def test_stage_group_claimed_with_primary_focus() -> None:
    mapped, _ = _map(_condition(ICD10, "C18.9"), _stage("Condition/c1"))
    assert _profiles(_nth(mapped, 2)) == [MCODE + "mcode-tnm-stage-group"]


def test_stage_group_on_hypertension_not_claimed() -> None:
    mapped, issues = _map(_condition(ICD10, "I10"), _stage("Condition/c1"))
    assert MCODE + "mcode-tnm-stage-group" not in _profiles(_nth(mapped, 2))
    assert any("focus is not a primary cancer" in i["diagnostics"] for i in issues)


def test_empty_focus_set_when_exactly_one_primary() -> None:
    mapped, issues = _map(_condition(ICD10, "C18.9"), _stage())
    stage, condition = _nth(mapped, 2), _nth(mapped, 1)
    assert stage["focus"] == [{"reference": f"Condition/{condition['id']}"}]
    assert MCODE + "mcode-tnm-stage-group" in _profiles(stage)
    assert any("set to the only primary" in i["diagnostics"] for i in issues)


@pytest.mark.parametrize("conditions", [0, 2])
def test_empty_focus_with_zero_or_two_primaries_reported(conditions: int) -> None:
    conds = [_condition(ICD10, "C18.9", f"c{n}") for n in range(conditions)]
    mapped, issues = _map(*conds, _stage())
    assert MCODE + "mcode-tnm-stage-group" not in _profiles(_nth(mapped, conditions + 1))
    assert any(i.get("expression", [""])[0].endswith(".focus") for i in issues)


def test_stage_group_without_method_not_claimed() -> None:
    stage = _stage("Condition/c1")
    del stage["method"]
    mapped, issues = _map(_condition(ICD10, "C18.9"), stage)
    assert not _profiles(_nth(mapped, 2))
    assert any("MC-22" in i["diagnostics"] for i in issues)


def test_t_category_claimed_and_with_has_member_not() -> None:
    t_cat = _obs(SCT, "399504009", "t1", valueCodeableConcept=_cc(SCT, "1228938002"))
    t_cat.update(method=METHOD, focus=[{"reference": "Condition/c1"}])
    bad = {**t_cat, "id": "t2", "hasMember": [{"reference": "Observation/t1"}]}
    mapped, _ = _map(_condition(ICD10, "C18.9"), t_cat, bad)
    assert MCODE + "mcode-tnm-primary-tumor-category" in _profiles(_nth(mapped, 2))
    assert MCODE + "mcode-tnm-primary-tumor-category" not in _profiles(_nth(mapped, 3))


def test_official_stage_group_example_without_focus_is_reported_not_claimed() -> None:
    resources, issues, _ = map_one(
        FIXTURES / "fhir" / "Observation-mCODETNMClinicalStageGroupExample01.json"
    )
    assert "profile" not in resources[0]["meta"]
    assert any(i.get("expression", [""])[0].endswith(".focus") for i in issues)


def test_official_secondary_and_tumor_marker_examples_claimed() -> None:
    secondary, _, _ = map_one(
        FIXTURES / "fhir" / "Condition-mCODESecondaryCancerConditionExample01.json"
    )
    assert MCODE + "mcode-secondary-cancer-condition" in _profiles(secondary[0])
    marker, _, _ = map_one(FIXTURES / "fhir" / "Observation-mCODETumorMarkerExample01.json")
    assert MCODE + "mcode-tumor-marker-test" in _profiles(marker[0])  # LOINC 39004-7


def test_synthea_colon_cancer_claimed() -> None:
    resources, _, _ = map_one(FIXTURES / "fhir" / "colon_Darin_Skiles.json")
    claimed = {p for r in resources for p in _profiles(r)}
    assert {MCODE + "mcode-primary-cancer-condition", MCODE + "mcode-cancer-patient"} <= claimed


# --- tumour markers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "value"),
    [
        (
            "2039-6",
            {"valueQuantity": {"value": 3.1, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"}},
        ),
        (
            "2857-1",
            {"valueQuantity": {"value": 4, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"}},
        ),
        (
            "24108-3",
            {"valueQuantity": {"value": 40, "unit": "U/mL", "system": UCUM, "code": "U/mL"}},
        ),
        (
            "10334-1",
            {"valueQuantity": {"value": 30, "unit": "U/mL", "system": UCUM, "code": "U/mL"}},
        ),
        (
            "1834-1",
            {"valueQuantity": {"value": 8, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"}},
        ),
        ("48676-1", {"valueCodeableConcept": _cc(LOINC, "LA6576-8")}),
        ("85337-4", {"valueCodeableConcept": _cc(LOINC, "LA6576-8")}),
        ("85339-0", {"valueString": "positive"}),
        ("29593-5", {"valueQuantity": {"value": 20, "unit": "%", "system": UCUM, "code": "%"}}),
        ("49683-6", {"valueRatio": {"numerator": {"value": 2.4}, "denominator": {"value": 1}}}),
    ],
)
def test_tumor_marker_claimed(code: str, value: dict[str, Any]) -> None:
    mapped, _ = _map(_obs(LOINC, code, **value))
    assert MCODE + "mcode-tumor-marker-test" in _profiles(_nth(mapped, 1))


@pytest.mark.parametrize(
    "value", [{"valueBoolean": True}, {"valueInteger": 4}, {"valueDateTime": "2024-01-01"}]
)
def test_psa_with_disallowed_value_type_not_claimed(value: dict[str, Any]) -> None:
    mapped, issues = _map(_obs(LOINC, "2857-1", **value))
    assert MCODE + "mcode-tumor-marker-test" not in _profiles(_nth(mapped, 1))
    assert any("MC-25" in i["diagnostics"] for i in issues)


def test_psa_without_value_not_claimed() -> None:
    obs = _obs(
        LOINC,
        "2857-1",
        dataAbsentReason=_cc("http://terminology.hl7.org/CodeSystem/data-absent-reason", "unknown"),
    )
    assert MCODE + "mcode-tumor-marker-test" not in _profiles(_nth(_map(obs)[0], 1))


@pytest.mark.parametrize(
    ("code", "given", "unit", "expected"),
    [
        ("2039-6", 2.5, "ug/L", 2.5),  # CEA
        ("2857-1", 0.004, "ug/mL", 4.0),  # PSA
        ("10334-1", 35, "kU/L", 35.0),  # CA-125
    ],
)
def test_marker_converted_to_canonical_unit_and_original_kept(
    code: str, given: float, unit: str, expected: float
) -> None:
    quantity = {"value": given, "unit": unit, "system": UCUM, "code": unit}
    mapped, issues = _map(_obs(LOINC, code, valueQuantity=quantity))
    value = _nth(mapped, 1)["valueQuantity"]
    assert value["value"] == pytest.approx(expected)
    assert value["code"] != unit
    original = value["extension"][0]
    assert original["url"] == PQ_TRANSLATION
    assert original["valueQuantity"] == quantity
    assert any("converted" in i["diagnostics"] for i in issues)


def test_marker_in_other_dimension_kept_and_reported() -> None:
    quantity = {"value": 1.0, "unit": "nmol/L", "system": UCUM, "code": "nmol/L"}
    mapped, issues = _map(_obs(LOINC, "2039-6", valueQuantity=quantity))
    assert _nth(mapped, 1)["valueQuantity"] == quantity
    assert any("not convertible" in i["diagnostics"] for i in issues)


def test_convert() -> None:
    assert convert(1, "ug/L", "ng/mL") == 1.0
    assert convert(1, "mg", "ng/mL") is None


# --- performance status, tumour size ------------------------------------------------------


@pytest.mark.parametrize(("code", "profile"), [("89247-1", "ecog"), ("89243-0", "karnofsky")])
def test_performance_status(code: str, profile: str) -> None:
    good = _obs(LOINC, code, "ps1", valueInteger=1, category=[_cc(OBS_CAT, "survey")])
    bad = {
        **good,
        "id": "ps2",
        "valueInteger": None,
        "valueCodeableConcept": _cc(LOINC, "LA9623-5"),
    }
    del bad["valueInteger"]
    mapped, _ = _map(good, bad)
    assert MCODE + f"mcode-{profile}-performance-status" in _profiles(_nth(mapped, 1))
    assert MCODE + f"mcode-{profile}-performance-status" not in _profiles(_nth(mapped, 2))


def _size(oid: str, unit: str = "cm", **extra: Any) -> dict[str, Any]:
    comp = {
        "code": _cc(LOINC, "33728-7"),
        "valueQuantity": {"value": 2.3, "unit": unit, "system": UCUM, "code": unit},
    }
    return _obs(LOINC, "21889-1", oid, component=[comp], **extra)


def test_tumor_size() -> None:
    specimen = {
        "resourceType": "Specimen", "id": "sp1", "type": _cc(V2_0487, "TUMOR"),
        "subject": {"reference": "Patient/p"},
    }  # fmt: skip
    good = _size("ts1", specimen={"reference": "Specimen/sp1"})
    neither = _size("ts2")
    both = _size(
        "ts3", specimen={"reference": "Specimen/sp1"}, focus=[{"reference": "BodyStructure/b"}]
    )
    inch = _size("ts4", unit="[in_i]", specimen={"reference": "Specimen/sp1"})
    mapped, issues = _map(_condition(ICD10, "C50.911"), specimen, good, neither, both, inch)
    assert MCODE + "mcode-tumor-size" in _profiles(_nth(mapped, 3))
    for n in (4, 5, 6):
        assert MCODE + "mcode-tumor-size" not in _profiles(_nth(mapped, n))
    assert sum("must-have-focus-or-specimen" in i["diagnostics"] for i in issues) == 2
    assert MCODE + "mcode-human-specimen" in _profiles(_nth(mapped, 2))


def test_specimen_without_cancer_is_us_core_only() -> None:
    specimen = {
        "resourceType": "Specimen",
        "id": "sp1",
        "type": _cc(SCT, "119376003"),
        "subject": {"reference": "Patient/p"},
    }
    assert _profiles(_nth(_map(specimen)[0], 1)) == [US_CORE + "us-core-specimen"]


# --- treatments -------------------------------------------------------------------------


def _med_request(mid: str, drug: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest", "id": mid, "status": "active", "intent": "order",
        "medicationCodeableConcept": _cc(RXNORM, drug), "subject": {"reference": "Patient/p"},
        "authoredOn": "2024-01-01", "requester": {"reference": "Practitioner/x"}, **extra,
    }  # fmt: skip


def test_cancer_related_medication_request() -> None:
    by_reason = _med_request("m1", "198211", reasonReference=[{"reference": "Condition/c1"}])
    by_drug = _med_request("m2", "1736854")  # in the cancer-medication list, no reason: warned
    other = _med_request("m3", "198211", reasonReference=[{"reference": "Condition/c9"}])
    mapped, issues = _map(
        _condition(ICD10, "C50.911"), _condition(ICD10, "I10", "c9"), by_reason, by_drug, other
    )
    profile = MCODE + "mcode-cancer-related-medication-request"
    assert profile in _profiles(_nth(mapped, 3))
    assert profile in _profiles(_nth(mapped, 4))
    assert profile not in _profiles(_nth(mapped, 5))
    assert US_CORE + "us-core-medicationrequest" in _profiles(_nth(mapped, 5))
    assert any("mcode-reason-required" in i["diagnostics"] for i in issues)


def test_cancer_related_medication_administration() -> None:
    admin = {
        "resourceType": "MedicationAdministration", "id": "a1", "status": "completed",
        "medicationCodeableConcept": _cc(RXNORM, "1736854"), "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2024-01-01", "reasonReference": [{"reference": "Condition/c1"}],
    }  # fmt: skip
    stopped_wrongly = {
        **admin,
        "id": "a2",
        "status": "completed",
        "statusReason": [_cc(SCT, "182992009")],
    }
    mapped, _ = _map(_condition(ICD10, "C50.911"), admin, stopped_wrongly)
    assert _profiles(_nth(mapped, 2)) == [MCODE + "mcode-cancer-related-medication-administration"]
    assert not _profiles(_nth(mapped, 3))


def _procedure(pid: str, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Procedure", "id": pid, "status": "completed", "code": _cc(SCT, code),
        "subject": {"reference": "Patient/p"}, **extra,
    }  # fmt: skip


def test_cancer_related_surgery_and_radiotherapy_course() -> None:
    period = {"performedPeriod": {"start": "2024-01-01", "end": "2024-02-01"}}
    reason = {"reasonReference": [{"reference": "Condition/c1"}]}
    surgery = _procedure("s1", "392021009", **period, **reason)  # lumpectomy
    polyp = _procedure("s2", "274031008", **period, reasonCode=[_cc(SCT, "68496003")])
    course = _procedure("r1", "1217123003", **period, **reason)
    course_dt = _procedure("r2", "1217123003", performedDateTime="2024-01-01", **reason)
    mapped, _ = _map(_condition(ICD10, "C50.911"), surgery, polyp, course, course_dt)
    assert MCODE + "mcode-cancer-related-surgical-procedure" in _profiles(_nth(mapped, 2))
    assert MCODE + "mcode-cancer-related-surgical-procedure" not in _profiles(_nth(mapped, 3))
    assert MCODE + "mcode-radiotherapy-course-summary" in _profiles(_nth(mapped, 4))
    assert MCODE + "mcode-radiotherapy-course-summary" not in _profiles(_nth(mapped, 5))


# --- genomics ---------------------------------------------------------------------------


def test_genomics() -> None:
    gene = {
        "code": _cc(LOINC, "48018-6"),
        "valueCodeableConcept": _cc("http://www.genenames.org", "HGNC:1100"),
    }
    variant = _obs(
        LOINC, "69548-6", "g1", valueCodeableConcept=_cc(LOINC, "LA9633-4"), component=[gene]
    )
    no_component = _obs(LOINC, "69548-6", "g2", valueCodeableConcept=_cc(LOINC, "LA9633-4"))
    region = _obs(LOINC, "53041-0", "g3", component=[gene])
    report = {
        "resourceType": "DiagnosticReport", "id": "d1", "status": "final",
        "code": _cc(LOINC, "81247-9"),
        "category": [_cc(V2_0074, "GE")], "subject": {"reference": "Patient/p"},
        "result": [{"reference": "Observation/g1"}, {"reference": "Observation/g3"}],
    }  # fmt: skip
    no_ge = {**report, "id": "d2", "category": [_cc(V2_0074, "LAB")]}
    mapped, _ = _map(variant, no_component, region, report, no_ge)
    assert MCODE + "mcode-genomic-variant" in _profiles(_nth(mapped, 1))
    assert MCODE + "mcode-genomic-variant" not in _profiles(_nth(mapped, 2))
    assert MCODE + "mcode-genomic-region-studied" in _profiles(_nth(mapped, 3))
    assert MCODE + "mcode-genomics-report" in _profiles(_nth(mapped, 4))
    assert MCODE + "mcode-genomics-report" not in _profiles(_nth(mapped, 5))
