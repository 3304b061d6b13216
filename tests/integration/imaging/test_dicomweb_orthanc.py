"""Imaging pull against a real Orthanc 1.10 + DICOMweb plugin (DefaultEncoding Utf8).

DICOM PS3.18: QIDO-RS (10.6), WADO-RS RetrieveSeries/Instance (10.4), STOW-RS (10.5).
"""

from __future__ import annotations

import json
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from connectors.dicomweb import SOP_UID, STUDY_UID, DicomwebClient, first_value
from connectors.orthanc import OrthancStorage
from fhir_gateway.imaging.job import pull_for_partner
from fhir_gateway.imaging.retrieval import (
    StudySelector,
    case_imaging_studies,
    pull_case_images,
    study_selectors_for_case,
)
from fhir_gateway.imaging.store import FileImageStore, OrthancImageStore
from fhir_gateway.settings import DicomwebEndpoint, Partner, PartnerIdentifier, Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import ImageInstance, StoredResource
from mappers.dicom import dataset_patient_name
from tests.integration.imaging.cases import make_case, study_ref
from tests.integration.imaging.conftest import DICOM
from tests.servers.orthanc import OrthancServer, run_orthanc

pytestmark = pytest.mark.server

NAMES: dict[str, str] = json.loads(
    (DICOM / "charsets" / "expected_names.json").read_text(encoding="utf-8")
)["names"]


def all_selectors(corpus_studies) -> list[StudySelector]:
    return [StudySelector(study_uid=uid) for uid in corpus_studies]


def orthanc_file(orthanc: OrthancServer, sop_uid: str) -> bytes:
    ids = requests.post(f"{orthanc.url}/tools/lookup", data=sop_uid, timeout=10).json()
    (inst,) = [i for i in ids if i["Type"] == "Instance"]
    r = requests.get(f"{orthanc.url}/instances/{inst['ID']}/file", timeout=30)
    r.raise_for_status()
    return r.content


def test_orthanc_does_not_decode_wildcards(orthanc, http):
    """Orthanc matches the raw query text: `*` must go unencoded (our client does; the
    dicomweb-client library sends %2A and finds nothing)."""
    ours = DicomwebClient(http, orthanc.dicomweb_url)
    found = ours.search_studies(extra={"PatientName": "Doe*"})
    assert len(found) >= 3
    encoded = requests.get(f"{orthanc.dicomweb_url}/studies?PatientName=Doe%2A", timeout=10)
    assert encoded.status_code in (200, 204)
    assert (encoded.json() if encoded.content else []) == []
    theirs = DICOMwebClient(orthanc.dicomweb_url)
    assert theirs.search_for_studies(search_filters={"PatientName": "Doe*"}) == []


def test_paging_with_small_limit_finds_every_study(orthanc, http, corpus_studies):
    client = DicomwebClient(http, orthanc.dicomweb_url, page_size=2)
    uids = [first_value(s, STUDY_UID) for s in client.search_studies()]
    assert sorted(uids) == sorted(corpus_studies)


def test_pull_case_byte_identical_and_counts_match_qido(
    orthanc, http, gw_store: Store, file_store: FileImageStore, corpus_studies
):
    case_id = make_case(gw_store)
    client = DicomwebClient(http, orthanc.dicomweb_url, max_parallel=3)
    progress: list[dict[str, Any]] = []
    counts = pull_case_images(
        gw_store, case_id, client, file_store, all_selectors(corpus_studies), progress.append
    )
    n_files = sum(len(v) for v in corpus_studies.values())
    assert counts.instances == n_files
    assert counts.rejected == []
    assert counts.studies == len(corpus_studies)
    assert progress[-1]["imaging"]["instances"] == n_files
    refs = list(file_store.iter_instances(case_id))
    assert len(refs) == n_files
    for ref in refs:
        with file_store.open_instance(ref) as fh:
            assert fh.read() == orthanc_file(orthanc, ref.sop_uid), ref.sop_uid
    assert counts.bytes == sum(r.size for r in refs)
    # Blobs are content-addressed under blobs/sha256/ab/cdef...
    ref = refs[0]
    assert file_store.blob_path(ref.sha256).parent.name == ref.sha256[:2]

    studies = case_imaging_studies(file_store, case_id, {"reference": "Patient/x"}, "http://gw/x")
    imaging = {s["identifier"][0]["value"].removeprefix("urn:oid:"): s for s in studies[1:]}
    for qido in client.search_studies():
        uid = first_value(qido, STUDY_UID)
        assert imaging[uid]["numberOfSeries"] == int(first_value(qido, "00201206"))
        assert imaging[uid]["numberOfInstances"] == int(first_value(qido, "00201208"))


def test_non_ascii_names_come_out_as_unicode(orthanc, http, gw_store, file_store):
    case_id = make_case(gw_store)
    client = DicomwebClient(http, orthanc.dicomweb_url)
    charsets = DICOM / "charsets"
    selectors = [
        StudySelector(
            study_uid=str(pydicom.dcmread(charsets / n, stop_before_pixels=True).StudyInstanceUID)
        )
        for n in NAMES
    ]
    pull_case_images(gw_store, case_id, client, file_store, selectors)
    by_sop = {r.sop_uid: r for r in file_store.iter_instances(case_id)}
    for name, expected in NAMES.items():
        sop = str(pydicom.dcmread(charsets / name, stop_before_pixels=True).SOPInstanceUID)
        with file_store.open_instance(by_sop[sop]) as fh:
            assert dataset_patient_name(pydicom.dcmread(fh, stop_before_pixels=True)) == expected
        # And as Orthanc's QIDO (UTF-8 DICOM JSON) gives it back.
        (qido,) = client.search_studies(study_uid=by_sop[sop].study_uid)
        assert dataset_patient_name(qido) == expected


