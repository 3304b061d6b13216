"""Per-case DICOMweb (`/cases/{id}/dicom-web`) on the file image store, over real HTTP.

The images are pulled into the cases the production way (`pull_case_images` from the sandbox
PACS over loopback DICOMweb), then read back by reviewers with requests and with dicomweb-client.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from connectors.dicomweb import DicomwebClient
from connectors.multipart import PartData, PartEnd, PartStart, boundary_of, iter_events
from fhir_gateway.app import create_app
from fhir_gateway.imaging.retrieval import pull_case_images, study_selectors_for_case
from fhir_gateway.imaging.store import FileImageStore
from fhir_gateway.sandbox.pacs import PacsServer
from fhir_gateway.sandbox.server import AppServer, free_port
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store, open_store
from fhir_gateway.store.models import AuditRow
from tests.conftest import FIXTURES, Tokens
from tests.integration.imaging.cases import make_case, study_ref

DICOM = FIXTURES / "dicom"
CT2 = sorted((DICOM / "series_77654033_CT2").glob("*.dcm"))
SM = sorted((DICOM / "sm").glob("*.dcm"))
CT_SMALL = DICOM / "ct" / "CT_small.dcm"
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def uid(path: Path, attr: str = "StudyInstanceUID") -> str:
    return str(getattr(pydicom.dcmread(path, stop_before_pixels=True), attr))


@dataclass
class World:
    base: str  # the gateway
    store: Store
    tokens: Tokens
    case1: str  # CT2 study, reviewer rev-1 assigned
    case2: str  # SM study + CT_small study, nobody assigned

    def dw(self, case_id: str) -> str:
        return f"{self.base}/cases/{case_id}/dicom-web"

    def reviewer(self, sub: str = "rev-1", **extra: str) -> dict[str, str]:
        return self.tokens.headers("reviewer", sub=sub, **extra)


@pytest.fixture
def world(settings: Settings, tokens: Tokens, tmp_path: Path) -> Iterator[World]:
    source = tmp_path / "pacs"
    source.mkdir()
    for p in [*CT2, *SM, CT_SMALL]:
        shutil.copy(p, source / f"{p.parent.name}-{p.name}")
    store = open_store(settings.db_url)
    c1 = make_case(store, "case-1", supporting_info=[study_ref(uid(CT2[0]))])
    c2 = make_case(
        store, "case-2", supporting_info=[study_ref(uid(SM[0])), study_ref(uid(CT_SMALL))]
    )
    images = FileImageStore(store, settings.data_dir)
    with PacsServer(source) as pacs, requests.Session() as http:
        for case_id in (c1, c2):
            client = DicomwebClient(http, pacs.base_url)
            selectors = study_selectors_for_case(store, case_id, None)
            counts = pull_case_images(store, case_id, client, images, selectors)
            assert counts.rejected == []
    port = free_port()  # the public base URL is the server's, as a deployment configures it
    public = settings.model_copy(update={"public_base_url": f"http://127.0.0.1:{port}"})
    app = create_app(public, store=store, configure_logs=False)
    with AppServer(app, port) as server:
        admin = tokens.headers("admin", sub="op")
        r = requests.post(
            f"{server.url}/cases/{c1}/assignments", json={"reviewer": "rev-1"}, headers=admin
        )
        assert r.status_code == 201, r.text
        yield World(server.url, store, tokens, c1, c2)
    store.dispose()


def parts(resp: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The multipart body split with our own reader."""
    out: list[tuple[dict[str, str], bytes]] = []
    headers: dict[str, str] = {}
    body = bytearray()
    for event in iter_events([resp.content], boundary_of(resp.headers["content-type"])):
        if isinstance(event, PartStart):
            headers, body = event.headers, bytearray()
        elif isinstance(event, PartData):
            body += event.data
        elif isinstance(event, PartEnd):
            out.append((headers, bytes(body)))
    return out


def audit_rows(store: Store, action: str) -> list[AuditRow]:
    with store.session() as s:
        rows = list(s.scalars(select(AuditRow).where(AuditRow.action == action)))
        s.expunge_all()
        return rows


def test_reviewer_retrieves_the_study_as_stored(world: World) -> None:
    st = uid(CT2[0])
    r = requests.get(f"{world.dw(world.case1)}/studies/{st}", headers=world.reviewer(Accept=ACCEPT))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    got = parts(r)
    assert sorted(body for _, body in got) == sorted(p.read_bytes() for p in CT2)
    assert all(h["content-type"].startswith("application/dicom") for h, _ in got)
    retrieved = audit_rows(world.store, "images.retrieve")
    assert len(retrieved) == 1
    assert retrieved[0].case_id == world.case1
    assert retrieved[0].agent == "rev-1"
    assert retrieved[0].patient == "Patient/pat-case-1"
    assert {f"urn:oid:{uid(p, 'SOPInstanceUID')}" for p in CT2} <= set(retrieved[0].entity)


