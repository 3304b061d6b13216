"""Which studies a case pulls: the referral's ServiceRequest and the patient id (FHIR R4)."""

from __future__ import annotations

from fhir_gateway.imaging.retrieval import StudySelector, study_selectors_for_case
from fhir_gateway.settings import DicomwebEndpoint, Settings
from fhir_gateway.store import open_store
from tests.integration.imaging.cases import make_case

ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


def test_supporting_info_identifiers_accessions_and_patient(settings: Settings):
    store = open_store(settings.db_url)
    case_id = make_case(
        store,
        patient_identifiers=[
            {"system": "urn:other", "value": "X-1"},
            {"system": "urn:mrn", "type": MR, "value": "MRN-7"},
        ],
        supporting_info=[
            {
                "type": "ImagingStudy",
                "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"},
            },
            {"reference": "ImagingStudy/x", "identifier": {"type": ACSN, "value": "ACC-9"}},
            {"reference": "Observation/o1", "identifier": {"type": ACSN, "value": "NOT-IMAGING"}},
            {
                "type": "ImagingStudy",
                "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"},
            },
        ],
    )
    endpoint = DicomwebEndpoint(base_url="http://pacs/dicom-web")
    assert study_selectors_for_case(store, case_id, endpoint) == [
        StudySelector(study_uid="1.2.3"),
        StudySelector(accession_number="ACC-9"),
        StudySelector(patient_id="MRN-7"),
    ]
    by_issuer = endpoint.model_copy(update={"issuer_of_patient_id": "urn:other"})
    assert study_selectors_for_case(store, case_id, by_issuer)[-1] == StudySelector(
        patient_id="X-1", issuer_of_patient_id="urn:other"
    )
    no_patient = endpoint.model_copy(update={"search_by_patient": False})
    assert len(study_selectors_for_case(store, case_id, no_patient)) == 2
    assert study_selectors_for_case(store, "no-such-case", endpoint) == []
    store.dispose()
