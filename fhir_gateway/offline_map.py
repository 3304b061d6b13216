"""`fhir-gateway map FILE... [--out bundle.json]`: map files offline into one case Bundle.

`map_files()` reads each file, maps it with `mappers.detect.map_document` and assembles one
case bundle. Unusable files are returned as one-line failures (the CLI exits 2 when there are
any, after writing the bundle of the well-formed files).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhir_gateway.bundle import CaseBundle, SourceBatch, assemble_case_bundle
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
        issues = [_with_file(i, path.name) for i in result.issues]
        batches.append(SourceBatch(source, result.resources, issues, result.kind, path.name, when))
    patient_id = _patient_id(batches, paths)
    case = assemble_case_bundle(patient_id, batches)
    return case, case.issues, failures


def _with_file(issue: Issue, filename: str) -> Issue:
    expression = issue.get("expression") or []
    return {**issue, "expression": [f"{filename}#{e}" for e in expression] or [filename]}


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


def format_issue(issue: Issue) -> str:
    """One stderr line per issue: severity, code, where, what (no payload values)."""
    where = ",".join(issue.get("expression") or [])
    return f"{issue['severity']}: {issue['code']}: {where}: {issue['diagnostics']}"