def test_series_and_instance_retrieval_and_metadata(world: World) -> None:
    st, se, sop = (
        uid(CT2[1], a) for a in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    root = f"{world.dw(world.case1)}/studies/{st}/series/{se}"
    series = requests.get(root, headers=world.reviewer())
    assert sorted(b for _, b in parts(series)) == sorted(p.read_bytes() for p in CT2)
    one = requests.get(f"{root}/instances/{sop}", headers=world.reviewer(Accept=ACCEPT))
    assert [b for _, b in parts(one)] == [CT2[1].read_bytes()]
    meta = requests.get(f"{root}/metadata", headers=world.reviewer())
    assert meta.headers["content-type"].startswith("application/dicom+json")
    sops = sorted(m["00080018"]["Value"][0] for m in meta.json())
    assert sops == sorted(uid(p, "SOPInstanceUID") for p in CT2)
    assert all("7FE00010" not in m for m in meta.json())
    inst = requests.get(f"{root}/instances/{sop}/metadata", headers=world.reviewer()).json()
    assert [m["00080018"]["Value"] for m in inst] == [[sop]]
    assert len(audit_rows(world.store, "images.retrieve")) == 4


def test_qido_counts_equal_the_stored_instances(world: World) -> None:
    root, h = world.dw(world.case1), world.reviewer()
    studies = requests.get(f"{root}/studies", headers=h)
    assert studies.headers["content-type"].startswith("application/dicom+json")
    [study] = studies.json()
    st = uid(CT2[0])
    assert study["0020000D"]["Value"] == [st]
    assert study["00201208"]["Value"] == [len(CT2)]
    assert study["00080061"]["Value"] == ["CT"]
    assert study["00081190"]["Value"] == [f"{root}/studies/{st}"]
    [series] = requests.get(f"{root}/studies/{st}/series", headers=h).json()
    se = series["0020000E"]["Value"][0]
    assert series["00201209"]["Value"] == [len(CT2)]
    found = requests.get(f"{root}/studies/{st}/series/{se}/instances", headers=h).json()
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(
        uid(p, "SOPInstanceUID") for p in CT2
    )
    assert len(requests.get(f"{root}/studies/{st}/instances", headers=h).json()) == len(CT2)
    assert len(audit_rows(world.store, "images.search")) == 4


def test_qido_matching_paging_and_includefield(world: World) -> None:
    root, h = world.dw(world.case2), world.tokens.headers("admin")
    assert len(requests.get(f"{root}/studies", headers=h).json()) == 2
    ct = requests.get(f"{root}/studies", params={"Modality": "CT"}, headers=h).json()
    assert [s["0020000D"]["Value"][0] for s in ct] == [uid(CT_SMALL)]
    by_uid = requests.get(f"{root}/studies", params={"StudyInstanceUID": uid(SM[0])}, headers=h)
    assert [s["0020000D"]["Value"][0] for s in by_uid.json()] == [uid(SM[0])]
    pid = uid(CT_SMALL, "PatientID")
    by_pid = requests.get(f"{root}/studies", params={"PatientID": pid}, headers=h).json()
    assert [s["0020000D"]["Value"][0] for s in by_pid] == [uid(CT_SMALL)]
    none = requests.get(f"{root}/studies", params={"Modality": "MR"}, headers=h)
    assert none.status_code == 200
    assert none.json() == []
    page1 = requests.get(f"{root}/instances", params={"limit": "2"}, headers=h)
    assert len(page1.json()) == 2
    assert "1 additional results" in page1.headers["warning"]
    page2 = requests.get(f"{root}/instances", params={"limit": "2", "offset": "2"}, headers=h)
    assert len(page2.json()) == 1
    assert "warning" not in page2.headers
    ids = {i["00080018"]["Value"][0] for i in page1.json() + page2.json()}
    assert ids == {uid(p, "SOPInstanceUID") for p in [*SM, CT_SMALL]}
    plain = requests.get(f"{root}/studies", params={"Modality": "CT"}, headers=h).json()[0]
    wide = requests.get(
        f"{root}/studies", params={"Modality": "CT", "includefield": "all"}, headers=h
    ).json()[0]
    assert "00280010" not in plain
    assert wide["00280010"]["Value"] == [128]
    bad = requests.get(f"{root}/studies", params={"NoSuchAttribute": "x"}, headers=h)
    assert bad.status_code == 400
    assert bad.json()["resourceType"] == "OperationOutcome"


def test_access_is_per_case(world: World) -> None:
    st = uid(CT2[0])
    url = f"{world.dw(world.case1)}/studies/{st}"
    assert requests.get(url).status_code == 401
    assert requests.get(url, headers=world.reviewer("rev-2")).status_code == 403
    assert requests.get(url, headers=world.tokens.headers("ehr")).status_code == 403
    assert (
        requests.get(
            f"{world.dw(world.case1)}/studies", headers=world.reviewer("rev-2")
        ).status_code
        == 403
    )
    admin = requests.get(url, headers=world.tokens.headers("admin"))
    assert admin.status_code == 200
    assert len(parts(admin)) == len(CT2)
    # a study of case-2 through case-1: as if it did not exist, for the admin too
    other = f"{world.dw(world.case1)}/studies/{uid(SM[0])}"
    for headers in (world.reviewer(), world.tokens.headers("admin")):
        resp = requests.get(other, headers=headers)
        assert resp.status_code == 404
        assert resp.json()["resourceType"] == "OperationOutcome"
    assert (
        requests.get(
            f"{world.dw('nope')}/studies", headers=world.tokens.headers("admin")
        ).status_code
        == 404
    )
    assert len(audit_rows(world.store, "images.retrieve")) == 1  # the admin's, nothing else


def test_frames_of_native_pixel_data(world: World) -> None:
    sm_image = next(p for p in SM if uid(p, "Modality") == "SM")
    ds = pydicom.dcmread(sm_image)
    st, se, sop = (
        uid(sm_image, a) for a in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    url = f"{world.dw(world.case2)}/studies/{st}/series/{se}/instances/{sop}"
    h = world.tokens.headers("admin")
    r = requests.get(f"{url}/frames/2,25", headers=h)
    assert r.status_code == 200, r.text
    size = len(ds.PixelData) // int(ds.NumberOfFrames)
    assert [b for _, b in parts(r)] == [ds.PixelData[size : 2 * size], ds.PixelData[24 * size :]]
    assert requests.get(f"{url}/frames/26", headers=h).status_code == 404
    assert requests.get(f"{url}/frames/x", headers=h).status_code == 400
    # we never transcode: a transfer syntax other than the stored one is 406
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    refused = requests.get(url, headers=h | {"Accept": jpeg})
    assert refused.status_code == 406
    assert refused.json()["issue"][0]["code"] == "not-supported"


def test_dicomweb_client_searches_and_retrieves(world: World) -> None:
    """A standard DICOMweb client (as viewers use) pointed at the per-case URL works."""
    session = requests.Session()
    session.headers.update(world.reviewer())
    client = DICOMwebClient(world.dw(world.case1), session=session)
    studies = client.search_for_studies()
    assert [s["0020000D"]["Value"][0] for s in studies] == [uid(CT2[0])]
    series = client.search_for_series(uid(CT2[0]))
    se = series[0]["0020000E"]["Value"][0]
    assert len(client.search_for_instances(uid(CT2[0]), se)) == len(CT2)
    datasets = client.retrieve_study(uid(CT2[0]))
    assert sorted(str(d.SOPInstanceUID) for d in datasets) == sorted(
        uid(p, "SOPInstanceUID") for p in CT2
    )
    meta = client.retrieve_series_metadata(uid(CT2[0]), se)
    assert len(meta) == len(CT2)
    other = DICOMwebClient(world.dw(world.case1), headers=world.reviewer("rev-2"))
    with pytest.raises(requests.HTTPError) as err:
        other.search_for_studies()
    assert err.value.response.status_code == 403


def test_metadata_taken_at_ingest_equals_the_files(world: World) -> None:
    """The DICOM JSON kept at ingest (from the header bytes seen while streaming) is what a
    fresh read of each stored file gives; rows without it (indexed before migration 0013) are
    described from the file, the same."""
    from fhir_gateway.imaging.store import instance_json
    from fhir_gateway.store.models import ImageInstance

    st = uid(CT2[0])
    url = f"{world.dw(world.case1)}/studies/{st}/metadata"
    served = {
        m["00080018"]["Value"][0]: m for m in requests.get(url, headers=world.reviewer()).json()
    }
    by_sop = {uid(p, "SOPInstanceUID"): p for p in CT2}
    with world.store.session() as s:
        rows = list(s.scalars(select(ImageInstance).where(ImageInstance.case_id == world.case1)))
        assert rows
        assert all(r.dicom_json for r in rows)
        for r in rows:
            r.dicom_json = None
    for sop, path in by_sop.items():
        with path.open("rb") as fh:
            assert served[sop] == instance_json(fh)
    again = requests.get(url, headers=world.reviewer()).json()
    assert {m["00080018"]["Value"][0]: m for m in again} == served
    studies = requests.get(f"{world.dw(world.case1)}/studies", headers=world.reviewer()).json()
    assert studies[0]["00201208"]["Value"] == [len(CT2)]


def test_retrieve_spanning_several_read_batches(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies read in batches (and an instance larger than a batch read in pieces) come out
    byte for byte, with a Content-Length that matches."""
    from fhir_gateway.api import dicomweb

    sizes = sorted(p.stat().st_size for p in CT2)
    assert sizes[0] < sizes[-1]
    monkeypatch.setattr(dicomweb, "BATCH", sizes[0] + 1)  # the largest go alone, in 2 pieces
    resp = requests.get(
        f"{world.dw(world.case1)}/studies/{uid(CT2[0])}", headers=world.reviewer(Accept=ACCEPT)
    )
    assert resp.status_code == 200
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert sorted(b for _, b in parts(resp)) == sorted(p.read_bytes() for p in CT2)
