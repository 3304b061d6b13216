"""Tumour-marker quantities -> one canonical UCUM unit per marker (arithmetic: ucumvert + pint).

The canonical unit of each marker code is data (mappers/codes/mcode-value-sets.json,
"tumor-marker-units"). A value in another unit of the same dimension is converted; the original
Quantity is kept inside the new one as the FHIR R4 core extension iso21090-PQ-translation
("an alternative representation of the same physical quantity expressed in a different unit"),
so nothing the source said is lost. Values whose unit is not UCUM, or of another dimension
(e.g. nmol/L for a mass-concentration marker), are left as sent and reported.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from fhir_gateway.resources import LOINC, UCUM, Resource
from mappers._common import Issue, issue
from mappers.terminology import Terminology

PQ_TRANSLATION = "http://hl7.org/fhir/StructureDefinition/iso21090-PQ-translation"
_SIGNIFICANT = 12  # enough for any lab value; hides binary floating-point noise of the factors


_REGISTRY_LOCK = threading.Lock()


@functools.cache
def _registry() -> Any:
    with _REGISTRY_LOCK:  # built once even when two normalisations start together
        return _build_registry()


@functools.cache
def _build_registry() -> Any:
    from ucumvert import PintUcumRegistry  # 0.5-1 s to build: on first use, or `preload()`

    return PintUcumRegistry()


def preload() -> None:
    """Build the UCUM registry now (a service calls this at start, off the request path), so
    the first case's normalisation does not pay for it."""
    _registry()


def convert(value: float, from_unit: str, to_unit: str) -> float | None:
    """`value` in UCUM `from_unit` expressed in UCUM `to_unit`, or None when not convertible."""
    if from_unit == to_unit:
        return value
    registry = _registry()
    try:
        quantity = (value * registry.from_ucum(from_unit)).to(registry.from_ucum(to_unit))
    except Exception:  # ucumvert: InvalidUcumError; pint: DimensionalityError, UndefinedUnitError
        return None
    return float(f"{float(quantity.magnitude):.{_SIGNIFICANT}g}")


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
