"""Tumour-marker quantities -> one canonical UCUM unit per marker (arithmetic: ucumvert + pint).

The canonical unit of each marker code is data (mappers/codes/mcode-value-sets.json,
"tumor-marker-units"). A value in another unit of the same dimension is converted; the original
Quantity is kept inside the new one as the FHIR R4 core extension iso21090-PQ-translation
("an alternative representation of the same physical quantity expressed in a different unit"),
so nothing the source said is lost. Values whose unit is not UCUM, or of another dimension
(e.g. nmol/L for a mass-concentration marker), are left as sent and reported.

The factors from the units markers are reported in to each canonical unit are ucumvert's own,
computed once into mappers/codes/ucum-factors.json (`python scripts/ucum_factors.py`; a test
recomputes every one with ucumvert). ucumvert's registry (pint's ~1,000 units and a parser:
~11 MB for the life of the process, 0.5-1 s to build) is built only for a unit the table does
not list.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable
from typing import Any

from fhir_gateway.resources import LOINC, UCUM, Resource
from mappers._common import Issue, issue
from mappers.terminology import Terminology, load_code_table

PQ_TRANSLATION = "http://hl7.org/fhir/StructureDefinition/iso21090-PQ-translation"
_SIGNIFICANT = 12  # enough for any lab value; hides binary floating-point noise of the factors

# The units the factor table covers: how laboratories report tumour markers (mass and substance
# concentrations, enzyme and international units per volume, substance content, fractions).
TABLE_UNITS = (
    *("g/L", "g/dL", "g/mL", "mg/L", "mg/dL", "mg/mL", "ug/L", "ug/dL", "ug/mL"),
    *("ng/L", "ng/dL", "ng/mL", "pg/L", "pg/mL"),
    *("mol/L", "mmol/L", "umol/L", "nmol/L", "pmol/L", "fmol/L", "nmol/mL", "pmol/mL", "fmol/mL"),
    *("U/L", "U/mL", "U/dL", "kU/L", "kU/mL", "mU/L", "mU/mL"),
    *("[IU]/L", "[IU]/mL", "k[IU]/L", "m[IU]/L", "m[IU]/mL", "[iU]/L", "[iU]/mL"),
    *("fmol/mg", "pmol/mg", "fmol/g", "pmol/g", "nmol/g", "amol/mg"),
    *("%", "[ppth]", "[ppm]", "1"),
)

_REGISTRY_LOCK = threading.Lock()


@functools.cache
def _registry() -> Any:
    with _REGISTRY_LOCK:  # built once even when two normalisations start together
        return _build_registry()


@functools.cache
def _build_registry() -> Any:
    from ucumvert import PintUcumRegistry  # 0.5-1 s to build: on first use, or `preload()`

    return PintUcumRegistry()


@functools.cache
def _factors() -> dict[str, dict[str, float | None]]:
    factors: dict[str, dict[str, float | None]] = load_code_table("ucum-factors.json")["factors"]
    return factors


def preload() -> None:
    """Load the factor table now (a service calls this at start, off the request path)."""
    _factors()


def convert(value: float, from_unit: str, to_unit: str) -> float | None:
    """`value` in UCUM `from_unit` expressed in UCUM `to_unit`, or None when not convertible."""
    if from_unit == to_unit:
        return value
    listed = _factors().get(to_unit, {})
    if from_unit in listed:
        factor = listed[from_unit]
        return None if factor is None else _rounded(value * factor)
    magnitude = _registry_magnitude(value, from_unit, to_unit)
    return None if magnitude is None else _rounded(magnitude)


def _rounded(value: float) -> float:
    return float(f"{value:.{_SIGNIFICANT}g}")


def _registry_magnitude(value: float, from_unit: str, to_unit: str) -> float | None:
    registry = _registry()
    try:
        quantity = (value * registry.from_ucum(from_unit)).to(registry.from_ucum(to_unit))
    except Exception:  # ucumvert: InvalidUcumError; pint: DimensionalityError, UndefinedUnitError
        return None
    return float(quantity.magnitude)


def factor_table(
    targets: Iterable[str], units: Iterable[str] = TABLE_UNITS
) -> dict[str, dict[str, float | None]]:
    """ucumvert's factor from each of `units` to each target (None: not convertible), as
    mappers/codes/ucum-factors.json holds it."""
    units = list(units)
    return {
        target: {u: _registry_magnitude(1.0, u, target) for u in units if u != target}
        for target in sorted(set(targets))
    }


def canonical_marker_quantity(resource: Resource, terms: Terminology) -> Issue | None:
    """Convert `resource.valueQuantity` to its marker's canonical unit, in place."""
    quantity = resource.get("valueQuantity")
    if not isinstance(quantity, dict) or PQ_TRANSLATION in str(quantity.get("extension")):
        return None
    value = quantity.get("value")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    codes = [
        c.get("code")
        for c in (resource.get("code") or {}).get("coding") or []
        if isinstance(c, dict) and c.get("system") == LOINC
    ]
    units = terms.tumor_marker_units
    target = next((units[c] for c in codes if c in units), None)
    unit = quantity.get("code") if quantity.get("system") == UCUM else None
    if target is None or unit == target:
        return None
    where = f"{resource['resourceType']}/{resource.get('id', '')}.valueQuantity"
    converted = convert(float(value), unit, target) if isinstance(unit, str) else None
    if converted is None:
        return issue(
            "warning",
            "value",
            f"tumour marker unit {quantity.get('code') or quantity.get('unit') or 'missing'!r} "
            f"not convertible to {target}; value kept as sent",
            where,
        )
    original = {k: v for k, v in quantity.items() if k != "extension"}
    resource["valueQuantity"] = {
        "extension": [
            *(quantity.get("extension") or []),
            {"url": PQ_TRANSLATION, "valueQuantity": original},
        ],
        "value": converted,
        "unit": target,
        "system": UCUM,
        "code": target,
    }
    if "comparator" in quantity:
        resource["valueQuantity"]["comparator"] = quantity["comparator"]
    for ranges in resource.get("referenceRange") or []:
        for end in ("low", "high"):
            bound = ranges.get(end) if isinstance(ranges, dict) else None
            same_unit = isinstance(bound, dict) and bound.get("code") == unit
            if isinstance(bound, dict) and same_unit and bound.get("system") == UCUM:
                moved = convert(float(bound.get("value", 0)), str(unit), target)
                if moved is not None:
                    ranges[end] = {**bound, "value": moved, "unit": target, "code": target}
    return issue(
        "information",
        "informational",
        f"tumour marker value converted from {unit} to {target}; original kept "
        "(iso21090-PQ-translation)",
        where,
    )


__all__ = ["PQ_TRANSLATION", "canonical_marker_quantity", "convert"]
