"""Legacy DIMSE PACS through Orthanc: C-FIND + C-MOVE over Orthanc's REST API, with TWO real
Orthancs on loopback (one plays the legacy PACS, the other the gateway's bridge)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from connectors.orthanc import OrthancDimse
from fhir_gateway.errors import UpstreamNotFoundError
from fhir_gateway.imaging.job import pull_for_partner
from fhir_gateway.settings import DimseEndpoint, Partner, PartnerIdentifier
from tests.integration.imaging.cases import make_case, study_ref
from tests.servers.orthanc import OrthancServer, run_orthanc

pytestmark = pytest.mark.server

DICOM = Path(__file__).resolve().parents[3] / "fixtures" / "dicom"
CT = sorted((DICOM / "series_77654033_CT2").glob("*.dcm"))


@pytest.fixture(scope="module")
def pacs_and_bridge(tmp_path_factory) -> Iterator[tuple[OrthancServer, OrthancServer]]:
    base = tmp_path_factory.mktemp("dimse")
    with (
        run_orthanc(base / "pacs", aet="LEGACYPACS") as pacs,
        run_orthanc(base / "bridge", aet="GWBRIDGE") as bridge,
    ):
        bridge.add_modality("pacs", pacs)
        pacs.add_modality("gateway", bridge)  # the PACS must know where C-MOVE sends to
        for path in CT:
            pacs.upload(path.read_bytes())
        yield pacs, bridge


def test_cfind_then_cmove_brings_the_study_to_the_bridge(pacs_and_bridge, http):
    _pacs, bridge = pacs_and_bridge
    study_uid = str(pydicom.dcmread(CT[0], stop_before_pixels=True).StudyInstanceUID)
    dimse = OrthancDimse(http, bridge.url, "pacs")
    query_id, answers = dimse.find_studies({"StudyInstanceUID": study_uid})
    assert [a["StudyInstanceUID"] for a in answers] == [study_uid]
    _, none = dimse.find_studies({"StudyInstanceUID": "1.2.3.999"})
    assert none == []
    dimse.move(query_id)
    got = requests.get(f"{bridge.url}/instances", timeout=10).json()
    assert len(got) == len(CT)


def test_unknown_modality_is_not_found(pacs_and_bridge, http):
    _, bridge = pacs_and_bridge
    with pytest.raises(UpstreamNotFoundError):
        OrthancDimse(http, bridge.url, "nosuchpacs").find_studies({"PatientID": "x"})


def test_pull_for_dimse_partner(pacs_and_bridge, gw_store, settings, file_store):
    _, bridge = pacs_and_bridge
    study_uid = str(pydicom.dcmread(CT[0], stop_before_pixels=True).StudyInstanceUID)
    case_id = make_case(gw_store, supporting_info=[study_ref(study_uid)])
    partner = Partner(
        id="legacy",
        name="Legacy hospital",
        identifier=PartnerIdentifier(system="urn:x", value="legacy"),
        dimse=DimseEndpoint(orthanc_url=bridge.url, modality="pacs"),
    )
    counts = pull_for_partner(settings, gw_store, case_id, partner)
    assert counts.instances + counts.skipped == len(CT)
    assert counts.rejected == []
    originals = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in CT)}
    refs = list(file_store.iter_instances(case_id))
    assert {r.sop_uid for r in refs} == set(originals)
    for ref in refs:
        with file_store.open_instance(ref) as fh:
            stored = pydicom.dcmread(fh)
        # DIMSE transfer re-wraps the File Meta (the receiver writes its own); the dataset is
        # the PACS's, element for element, pixels included.
        assert stored == originals[ref.sop_uid]
