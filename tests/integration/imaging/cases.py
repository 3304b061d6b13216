"""Cases as intake leaves them (Case + Patient + ServiceRequest rows), for imaging tests."""

from __future__ import annotations

from typing import Any

from fhir_gateway.store import Store
from fhir_gateway.store.models import Case, FhirResource


def make_case(
    store: Store,
    case_id: str = "case-1",
    *,
    patient_identifiers: list[dict[str, object]] | None = None,
    supporting_info: list[dict[str, object]] | None = None,
    patient: dict[str, object] | None = None,
) -> str:
    patient_id, sr_id = f"pat-{case_id}", f"sr-{case_id}"
    bodies: dict[str, dict[str, Any]] = {
        "Patient": {"id": patient_id, "identifier": patient_identifiers or [], **(patient or {})},
        "ServiceRequest": {
            "id": sr_id,
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{patient_id}"},
            "supportingInfo": supporting_info or [],
        },
    }
    with store.session() as s:
        s.add(
            Case(
                id=case_id,
                partner_id="st-elsewhere",
                status="received",
                task_id=f"task-{case_id}",
                service_request_id=sr_id,
                patient_ref=f"Patient/{patient_id}",
            )
        )
        s.flush()
        for rtype, body in bodies.items():
            s.add(
                FhirResource(
                    resource_type=rtype,
                    id=body["id"],
                    case_id=case_id,
                    body={"resourceType": rtype, **body},
                )
            )
    return case_id


def study_ref(study_uid: str) -> dict[str, object]:
    """ServiceRequest.supportingInfo naming an ImagingStudy by its DICOM UID (FHIR R4)."""
    return {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
    }
