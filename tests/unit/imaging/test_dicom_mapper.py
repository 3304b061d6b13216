"""mappers.dicom: DICOM -> FHIR R4 ImagingStudy + Endpoint (FHIR R4 ImagingStudy, PS3.18 F)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy

from fhir_gateway.errors import MappingError, ParseError
from mappers.dicom import (
    WSI_SOP_CLASS,
    dataset_patient_name,
    dataset_to_imaging_study,
    datasets_to_imaging_studies,
    datasets_to_imaging_study,
    parse_part10,
    person_name_to_human_names,
)

DICOM = Path(__file__).resolve().parents[3] / "fixtures" / "dicom"
SUBJECT = {"reference": "Patient/p1"}
URL = "https://gw.example/cases/c1/dicom-web"

# Expected Unicode of Patient's Name, from the corpus README (pydicom charset_files).
NAMES: dict[str, str] = json.loads(
    (DICOM / "charsets" / "expected_names.json").read_text(encoding="utf-8")
)["names"]


def read(rel: str) -> pydicom.Dataset:
    return parse_part10((DICOM / rel).read_bytes())


@pytest.mark.parametrize(("name", "expected"), sorted(NAMES.items()))
def test_patient_name_decoded_from_specific_character_set(name, expected):
    assert dataset_patient_name(read(f"charsets/{name}")) == expected


def test_ideographic_and_phonetic_groups_become_further_names():
    names = person_name_to_human_names(read("charsets/chrH31.dcm").PatientName)
    assert [(n["use"], n["family"], n["given"]) for n in names] == [
        ("official", "Yamada", ["Tarou"]),
        ("usual", "山田", ["太郎"]),
        ("usual", "やまだ", ["たろう"]),
    ]


def test_ct_series_to_imaging_study_validates_and_counts():
    datasets = [read(f"series_77654033_CT2/{n}.dcm") for n in (17106, 17136, 17166, 17196)]
    study, endpoint = datasets_to_imaging_study(datasets, SUBJECT, URL)
    ImagingStudy.model_validate(study)
    Endpoint.model_validate(endpoint)
    uid = str(datasets[0].StudyInstanceUID)
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}
    assert study["numberOfSeries"] == 1
    assert study["numberOfInstances"] == 4 == len(study["series"][0]["instance"])
    assert study["modality"] == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
    ]
    assert study["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == URL
    sop_classes = {i["sopClass"]["code"] for i in study["series"][0]["instance"]}
    assert sop_classes == {"urn:oid:1.2.840.10008.5.1.4.1.1.2"}
    numbers = [i["number"] for i in study["series"][0]["instance"]]
    assert numbers == sorted(numbers)
    assert study["subject"] == SUBJECT


def test_same_input_same_ids():
    a, _ = dataset_to_imaging_study(read("ct/CT_small.dcm"), SUBJECT, URL)
    b, _ = dataset_to_imaging_study(read("ct/CT_small.dcm"), SUBJECT, URL)
    assert a == b


def test_body_site_and_laterality_coded():
    ds = read("ct/CT_small.dcm")
    ds.BodyPartExamined, ds.Laterality = "CHEST", "L"
    study, _ = dataset_to_imaging_study(ds, SUBJECT, URL)
    series = study["series"][0]
    assert series["bodySite"]["code"] == "51185008"
    assert series["laterality"]["code"] == "7771000"
    ImagingStudy.model_validate(study)


def test_whole_slide_microscopy_series_described_by_image_type():
    volume = read("sm/sm_image.dcm")
    label = read("sm/sm_image.dcm")
    label.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    label.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    study, _ = datasets_to_imaging_study([volume, label], SUBJECT, URL)
    series = study["series"][0]
    assert str(volume.SOPClassUID) == WSI_SOP_CLASS
    assert "Whole slide microscopy: LABEL, VOLUME" in series["description"]
    assert sorted(i["title"] for i in series["instance"]) == ["LABEL", "VOLUME"]
    assert series["modality"]["code"] == "SM"
    ImagingStudy.model_validate(study)


def test_several_studies_split():
    datasets = [
        read("ct/CT_small.dcm"),
        read("mr/MR_small.dcm"),
        read("series_77654033_CR1/6154.dcm"),
    ]
    out = datasets_to_imaging_studies(datasets, SUBJECT, URL)
    assert [r["resourceType"] for r in out] == ["Endpoint"] + ["ImagingStudy"] * 3
    with pytest.raises(MappingError):
        datasets_to_imaging_study(datasets, SUBJECT, URL)


def test_dicom_json_input():
    data = json.loads((DICOM / "test1.json").read_text(encoding="utf-8"))
    study, _ = dataset_to_imaging_study(data, SUBJECT, URL)
    ImagingStudy.model_validate(study)
    assert study["identifier"][0]["value"] == "urn:oid:" + data["0020000D"]["Value"][0]


def test_missing_uid_is_a_mapping_error():
    ds = read("charsets/chrSQEncoding.dcm")  # no Study Instance UID
    with pytest.raises(MappingError, match="StudyInstanceUID"):
        dataset_to_imaging_study(ds, SUBJECT, URL)


def test_header_less_bytes_are_a_parse_error():
    with pytest.raises(ParseError):
        parse_part10((DICOM / "bad" / "no_meta.dcm").read_bytes())


def test_started_keeps_only_the_date_without_a_timezone():
    ds = read("ct/CT_small.dcm")
    del ds.TimezoneOffsetFromUTC
    study, _ = dataset_to_imaging_study(ds, SUBJECT, URL)
    assert study["started"] == f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}"
    ds.TimezoneOffsetFromUTC = "+0100"
    study, _ = dataset_to_imaging_study(ds, SUBJECT, URL)
    assert study["started"].endswith("+01:00")
