"""Code tables (mappers/codes/*.json) loaded once: code system aliases, UCUM units, classes.

The tables are data, not `if` chains (STYLE.md §3). `known_codes()` lists every code the tables
can add to a resource, so tests can check that each emitted code is traceable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources as importlib_resources
from typing import Any

from fhir_gateway.resources import ICD10CM, LOINC, SNOMED, UCUM

CLASS_SYSTEM = "urn:fhir-gateway:class"
"""meta.tag system carrying the classification of a normalised resource."""


def _load(name: str) -> dict[str, Any]:
    text = importlib_resources.files("mappers.codes").joinpath(name).read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@dataclass(frozen=True)
class Terminology:
    system_aliases: dict[str, str]
    canonical_systems: frozenset[str]
    ucum_codes: frozenset[str]
    unit_aliases: dict[str, str]
    category_classes: dict[tuple[str, str], str]
    code_classes: dict[tuple[str, str], str]
    icd10_prefixes: list[tuple[str, str]]
    disease_status_emit: tuple[str, str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def canonical_system(self, system: str) -> str | None:
        """The canonical URI for an alias, or None when `system` is canonical or unknown."""
        if system in self.canonical_systems:
            return None
        return self.system_aliases.get(system) or self.system_aliases.get(system.upper())

    def ucum(self, unit: str) -> str | None:
        """The UCUM code for a unit spelling when it denotes exactly that unit, else None."""
        unit = unit.strip()
        if unit in self.ucum_codes:
            return unit
        return self.unit_aliases.get(unit)

    def classify_code(self, system: str, code: str) -> str | None:
        found = self.code_classes.get((system, code))
        if found is None and system == ICD10CM:
            bare = code.upper()
            for prefix, cls in self.icd10_prefixes:
                if bare.startswith(prefix):
                    return cls
        return found

    def classify_category(self, system: str, code: str) -> str | None:
        return self.category_classes.get((system, code))


@cache
def terminology() -> Terminology:
    systems = _load("code-systems.json")["aliases"]
    aliases: dict[str, str] = {}
    for canonical, names in systems.items():
        for name in names:
            aliases[name] = canonical
            aliases[name.upper()] = canonical
    units = _load("units.json")
    classes = _load("classes.json")
    category_classes = {
        (system, code): cls
        for cls, pairs in classes["categories"].items()
        for system, code in pairs
    }
    code_classes: dict[tuple[str, str], str] = {}
    icd10: list[tuple[str, str]] = []
    for cls, by_system in classes["codes"].items():
        for system, codes in by_system.items():
            if system == "icd10_prefix":
                icd10 += [(prefix, cls) for prefix in codes]
                continue
            for code in codes:
                code_classes.setdefault((system, code), cls)
    # Longest prefix first, so C77 (secondary) wins over C7 (primary).
    icd10.sort(key=lambda item: -len(item[0]))
    emit = classes["disease_status_emit"]
    return Terminology(
        system_aliases=aliases,
        canonical_systems=frozenset(systems),
        ucum_codes=frozenset(units["ucum_codes"]),
        unit_aliases=dict(units["aliases"]),
        category_classes=category_classes,
        code_classes=code_classes,
        icd10_prefixes=icd10,
        disease_status_emit=(emit[0], emit[1], emit[2]),
    )


def known_codes() -> frozenset[str]:
    """Every code our tables can emit (for traceability checks in tests)."""
    t = terminology()
    codes = {code for _, code in t.code_classes} | {code for _, code in t.category_classes}
    codes |= set(t.ucum_codes) | set(t.unit_aliases.values()) | {t.disease_status_emit[1]}
    return frozenset(codes)


__all__ = ["CLASS_SYSTEM", "LOINC", "SNOMED", "UCUM", "Terminology", "known_codes", "terminology"]
