"""Shared builders for the report tests: a draft, a context and the report fonts."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhir_gateway import job_handlers, jobs
from fhir_gateway.intake import hosted
from fhir_gateway.reports.fonts import find_report_fonts
from fhir_gateway.settings import JobSettings, Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Assignment, Case, Delivery, Job, StoredResource, utcnow
from mappers.report import ReportContext
from mappers.report_pdf import PdfFonts

# Synthetic names in five scripts (no real person); the PDF must carry each one.
UNICODE_NAMES = ["山田 太郎", "王小明", "Иван Петров", "Ελένη Παπαδοπούλου", "José Núñez-Øster"]
ISSUED = datetime(2026, 3, 4, 10, 30, tzinfo=UTC)
EHR = "https://ehr.example.org/fhir"


def report_fonts() -> PdfFonts:
    return find_report_fonts()  # shipped with the package: never skipped


def draft_data(kind: str = "pathology", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": kind,
        "conclusion": "Invasive ductal carcinoma, grade 2; agree with the referring diagnosis.",
        "conclusion_codes": [
            {"code": "408643008", "display": "Infiltrating duct carcinoma of breast"}
        ],
        "findings": [
            {
                "kind": "histology",
                "value_code": {
                    "system": "http://terminology.hl7.org/CodeSystem/icd-o-3",
                    "code": "8500/3",
                    "display": "Infiltrating duct carcinoma, NOS",
                },
                "focus": ["Condition/primary-1"],
            },
            {
                "kind": "grade",
                "value_code": {"code": "1286893008", "display": "Intermediate grade"},
            },
            {
                "kind": "tnm-stage",
                "value_code": {"code": "1222806003", "display": "AJCC pathologic stage IIA"},
                "focus": ["Condition/primary-1"],
            },
            {
                "kind": "biomarker",
                "code": {"system": "http://loinc.org", "code": "85337-4", "display": "ER"},
                "value_code": {
                    "system": "http://loinc.org",
                    "code": "LA6576-8",
                    "display": "Positive",
                },
                "derived_from": ["DiagnosticReport/path-1"],
            },
            {"kind": "revised-diagnosis", "value_text": "No change to the primary diagnosis"},
        ],
        "recommendations": ["Adjuvant endocrine therapy", "Repeat HER2 by ISH"],
        "reviewer": {
            "family": "Żółć",
            "given": ["Łukasz"],
            "prefix": "Dr.",
            "role": "Pathologist",
            "npi": "1234567893",
        },
    }
    data.update(overrides)
    return data


def context(**overrides: Any) -> ReportContext:
    values: dict[str, Any] = {
        "case_id": "case-1",
        "identifier_system": "urn:fhir-gateway:report",
        "identifier_value": "case-1",
        "service_request_url": f"{EHR}/ServiceRequest/sr-1",
        "organization_name": "Second Opinion Service",
        "organization_identifier": ("urn:fhir-gateway", "gateway"),
        "effective": datetime(2026, 3, 3, 9, 0, tzinfo=UTC),
        "issued": ISSUED,
        "patient_reference": f"{EHR}/Patient/p-1",
        "patient_identifier": ("urn:oid:1.2.3.4", "MRN-1"),
        "patient_name": " / ".join(UNICODE_NAMES),
        "references": {
            "Condition/primary-1": f"{EHR}/Condition/primary-1",
            "DiagnosticReport/path-1": f"{EHR}/DiagnosticReport/path-1",
        },
    }
    values.update(overrides)
    return ReportContext(**values)


def need_poppler() -> None:
    if shutil.which("pdftoppm") is None or shutil.which("pdftotext") is None:
        if os.environ.get("FHIR_GATEWAY_REQUIRE_SERVERS") == "1":
            pytest.fail("poppler-utils (pdftoppm, pdftotext) missing")
        pytest.skip("poppler-utils (pdftoppm, pdftotext) missing")


def pdf_text(pdf: bytes, tmp_path: Path) -> str:
    need_poppler()
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    return subprocess.run(
        ["pdftotext", "-enc", "UTF-8", str(path), "-"], check=True, capture_output=True
    ).stdout.decode("utf-8")


def page1_dark_pixels(pdf: bytes, tmp_path: Path) -> tuple[int, int]:
    """Render page 1 to an 8-bit PGM with pdftoppm; return (dark pixels, all pixels)."""
    need_poppler()
    path = tmp_path / "page.pdf"
    path.write_bytes(pdf)
    out = subprocess.run(
        ["pdftoppm", "-gray", "-r", "50", "-f", "1", "-l", "1", str(path)],
        check=True,
        capture_output=True,
    ).stdout
    # PGM P5: "P5" <ws> width <ws> height <ws> maxval <single ws> raster
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while out[pos : pos + 1].isspace():
            pos += 1
        end = pos
        while not out[end : end + 1].isspace():
            end += 1
        fields.append(out[pos:end])
        pos = end
    assert fields[0] == b"P5"
    assert fields[3] == b"255"
    width, height = int(fields[1]), int(fields[2])
    raster = out[pos + 1 : pos + 1 + width * height]
    assert len(raster) == width * height
    return sum(1 for b in raster if b < 128), width * height


def make_case(store: Store, *, reviewer: str) -> str:
    """A case with its referral (Patient, ServiceRequest, Task) and two pulled resources."""
    with store.session() as s:
        patient = hosted.create(
            s,
            {
                "resourceType": "Patient",
                "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-1"}],
                "name": [{"text": UNICODE_NAMES[0]}],
                "gender": "male",
            },
            partner_id="st-elsewhere",
        )
        sr = hosted.create(
            s,
            {
                "resourceType": "ServiceRequest",
                "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": "REF-77"}],
                "status": "active",
                "intent": "order",
                "code": {"text": "Second opinion"},
                "subject": {"reference": f"Patient/{patient.id}"},
            },
            partner_id="st-elsewhere",
        )
        task = hosted.create(
            s,
            {
                "resourceType": "Task",
                "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": "TASK-77"}],
                "status": "received",
                "intent": "order",
                "focus": {"reference": f"ServiceRequest/{sr.id}"},
            },
            partner_id="st-elsewhere",
        )
        case = Case(
            id="0b7f3c52-6d0e-4c61-9a53-3f3d1f0f7a11",
            partner_id="st-elsewhere",
            status="received",
            task_id=task.id,
            service_request_id=sr.id,
            patient_ref=f"Patient/{patient.id}",
        )
        s.add(case)
        s.flush()
        for row in (patient, sr, task):
            row.case_id = case.id
        for rtype, rid in (("Condition", "primary-1"), ("DiagnosticReport", "path-1")):
            s.add(
                StoredResource(
                    case_id=case.id,
                    source=EHR,
                    resource_type=rtype,
                    source_id=rid,
                    body={"resourceType": rtype, "id": rid},
                )
            )
        s.add(Assignment(case_id=case.id, reviewer=reviewer, assigned_by="admin-1"))
    return case.id


def report_settings(tmp_path: Path, base_url: str, extra: str = "") -> Settings:
    """Settings whose one partner (st-elsewhere) delivers to `base_url` without auth;
    `extra` adds destination keys (use_transaction, task_on_destination, ...)."""
    report_fonts()  # skip early when the fonts are missing
    partners = tmp_path / "partners.toml"
    partners.write_text(
        f"""
[organization]
name = "Second Opinion Service"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "second-opinion" }}

[[partners]]
id = "st-elsewhere"
name = "St Elsewhere"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "st-elsewhere" }}

[partners.destination]
base_url = "{base_url}"
timeout_s = 5
{extra}
""",
        encoding="utf-8",
    )
    return Settings(
        data_dir=tmp_path,
        partners_file=partners,
        public_base_url="https://gateway.example.org",
        log_format="console",
        jobs=JobSettings(lease_s=5, poll_s=0.05, backoff_base_s=0.01, backoff_cap_s=0.05),
    )


def run_jobs(store: Store, settings: Settings, *, max_runs: int = 10) -> int:
    """Run due jobs in process with the real worker; how many ran."""
    job_handlers.register_all()
    worker = jobs.Worker(store, settings, name="test-worker")
    runs = 0
    while runs < max_runs and worker.run_once():
        runs += 1
    return runs


def time_passes(store: Store, delivery_id: str, hours: float = 0) -> None:
    """Simulated clock: the delivery's job is due now, and the delivery started `hours` earlier."""
    with store.session() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        d.created_at = d.created_at - timedelta(hours=hours)
        job = s.get(Job, d.job_id)
        assert job is not None
        job.run_at = utcnow()
