"""Code tables (mappers/codes/*.json) loaded once: code system aliases, UCUM units, classes,
and the mCODE STU4 value sets (mcode-value-sets.json).

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


def load_code_table(name: str) -> dict[str, Any]:
    """A code table of mappers/codes/ as JSON (package data: no I/O beyond the package)."""
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
    icd10_sets: dict[str, frozenset[str]]  # class -> ICD-10-CM codes the value set lists
    tumor_marker_units: dict[str, str]  # LOINC code -> canonical UCUM unit
    tumor_marker_value_types: frozenset[str]
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
            return self.icd10_class(code)
        return found

    def icd10_class(self, code: str) -> str | None:
        """The class of an ICD-10-CM code: it or an ancestor (trailing characters dropped, not
        below the 3-character category) is listed by an mCODE value set."""
        bare = code.strip().upper()
        for cls, codes in self.icd10_sets.items():
            candidate = bare
            while len(candidate) >= 3:
                if candidate in codes:
                    return cls
                candidate = candidate[:-1].rstrip(".")
        return None

    def classify_category(self, system: str, code: str) -> str | None:
        return self.category_classes.get((system, code))


@cache
def terminology() -> Terminology:
    systems = load_code_table("code-systems.json")["aliases"]
    aliases: dict[str, str] = {}
    for canonical, names in systems.items():
        for name in names:
            aliases[name] = canonical
            aliases[name.upper()] = canonical
    units = load_code_table("units.json")
    classes = load_code_table("classes.json")
    category_classes = {
        (system, code): cls
        for cls, pairs in classes["categories"].items()
        for system, code in pairs
    }
    code_classes: dict[tuple[str, str], str] = {}
    value_sets = load_code_table("mcode-value-sets.json")
    icd10: dict[str, frozenset[str]] = {}
    # Secondary first: its SNOMED descendants are excluded from the primary value set.
    for cls in ("secondary-cancer-condition", "primary-cancer-condition"):
        vs = value_sets[cls]
        icd10[cls] = frozenset(vs["icd10cm"])
        for code in [*vs["snomed_is_a"], *vs["snomed_exact"], *vs["snomed_descendants"]]:
            code_classes.setdefault((SNOMED, code), cls)
    markers = value_sets["tumor-marker-test"]
    for code in [*markers["loinc"], *markers["local_loinc"]]:
        code_classes.setdefault((LOINC, code), "tumor-marker")
    for cls, by_system in classes["codes"].items():
        for system, codes in by_system.items():
            for code in codes:
                code_classes.setdefault((system, code), cls)
    emit = classes["disease_status_emit"]
    return Terminology(
        system_aliases=aliases,
        canonical_systems=frozenset(systems),
        ucum_codes=frozenset(units["ucum_codes"]),
        unit_aliases=dict(units["aliases"]),
        category_classes=category_classes,
        code_classes=code_classes,
        icd10_sets=icd10,
        tumor_marker_units={
            k: v for k, v in value_sets["tumor-marker-units"].items() if not k.startswith("_")
        },
        tumor_marker_value_types=frozenset(markers["value_types"]),
        disease_status_emit=(emit[0], emit[1], emit[2]),
    )


def known_codes() -> frozenset[str]:
    """Every code our tables can emit (for traceability checks in tests)."""
    t = terminology()
    codes = {code for _, code in t.code_classes} | {code for _, code in t.category_classes}
    codes |= set(t.ucum_codes) | set(t.unit_aliases.values()) | {t.disease_status_emit[1]}
    codes |= set(t.tumor_marker_units.values()) | {c for s in t.icd10_sets.values() for c in s}
    return frozenset(codes)


__all__ = ["CLASS_SYSTEM", "LOINC", "SNOMED", "UCUM", "Terminology", "known_codes", "terminology"]
