"""Cases with images, pulled the production way (`pull_case_images` from the sandbox PACS over
loopback DICOMweb into the file image store), for the rendered/thumbnail and viewer tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import requests

from connectors.dicomweb import DicomwebClient
from fhir_gateway.imaging.retrieval import pull_case_images, study_selectors_for_case
from fhir_gateway.imaging.store import FileImageStore
from fhir_gateway.sandbox.pacs import PacsServer
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from tests.conftest import FIXTURES
from tests.integration.imaging.cases import make_case, study_ref

DICOM = FIXTURES / "dicom"
CT2 = sorted((DICOM / "series_77654033_CT2").glob("*.dcm"))
CT_SMALL = DICOM / "ct" / "CT_small.dcm"
MR_RLE = FIXTURES / "rendering" / "MR_small_RLE.dcm"  # same SOP UID as MR_small.dcm


def uid(path: Path, attr: str = "StudyInstanceUID") -> str:
    return str(getattr(pydicom.dcmread(path, stop_before_pixels=True), attr))


def load_cases(
    store: Store, settings: Settings, cases: dict[str, list[Path]], pacs_dir: Path
) -> None:
    """Each case gets the studies of its files (referenced by its ServiceRequest), pulled."""
    pacs_dir.mkdir(parents=True, exist_ok=True)
    for files in cases.values():
        for p in files:
            shutil.copy(p, pacs_dir / f"{p.parent.name}-{p.name}")
    for case_id, files in cases.items():
        studies = sorted({uid(p) for p in files})
        make_case(store, case_id, supporting_info=[study_ref(s) for s in studies])
    images = FileImageStore(store, settings.data_dir)
    with PacsServer(pacs_dir) as pacs, requests.Session() as http:
        for case_id in cases:
            client = DicomwebClient(http, pacs.base_url)
            selectors = study_selectors_for_case(store, case_id, None)
            counts = pull_case_images(store, case_id, client, images, selectors)
            assert counts.rejected == []


def assign(base_url: str, admin: dict[str, str], case_id: str, reviewer: str) -> None:
    r = requests.post(
        f"{base_url}/cases/{case_id}/assignments", json={"reviewer": reviewer}, headers=admin
    )
    assert r.status_code == 201, r.text
