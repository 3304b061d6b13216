"""Shared helpers for the mapper tests (imported by path, see conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fhir_gateway.casebundle.assemble import CaseBundle, SourceBatch, assemble_case_bundle
from mappers.detect import map_document

RECEIVED = "2026-01-01T00:00:00Z"
ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "fixtures"
KINDS = ("fhir", "ccda", "hl7v2")


def fixture_files() -> list[Path]:
    return sorted(p for kind in KINDS for p in (FIXTURES / kind).iterdir() if p.is_file())


def bad_files() -> list[Path]:
    return sorted(p for p in (FIXTURES / "bad").rglob("*") if p.is_file())


def fixture_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def map_one(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    result = map_document(path.read_bytes(), path.name, f"file:{path.name}")
    return result.resources, result.issues, result.kind


def case_of(paths: list[Path]) -> CaseBundle:
    batches = []
    for path in paths:
        resources, issues, kind = map_one(path)
        batches.append(
            SourceBatch(f"file:{path.name}", resources, issues, kind, path.name, RECEIVED)
        )
    patient_id = next(
        (r["id"] for b in batches for r in b.resources if r["resourceType"] == "Patient"),
        "no-patient",
    )
    return assemble_case_bundle(patient_id, batches)
