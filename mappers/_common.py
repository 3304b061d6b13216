"""Helpers shared by the mappers: OperationOutcome issues and the `MapResult` they return."""

from __future__ import annotations

import re
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


# HL7 v2 TS/DTM and CDA TS share one format: YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ].
_TS_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?")


def hl7_ts_to_datetime(value: str) -> tuple[str | None, bool]:
    """HL7 TS -> FHIR dateTime; (value, precision_lost). FHIR needs a zone with any time, so a
    time without one is kept to date precision (and reported by the caller)."""
    m = _TS_RE.fullmatch(value.strip())
    if not m:
        return None, bool(value)
    year, month, day, hour, minute, second, zone = m.groups()
    date = "-".join(p for p in (year, month, day) if p)
    if not hour:
        return date, False
    if not zone or not day:
        return date, True
    return f"{date}T{hour}:{minute or '00'}:{second or '00'}{zone[:3]}:{zone[3:]}", False
