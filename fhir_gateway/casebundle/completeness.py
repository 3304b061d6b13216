"""What a second opinion on this cancer needs, present or missing (pure).

The tables are data (`completeness.json` beside this module): needs for every case (primary
cancer condition, pathology report, staging, tumour markers, imaging) and per cancer type
(colorectal: CEA, MSI/MMR, KRAS/NRAS/BRAF; breast: ER, PR, HER2, Ki-67; prostate: PSA, Gleason
grade group; lung: EGFR, ALK, PD-L1). The cancer type comes from the code of each claimed primary
cancer condition. Each need lists the resources that supply it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fhir_gateway.resources import Resource

CLASS_SYSTEM = "urn:fhir-gateway:class"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
GENE_STUDIED = "48018-6"  # LOINC "Gene studied [ID]" (genomics component)
PRIMARY_PROFILE = "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-primary-cancer-condition"
MAX_LISTED = 20  # resources listed per need (the count is always complete)
_TABLE = Path(__file__).with_name("completeness.json")


@dataclass(frozen=True)
class Need:
    key: str
    label: str
    classes: frozenset[str]
    codes: frozenset[tuple[str, str]]
    genes: frozenset[str]
    words: tuple[re.Pattern[str], ...]


@dataclass(frozen=True)
class CancerType:
    key: str
    label: str
    snomed: frozenset[str]
    icd10cm: tuple[str, ...]
    needs: tuple[Need, ...]

    def matches(self, system: str, code: str) -> bool:
        if system == SNOMED:
            return code in self.snomed
        if system == ICD10CM:
            bare = code.strip().upper()
            return any(bare.startswith(prefix) for prefix in self.icd10cm)
        return False


@dataclass(frozen=True)
class Table:
    general: tuple[Need, ...]
    cancer_types: tuple[CancerType, ...]


def _need(raw: dict[str, Any]) -> Need:
    return Need(
        key=raw["key"],
        label=raw["label"],
        classes=frozenset(raw.get("classes", [])),
        codes=frozenset((s, c) for s, c in raw.get("codes", [])),
        genes=frozenset(raw.get("genes", [])),
        words=tuple(
            re.compile(rf"(?<![A-Za-z0-9]){re.escape(w)}(?![A-Za-z0-9])", re.IGNORECASE)
            for w in [*raw.get("genes", []), *raw.get("words", [])]
        ),
    )


@cache
def table() -> Table:
    raw = json.loads(_TABLE.read_text(encoding="utf-8"))
    types = tuple(
        CancerType(
            key=key,
            label=value["label"],
            snomed=frozenset(value.get("snomed", [])),
            icd10cm=tuple(p.upper() for p in value.get("icd10cm", [])),
            needs=tuple(_need(n) for n in value["needs"]),
        )
        for key, value in raw["cancer_types"].items()
    )
    return Table(tuple(_need(n) for n in raw["general"]), types)


# --------------------------------------------------------------------------- readers


def _codings(concept: Any) -> Iterable[dict[str, Any]]:
    if isinstance(concept, dict):
        for c in concept.get("coding") or []:
            if isinstance(c, dict):
                yield c


def _classes(resource: Resource) -> set[str]:
    return {
        str(t.get("code"))
        for t in (resource.get("meta") or {}).get("tag") or []
        if isinstance(t, dict) and t.get("system") == CLASS_SYSTEM
    }


def _concept(resource: Resource) -> Any:
    if resource["resourceType"] == "DocumentReference":
        return resource.get("type")
    return resource.get("code")


def _texts(concept: Any) -> list[str]:
    out = [str(c["display"]) for c in _codings(concept) if c.get("display")]
    if isinstance(concept, dict) and concept.get("text"):
        out.append(str(concept["text"]))
    return out


def _genes(resource: Resource) -> set[str]:
    """HGNC symbols named by gene-studied components (display, text or the code itself)."""
    found: set[str] = set()
    for component in resource.get("component") or []:
        if not isinstance(component, dict):
            continue
        if not any(c.get("code") == GENE_STUDIED for c in _codings(component.get("code"))):
            continue
        value = component.get("valueCodeableConcept")
        found.update(t.upper() for t in _texts(value))
        found.update(str(c.get("code", "")).upper() for c in _codings(value))
    return found


def _ref(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _supplies(need: Need, resource: Resource, classes: set[str]) -> bool:
    if need.classes & classes:
        return True
    if resource["resourceType"] not in ("Observation", "DiagnosticReport", "DocumentReference"):
        return False
    concept = _concept(resource)
    if need.codes and any(
        (str(c.get("system", "")), str(c.get("code", ""))) in need.codes for c in _codings(concept)
    ):
        return True
    if need.genes and need.genes & _genes(resource):
        return True
    if need.words:
        texts = _texts(concept)
        return any(p.search(t) for p in need.words for t in texts)
    return False


def cancer_types(resources: Iterable[Resource]) -> list[dict[str, Any]]:
    """The cancer type of each claimed primary cancer condition (those of a known type)."""
    out: list[dict[str, Any]] = []
    types = table().cancer_types
    for resource in resources:
        if resource["resourceType"] != "Condition":
            continue
        if PRIMARY_PROFILE not in ((resource.get("meta") or {}).get("profile") or []):
            continue
        for coding in _codings(resource.get("code")):
            system, code = str(coding.get("system", "")), str(coding.get("code", ""))
            found = next((t for t in types if t.matches(system, code)), None)
            if found is not None:
                out.append(
                    {
                        "type": found.key,
                        "label": found.label,
                        "condition": _ref(resource),
                        "code": {"system": system, "code": code, "display": coding.get("display")},
                    }
                )
                break
    return out


def completeness(resources: Iterable[Resource]) -> dict[str, Any]:
    """The completeness block of the case summary.

    `{need: {"present", "count", "resources"}}` for the general needs (the keys the summary
    always had), `cancer` (the cancer type of each primary cancer condition), `checklist` (every
    need of this case in order, general first, with label) and `missing` (the keys not present).
    """
    resources = list(resources)
    detected = cancer_types(resources)
    by_key = {t.key: t for t in table().cancer_types}
    needs: list[Need] = list(table().general)
    for found in detected:
        for need in by_key[found["type"]].needs:
            if all(n.key != need.key for n in needs):
                needs.append(need)
    supplied: dict[str, list[str]] = {n.key: [] for n in needs}
    for resource in resources:
        classes = _classes(resource)
        for need in needs:
            if _supplies(need, resource, classes):
                supplied[need.key].append(_ref(resource))
    summary: dict[str, Any] = {}
    checklist: list[dict[str, Any]] = []
    for need in needs:
        refs = supplied[need.key]
        item = {"present": bool(refs), "count": len(refs), "resources": refs[:MAX_LISTED]}
        if need in table().general:
            summary[need.key] = item
        checklist.append({"key": need.key, "label": need.label, **item})
    summary["cancer"] = detected
    summary["checklist"] = checklist
    summary["missing"] = [c["key"] for c in checklist if not c["present"]]
    return summary


__all__ = ["cancer_types", "completeness", "table"]