def test_resume_skips_held_and_refetches_only_missing(
    orthanc, http, gw_store, file_store, corpus_studies
):
    case_id = make_case(gw_store)
    client = DicomwebClient(http, orthanc.dicomweb_url)
    ct_study = next(u for u, files in corpus_studies.items() if len(files) == 4)
    sel = [StudySelector(study_uid=ct_study)]
    first = pull_case_images(gw_store, case_id, client, file_store, sel)
    assert (first.instances, first.skipped) == (4, 0)
    again = pull_case_images(gw_store, case_id, client, file_store, sel)
    assert (again.instances, again.skipped) == (0, 4)
    # Lose one instance: only that one is fetched again (per-instance WADO-RS).
    victim = next(iter(file_store.iter_instances(case_id)))
    with gw_store.session() as s:
        s.delete(s.get(ImageInstance, (case_id, victim.sop_uid)))
    resumed = pull_case_images(gw_store, case_id, client, file_store, sel)
    assert (resumed.instances, resumed.skipped) == (1, 3)
    assert victim.sop_uid in file_store.held_sop_uids(case_id)


def test_orthanc_image_store_backend(orthanc, http, gw_store, settings, corpus_studies, tmp_path):
    with run_orthanc(tmp_path / "store-orthanc", aet="GWSTORE") as target:
        image_store = OrthancImageStore(
            gw_store, settings.data_dir, OrthancStorage(http, target.url)
        )
        case_id = make_case(gw_store)
        ct_study = next(u for u, files in corpus_studies.items() if len(files) == 4)
        client = DicomwebClient(http, orthanc.dicomweb_url)
        counts = pull_case_images(
            gw_store, case_id, client, image_store, [StudySelector(study_uid=ct_study)]
        )
        assert counts.instances == 4
        refs = list(image_store.iter_instances(case_id, ct_study))
        assert all(r.orthanc_id for r in refs)
        for ref in refs:
            with image_store.open_instance(ref) as fh:
                assert fh.read() == orthanc_file(orthanc, ref.sop_uid)
        # The store's own DICOMweb now serves the study to viewers.
        served = DicomwebClient(http, target.dicomweb_url).search_instances(
            ct_study, refs[0].series_uid
        )
        assert {first_value(i, SOP_UID) for i in served} == {r.sop_uid for r in refs}
        assert image_store.metadata(refs[0])["0020000D"]["Value"] == [ct_study]
        assert image_store.delete_case(case_id) == 4
        assert requests.get(f"{target.url}/instances", timeout=10).json() == []


def test_pull_for_partner_uses_referral_and_patient_search(
    orthanc, gw_store, settings: Settings, corpus_studies
):
    ct_study = next(u for u, files in corpus_studies.items() if len(files) == 4)
    mr_file = next(
        f for files in corpus_studies.values() for f in files if f.name == "MR_small.dcm"
    )
    mr = pydicom.dcmread(mr_file, stop_before_pixels=True)
    case_id = make_case(
        gw_store,
        patient_identifiers=[{"system": "urn:oid:1.2.3.4", "value": str(mr.PatientID)}],
        supporting_info=[study_ref(ct_study), {"reference": "Observation/o1"}],
    )
    endpoint = DicomwebEndpoint(base_url=orthanc.dicomweb_url, issuer_of_patient_id="1.2.3.4")
    partner = Partner(
        id="st-elsewhere",
        name="St Elsewhere",
        identifier=PartnerIdentifier(system="urn:x", value="y"),
        dicomweb=endpoint,
    )
    selectors = study_selectors_for_case(gw_store, case_id, endpoint)
    assert selectors == [
        StudySelector(study_uid=ct_study),
        StudySelector(patient_id=str(mr.PatientID), issuer_of_patient_id="1.2.3.4"),
    ]
    # Orthanc stores no IssuerOfPatientID for these files, so query without it.
    endpoint = endpoint.model_copy(update={"issuer_of_patient_id": None})
    partner = partner.model_copy(update={"dicomweb": endpoint})
    counts = pull_for_partner(settings, gw_store, case_id, partner)
    patient_studies = {
        u
        for u, files in corpus_studies.items()
        if any(
            str(pydicom.dcmread(f, stop_before_pixels=True).PatientID) == str(mr.PatientID)
            for f in files
        )
    }
    expected = {ct_study} | patient_studies
    assert counts.studies == len(expected)
    with gw_store.session() as s:
        rows = list(s.scalars(select(StoredResource).where(StoredResource.case_id == case_id)))
    studies = [r.body for r in rows if r.resource_type == "ImagingStudy"]
    assert {s["identifier"][0]["value"].removeprefix("urn:oid:") for s in studies} == expected
    (endpoint_row,) = [r.body for r in rows if r.resource_type == "Endpoint"]
    assert endpoint_row["address"] == f"{settings.base_url}/cases/{case_id}/dicom-web"
    assert all(s["subject"] == {"reference": f"Patient/pat-{case_id}"} for s in studies)
