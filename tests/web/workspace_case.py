"""A demo-like case for the workspace tests: the referral of tests/report_helpers.make_case, the
demo EHR's colon-cancer patient (Synthea + the authored oncology supplement, as the sandbox
serves them) stored as pulled, a pathology PDF as a DocumentReference, normalised."""

from __future__ import annotations

import base64
import json
from importlib import resources
from typing import Any

from fpdf import FPDF

from fhir_gateway.casebundle.normalise import normalise_case
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import StoredResource
from tests.report_helpers import EHR, make_case

DEMO_EHR = resources.files("fhir_gateway.sandbox") / "data" / "ehr"
PDF_TEXT = "Surgical pathology report (synthetic)"


def pdf_bytes() -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=14)
    pdf.cell(text=PDF_TEXT)
    return bytes(pdf.output())


def demo_resources() -> list[dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for item in sorted(DEMO_EHR.iterdir(), key=lambda i: i.name):
        if not item.name.endswith(".json"):
            continue
        for entry in json.loads(item.read_text(encoding="utf-8")).get("entry", []):
            r = entry["resource"]
            out[(r["resourceType"], r["id"])] = r
    return list(out.values())


def markers(resources: list[dict[str, Any]]) -> int:
    """CEA results (LOINC 2039-6) with a numeric value: one chart point each."""
    return sum(
        1
        for r in resources
        if r["resourceType"] == "Observation"
        and any(c.get("code") == "2039-6" for c in (r.get("code") or {}).get("coding", []))
        and isinstance((r.get("valueQuantity") or {}).get("value"), int | float)
    )


def build_case(store: Store, settings: Settings, reviewer: str) -> str:
    case_id = make_case(store, reviewer=reviewer)
    found = demo_resources()
    patient = next(r for r in found if r["resourceType"] == "Patient")
    found.append(
        {
            "resourceType": "DocumentReference",
            "id": "path-report-pdf",
            "status": "current",
            "type": {"text": "Surgical pathology report"},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "date": "2026-02-01T10:00:00Z",
            "content": [
                {
                    "attachment": {
                        "contentType": "application/pdf",
                        "title": "Surgical pathology report",
                        "data": base64.b64encode(pdf_bytes()).decode(),
                    }
                }
            ],
        }
    )
    with store.session() as s:
        for r in found:
            s.add(
                StoredResource(
                    case_id=case_id,
                    source=EHR,
                    resource_type=r["resourceType"],
                    source_id=r["id"],
                    body=r,
                )
            )
    normalise_case(store, settings, case_id)
    return case_id
