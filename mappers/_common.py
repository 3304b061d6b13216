"""Helpers shared by the mappers: OperationOutcome issues and the `MapResult` they return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhir_gateway.resources import Resource

Issue = dict[str, Any]


def issue(severity: str, code: str, diagnostics: str, expression: str | None = None) -> Issue:
    """One OperationOutcome.issue; `expression` is the source path (FHIRPath, XPath or ER7)."""
    out: Issue = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


@dataclass
class MapResult:
    """What every mapper returns: normalised resources and data-quality issues."""

    resources: list[Resource] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    kind: str = ""

    def __iter__(self) -> Any:  # allows `resources, issues = result`
        return iter((self.resources, self.issues))


def source_uri(source: str) -> str:
    """`meta.source` for a source system name (kept as-is when it already is a URI)."""
    return source if ":" in source else f"urn:fhir-gateway:source:{source}"
