"""Map files offline into one case Bundle (the engine of `fhir-gateway map FILE... [--out]`).

`map_files()` reads each file, maps it with `mappers.detect.map_document` and assembles one
case bundle. Unusable files are returned as one-line failures; the CLI prints them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhir_gateway.casebundle.assemble import CaseBundle, SourceBatch, assemble_case_bundle
from fhir_gateway.errors import InputError
from fhir_gateway.resources import deterministic_id
from mappers.detect import map_document

Issue = dict[str, Any]


def map_files(
    paths: list[Path], *, received: str | None = None
) -> tuple[CaseBundle, list[Issue], list[str]]:
    """Map files into one case bundle -> (bundle, data-quality issues, failures)."""
    when = received or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    batches: list[SourceBatch] = []
    failures: list[str] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            failures.append(f"{path}: cannot read ({exc.strerror})")
            continue
        source = f"file:{path.name}"
        try:
            result = map_document(data, path.name, source)
        except InputError as exc:
            failures.append(f"{path}: {exc.message}")
            continue
        issues = [with_source(i, path.name) for i in result.issues]
        batches.append(SourceBatch(source, result.resources, issues, result.kind, path.name, when))
    patient_id = _patient_id(batches, paths)
    case = assemble_case_bundle(patient_id, batches)
    return case, case.issues, failures


def with_source(issue: Issue, where: str) -> Issue:
    """The issue with its expressions prefixed by the document or source they are about."""
    expression = issue.get("expression") or []
    return {**issue, "expression": [f"{where}#{e}" for e in expression] or [where]}


def _patient_id(batches: list[SourceBatch], paths: list[Path]) -> str:
    for batch in batches:
        for resource in batch.resources:
            if resource["resourceType"] == "Patient":
                return str(resource["id"])
    return deterministic_id("case", *sorted(p.name for p in paths))


def write_bundle(case: CaseBundle, out: Path) -> None:
    with out.open("wb") as fh:
        for chunk in case.iter_json():
            fh.write(chunk)
