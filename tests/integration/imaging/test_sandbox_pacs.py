"""The file-backed sandbox PACS as a DICOMweb source for the real pull path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import requests
from sqlalchemy import delete

from connectors.dicomweb import DicomwebClient
from fhir_gateway.imaging.retrieval import pull_case_images, study_selectors_for_case
from fhir_gateway.imaging.store import FileImageStore
from fhir_gateway.sandbox.pacs import PacsServer
from fhir_gateway.store import Store
from fhir_gateway.store.models import ImageInstance
from tests.integration.imaging.cases import make_case, study_ref
from tests.integration.imaging.conftest import DICOM

CT2 = sorted((DICOM / "series_77654033_CT2").glob("*.dcm"))
MR1 = sorted((DICOM / "series_98892003_MR1").glob("*.dcm"))


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_pull_from_the_sandbox_pacs_keeps_the_bytes(
    gw_store: Store, file_store: FileImageStore, http: requests.Session, tmp_path: Path
) -> None:
    folder = tmp_path / "pacs"
    folder.mkdir()
    for p in [*CT2, *MR1]:
        shutil.copy(p, folder / f"{p.parent.name}-{p.name}")
    (folder / "junk.dcm").write_bytes(b"not dicom")  # skipped when indexing, not served
    case_id = make_case(gw_store, supporting_info=[study_ref(study_of(CT2[0]))])
    with PacsServer(folder) as pacs:
        # page_size 2: the client pages with limit/offset and the PACS's Warning header
        client = DicomwebClient(http, pacs.base_url, page_size=2)
        assert len(client.search_instances(study_of(CT2[0]), _series(CT2[0]))) == len(CT2)
        selectors = study_selectors_for_case(gw_store, case_id, None)
        counts = pull_case_images(gw_store, case_id, client, file_store, selectors)
        assert counts.instances == len(CT2)
        assert counts.rejected == []
        held = {r.sop_uid: r for r in file_store.iter_instances(case_id)}
        for path in CT2:
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            with file_store.open_instance(held[sop]) as fh:
                assert fh.read() == path.read_bytes()
        # a partly held series is completed instance by instance (WADO-RS RetrieveInstance)
        lost = sorted(held)[0]
        with gw_store.session() as s:
            s.execute(delete(ImageInstance).where(ImageInstance.sop_uid == lost))
        again = pull_case_images(gw_store, case_id, client, file_store, selectors)
        assert again.instances == 1
        assert again.skipped == len(CT2) - 1
        assert {r.sop_uid for r in file_store.iter_instances(case_id)} == set(held)
    # each pull's staging directory is gone: its parts were moved into the store
    assert list((file_store.root.parents[1] / "tmp" / "wado").iterdir()) == []


def test_sandbox_pacs_answers_404_for_unknown_studies(http: requests.Session) -> None:
    with PacsServer(DICOM / "series_77654033_CT2") as pacs:
        r = http.get(f"{pacs.base_url}/studies/1.2.3", timeout=10)
        assert r.status_code == 404
        assert r.json()["resourceType"] == "OperationOutcome"
        studies = http.get(f"{pacs.base_url}/studies", timeout=10).json()
        assert [s["0020000D"]["Value"][0] for s in studies] == [study_of(CT2[0])]


def _series(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
