"""Per-case DICOMweb on the Orthanc image-store backend: real source Orthanc -> pull into a
real store Orthanc -> reviewers read the case's study through `/cases/{id}/dicom-web`."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from connectors.dicomweb import DicomwebClient
from connectors.multipart import PartData, PartEnd, PartStart, boundary_of, iter_events
from fhir_gateway.app import create_app
from fhir_gateway.imaging.job import build_image_store
from fhir_gateway.imaging.retrieval import pull_case_images, study_selectors_for_case
from fhir_gateway.imaging.store import OrthancImageStore
from fhir_gateway.sandbox.server import AppServer
from fhir_gateway.settings import ImageSettings, Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import AuditRow
from tests.conftest import Tokens
from tests.integration.imaging.cases import make_case, study_ref
from tests.servers.orthanc import OrthancServer, run_orthanc

pytestmark = pytest.mark.server


def bodies(resp: requests.Response) -> list[bytes]:
    out, body = [], bytearray()
    for event in iter_events([resp.content], boundary_of(resp.headers["content-type"])):
        if isinstance(event, PartStart):
            body = bytearray()
        elif isinstance(event, PartData):
            body += event.data
        elif isinstance(event, PartEnd):
            out.append(bytes(body))
    return out


def test_reviewer_reads_a_case_held_in_orthanc(
    orthanc: OrthancServer,
    corpus_studies: dict[str, list[Path]],
    gw_store: Store,
    settings: Settings,
    tokens: Tokens,
    http: requests.Session,
    tmp_path: Path,
) -> None:
    study = next(u for u, files in corpus_studies.items() if len(files) == 4)
    other = next(u for u, files in corpus_studies.items() if u != study)
    with run_orthanc(tmp_path / "store", aet="GWSTORE") as target:
        cfg = settings.model_copy(
            update={"images": ImageSettings(backend="orthanc", orthanc_url=target.url)}
        )
        images = build_image_store(cfg, gw_store, http)
        assert isinstance(images, OrthancImageStore)
        source = DicomwebClient(http, orthanc.dicomweb_url)
        for case_id, uid in (("case-a", study), ("case-b", other)):
            make_case(gw_store, case_id, supporting_info=[study_ref(uid)])
            selectors = study_selectors_for_case(gw_store, case_id, None)
            assert pull_case_images(gw_store, case_id, source, images, selectors).instances
        app = create_app(cfg, store=gw_store, configure_logs=False)
        with AppServer(app) as gw:
            admin = tokens.headers("admin", sub="op")
            assign = {"reviewer": "rev-1"}
            r = http.post(f"{gw.url}/cases/case-a/assignments", json=assign, headers=admin)
            assert r.status_code == 201
            root = f"{gw.url}/cases/case-a/dicom-web"
            reviewer = tokens.headers("reviewer", sub="rev-1")
            got = http.get(f"{root}/studies/{study}", headers=reviewer)
            assert got.status_code == 200, got.text
            held = {
                str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in corpus_studies[study]
            }
            in_orthanc = []
            for sop in sorted(held):
                oid = http.post(f"{target.url}/tools/lookup", data=sop, timeout=10).json()[0]["ID"]
                in_orthanc.append(
                    http.get(f"{target.url}/instances/{oid}/file", timeout=10).content
                )
            assert sorted(bodies(got)) == sorted(in_orthanc)
            [found] = http.get(f"{root}/studies", headers=reviewer).json()
            assert found["00201208"]["Value"] == [len(held)]
            assert http.get(f"{root}/studies/{study}").status_code == 401
            rev2 = tokens.headers("reviewer", sub="rev-2")
            assert http.get(f"{root}/studies/{study}", headers=rev2).status_code == 403
            assert http.get(f"{root}/studies/{other}", headers=admin).status_code == 404
            session = requests.Session()
            session.headers.update(reviewer)
            viewer = DICOMwebClient(root, session=session)
            datasets = viewer.retrieve_study(study)
            assert {str(d.SOPInstanceUID) for d in datasets} == held
    with gw_store.session() as s:
        rows = list(s.scalars(select(AuditRow).where(AuditRow.action == "images.retrieve")))
        assert len(rows) == 2
        assert all(r.case_id == "case-a" and r.agent == "rev-1" for r in rows)
