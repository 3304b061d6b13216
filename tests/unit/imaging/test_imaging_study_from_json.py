"""The imaging pull describes studies from the DICOM JSON kept at ingest, restricted to
`IMAGING_STUDY_KEYWORDS`: the ImagingStudy must be the one the full headers give."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import tag_for_keyword

from fhir_gateway.imaging.store import dataset_json
from mappers.dicom import IMAGING_STUDY_KEYWORDS, datasets_to_imaging_studies, json_to_dataset
from tests.conftest import FIXTURES

STUDIES = sorted(p for p in (FIXTURES / "dicom").iterdir() if p.is_dir())
TAGS = {f"{tag_for_keyword(k):08X}" for k in IMAGING_STUDY_KEYWORDS}


def _headers(folder: Path) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for path in sorted(folder.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if "StudyInstanceUID" in ds:
            out.append(ds)
    return out


@pytest.mark.parametrize("folder", STUDIES, ids=lambda p: p.name)
def test_restricted_json_gives_the_same_imaging_study(folder: Path) -> None:
    full = _headers(folder)
    if not full:
        pytest.skip("no DICOM with a study here")
    restricted = []
    for ds in full:
        text = json.dumps(dataset_json(ds))  # what the image index keeps
        attrs = {t: e for t, e in json.loads(text).items() if t in TAGS}
        restricted.append(json_to_dataset(attrs))
    subject = {"reference": "Patient/p"}
    expected = datasets_to_imaging_studies(full, subject, "http://gw/dicom-web")
    assert datasets_to_imaging_studies(restricted, subject, "http://gw/dicom-web") == expected
