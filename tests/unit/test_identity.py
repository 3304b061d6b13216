"""The identity rule (fhir_gateway.casebundle.identity, docs/identity.md): match, probable and
mismatch from identifiers (system- and issuer-aware), names (FHIR HumanName, DICOM PN, accents,
non-Latin scripts), birth date and sex; missing fields; never a value in the verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from fhir_gateway.casebundle.identity import (
    MATCH,
    MISMATCH,
    PROBABLE,
    Demographics,
    compare,
    dataset_to_demographics,
    normalise_name,
    patient_to_demographics,
    person_name_variants,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
MRN = "http://hospital.smarthealthit.org"
SSN = "http://hl7.org/fhir/sid/us-ssn"


def patient(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [
            {"system": MRN, "value": "31c343e9"},
            {"system": SSN, "value": "999-37-4676"},
        ],
        "name": [{"use": "official", "family": "Skiles", "given": ["Darin"], "prefix": ["Mr."]}],
        "birthDate": "1967-01-21",
        "gender": "male",
    }
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


REFERRAL = patient_to_demographics(patient())


def study(**attrs: Any) -> Dataset:
    ds = Dataset()
    values = {
        "PatientID": "31c343e9",
        "IssuerOfPatientID": MRN,
        "PatientName": "Skiles^Darin",
        "PatientBirthDate": "19670121",
        "PatientSex": "M",
    }
    values.update(attrs)
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def check(candidate: Demographics) -> tuple[str, list[str], list[str]]:
    v = compare(REFERRAL, candidate)
    return v.outcome, list(v.differ), list(v.unconfirmed)


# --- FHIR Patient against the referral's Patient --------------------------------------------


def test_same_patient_matches() -> None:
    assert check(patient_to_demographics(patient())) == (MATCH, [], [])


def test_identifier_match_without_other_fields_matches() -> None:
    only_id = patient(
        name=None, birthDate=None, gender=None, identifier=[{"system": SSN, "value": "999-37-4676"}]
    )
    assert check(patient_to_demographics(only_id)) == (MATCH, [], ["name", "birthDate", "sex"])


def test_identifier_match_with_contradicting_birth_date_is_a_mismatch() -> None:
    assert check(patient_to_demographics(patient(birthDate="1967-01-22"))) == (
        MISMATCH,
        ["birthDate"],
        [],
    )


def test_other_value_in_the_same_system_is_a_mismatch_even_if_the_rest_agrees() -> None:
    other = patient(identifier=[{"system": MRN, "value": "00000000"}])
    assert check(patient_to_demographics(other)) == (MISMATCH, ["identifier"], [])


def test_same_value_in_another_system_is_not_a_shared_identifier() -> None:
    other = patient(identifier=[{"system": "urn:other", "value": "31c343e9"}], gender=None)
    assert check(patient_to_demographics(other)) == (MISMATCH, [], ["identifier", "sex"])


def test_no_identifier_in_common_but_name_birth_date_and_sex_agree_is_probable() -> None:
    other = patient(identifier=[{"system": "urn:other-hospital", "value": "A17"}])
    assert check(patient_to_demographics(other)) == (PROBABLE, [], ["identifier"])


def test_fuzzy_name_typo_and_case_still_probable() -> None:
    other = patient(identifier=[], name=[{"family": "SKILLES", "given": ["darin"]}])
    assert check(patient_to_demographics(other))[0] == PROBABLE


def test_a_different_name_is_a_mismatch_naming_only_the_field() -> None:
    other = patient(name=[{"family": "Alcántar", "given": ["Lourdes"]}])
    verdict = compare(REFERRAL, patient_to_demographics(other))
    assert (verdict.outcome, verdict.differ) == (MISMATCH, ("name",))
    assert "Lourdes" not in json.dumps(verdict.as_dict())
    assert "Skiles" not in json.dumps(verdict.as_dict())


def test_sex_differs() -> None:
    assert check(patient_to_demographics(patient(gender="female"))) == (MISMATCH, ["sex"], [])


def test_unknown_gender_is_not_a_contradiction() -> None:
    assert check(patient_to_demographics(patient(gender="unknown"))) == (MATCH, [], ["sex"])


def test_partial_birth_date_agrees_at_its_precision() -> None:
    assert check(patient_to_demographics(patient(birthDate="1967"))) == (MATCH, [], [])
    assert check(patient_to_demographics(patient(birthDate="1968")))[1] == ["birthDate"]


def test_nothing_to_compare_is_held_as_unconfirmed_mismatch() -> None:
    bare = patient_to_demographics({"resourceType": "Patient"})
    assert bare.empty
    assert check(bare) == (MISMATCH, [], ["identifier", "name", "birthDate", "sex"])


def test_name_alone_without_birth_date_is_not_enough() -> None:
    other = patient(identifier=[], birthDate=None)
    assert check(patient_to_demographics(other)) == (MISMATCH, [], ["identifier", "birthDate"])


def test_middle_name_on_one_side_only_still_agrees() -> None:
    other = patient(identifier=[], name=[{"family": "Skiles", "given": ["Darin", "James"]}])
    assert check(patient_to_demographics(other))[0] == PROBABLE


def test_name_text_only() -> None:
    other = patient(identifier=[], name=[{"text": "Darin Skiles"}])
    assert check(patient_to_demographics(other))[0] == PROBABLE


def test_urn_oid_and_bare_oid_are_one_system() -> None:
    ref = patient_to_demographics(patient(identifier=[{"system": "urn:oid:1.2.3", "value": "X"}]))
    dicom = dataset_to_demographics(study(PatientID="X", IssuerOfPatientID="1.2.3"))
    assert compare(ref, dicom).outcome == MATCH


# --- names: accents, scripts, DICOM PN ------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Alcántar", "ALCANTAR"),
        ("Jérôme Buc", "jerome  buc"),
        ("Äneas Rüdiger", "Aneas Rudiger"),
        ("O'Brien-Smith", "obrien smith"),
    ],
)
def test_names_fold_case_accents_and_punctuation(a: str, b: str) -> None:
    assert normalise_name(a).replace(" ", "") == normalise_name(b).replace(" ", "")


def test_dicom_pn_groups_and_components() -> None:
    variants = person_name_variants("Yamada^Tarou^^Mr.=山田^太郎=やまだ^たろう")
    assert "yamada tarou" in variants
    assert normalise_name("山田 太郎") in variants
    assert normalise_name("やまだ たろう") in variants
    assert all("mr" not in v.split() for v in variants)  # prefix left out


@pytest.mark.parametrize(
    ("file", "fhir_name"),
    [
        ("chrFren.dcm", {"family": "Buc", "given": ["Jerome"]}),
        ("chrGerm.dcm", {"family": "ÄNEAS", "given": ["Rüdiger"]}),
        ("chrH31.dcm", {"family": "山田", "given": ["太郎"]}),
        ("chrI2.dcm", {"family": "Hong", "given": ["Gildong"]}),
        ("chrX1.dcm", {"family": "王", "given": ["小東"]}),
        ("chrJapMulti.dcm", {"family": "やまだ", "given": ["たろう"]}),
    ],
)
def test_non_ascii_dicom_names_agree_with_fhir_names(file: str, fhir_name: dict[str, Any]) -> None:
    """Real Part 10 files in their Specific Character Sets (pydicom decodes; DW-41)."""
    ds = pydicom.dcmread(FIXTURES / "dicom" / "charsets" / file, stop_before_pixels=True)
    dicom = dataset_to_demographics(ds)
    ref = Demographics(names=tuple(patient_to_demographics({"name": [fhir_name]}).names))
    # Only the name is on both sides: agreeing names alone stay unconfirmed (not a match).
    verdict = compare(ref, dicom)
    assert "name" not in verdict.differ
    assert "name" not in verdict.unconfirmed


def test_non_ascii_different_people_differ() -> None:
    ds = pydicom.dcmread(FIXTURES / "dicom" / "charsets" / "chrX1.dcm", stop_before_pixels=True)
    ref = patient_to_demographics({"name": [{"family": "山田", "given": ["太郎"]}]})
    assert compare(ref, dataset_to_demographics(ds)).differ == ("name",)


# --- DICOM studies, issuer-aware ------------------------------------------------------------


def test_dicom_study_of_the_patient_matches() -> None:
    assert check(dataset_to_demographics(study())) == (MATCH, [], [])


def test_dicom_other_patient_id_under_the_same_issuer_is_a_mismatch() -> None:
    assert check(dataset_to_demographics(study(PatientID="77654033")))[1] == ["identifier"]


def test_dicom_issuer_from_the_partners_file_when_the_file_has_none() -> None:
    ds = study(IssuerOfPatientID=None, PatientID="77654033")
    assert check(dataset_to_demographics(ds, default_issuer=MRN))[1] == ["identifier"]
    same = study(IssuerOfPatientID=None)
    assert check(dataset_to_demographics(same, default_issuer=MRN))[0] == MATCH


def test_dicom_id_of_another_issuer_neither_agrees_nor_contradicts() -> None:
    ds = study(IssuerOfPatientID="RADIOLOGY-PACS", PatientID="77654033")
    assert check(dataset_to_demographics(ds)) == (PROBABLE, [], ["identifier"])


def test_dicom_id_without_any_issuer_is_compared_by_value_only() -> None:
    same = study(IssuerOfPatientID=None, PatientName=None, PatientBirthDate=None)
    assert check(dataset_to_demographics(same))[0] == MATCH
    other = study(IssuerOfPatientID=None, PatientID="77654033")
    assert check(dataset_to_demographics(other)) == (PROBABLE, [], ["identifier"])


def test_the_original_demo_ct_is_someone_else() -> None:
    """The CT series the demo shipped with (Doe^Archibald, no birth date or sex)."""
    path = FIXTURES / "dicom" / "series_77654033_CT2" / "17106.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert check(dataset_to_demographics(ds)) == (
        MISMATCH,
        ["name"],
        ["identifier", "birthDate", "sex"],
    )


def test_dicom_missing_everything() -> None:
    assert dataset_to_demographics(Dataset()).empty
    assert check(dataset_to_demographics(Dataset()))[0] == MISMATCH


def test_dicom_sex_other() -> None:
    d = dataset_to_demographics(study(PatientSex="O"))
    assert (d.sex, d.birth_date) == ("other", "1967-01-21")
    assert check(d)[1] == ["sex"]
