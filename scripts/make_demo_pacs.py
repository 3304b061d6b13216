"""Regenerate the demo's sandbox PACS (fhir_gateway/sandbox/data/pacs/) from fixtures.

- The CT series (pydicom's 4-slice CT2, fixtures/dicom/series_77654033_CT2) is re-labelled as the
  demo's Synthea patient (fhir_gateway/sandbox/data/ehr/colon_Darin_Skiles.json): PatientID = his
  medical record number, IssuerOfPatientID = that identifier's system, PatientName,
  PatientBirthDate, PatientSex. Every UID, and the pixels, are kept.
- A second study of another patient (highdicom's DX test image, fixtures/dicom/dx/dx_image.dcm)
  is copied unmodified: the referral names it too, and the identity check holds it.

Run from the repository root: `python scripts/make_demo_pacs.py`. Idempotent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pydicom

ROOT = Path(__file__).resolve().parents[1]
EHR = ROOT / "fhir_gateway/sandbox/data/ehr/colon_Darin_Skiles.json"
CT = ROOT / "fixtures/dicom/series_77654033_CT2"
FOREIGN = ROOT / "fixtures/dicom/dx/dx_image.dcm"
PACS = ROOT / "fhir_gateway/sandbox/data/pacs"
MR = "MR"  # v2-0203 identifier type: medical record number


def synthea_patient() -> dict[str, Any]:
    bundle = json.loads(EHR.read_text(encoding="utf-8"))
    patient: dict[str, Any] = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    return patient


def main() -> None:
    patient = synthea_patient()
    mrn = next(
        i
        for i in patient["identifier"]
        if any(c.get("code") == MR for c in (i.get("type") or {}).get("coding") or [])
    )
    name = patient["name"][0]
    PACS.mkdir(parents=True, exist_ok=True)
    for src in sorted(CT.glob("*.dcm")):
        ds = pydicom.dcmread(src)
        ds.PatientID = mrn["value"]
        ds.IssuerOfPatientID = mrn["system"]
        ds.PatientName = f"{name['family']}^{' '.join(name['given'])}"
        ds.PatientBirthDate = str(patient["birthDate"]).replace("-", "")
        ds.PatientSex = {"male": "M", "female": "F"}.get(str(patient["gender"]), "O")
        ds.save_as(PACS / src.name, enforce_file_format=True)
    shutil.copyfile(FOREIGN, PACS / "other-patient-dx.dcm")


if __name__ == "__main__":
    main()
