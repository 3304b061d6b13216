"""Tumour-marker unit conversion: the precomputed factor table (mappers/codes/ucum-factors.json)
is ucumvert's own arithmetic, and a unit the table lacks still converts through ucumvert."""

from __future__ import annotations

import math
import random

import pytest

from mappers import units
from mappers.terminology import load_code_table, terminology


def _file() -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = load_code_table("ucum-factors.json")["factors"]
    return table


def test_table_is_ucumverts_factors() -> None:
    """Every factor (and every 'not convertible') as ucumvert computes it now: a change of
    either unit list or of ucumvert/pint fails here until `python scripts/ucum_factors.py`."""
    stored = _file()
    fresh = units.factor_table(terminology().tumor_marker_units.values())
    assert stored.keys() == fresh.keys()
    for target, row in fresh.items():
        assert stored[target].keys() == row.keys(), target
        for unit, factor in row.items():
            got = stored[target][unit]
            if factor is None:
                assert got is None, (unit, target)
            else:
                assert got is not None, (unit, target)
                assert math.isclose(got, factor, rel_tol=1e-15), (unit, target)


def test_table_covers_every_canonical_unit_and_converts_the_common_ones() -> None:
    stored = _file()
    assert set(terminology().tumor_marker_units.values()) == set(stored)
    assert stored["ng/mL"]["ug/L"] == pytest.approx(1.0)
    assert stored["ng/mL"]["pg/mL"] == pytest.approx(1e-3)
    assert stored["U/mL"]["kU/L"] == pytest.approx(1.0)
    assert stored["ng/mL"]["nmol/L"] is None  # mass vs substance: never guessed


@pytest.mark.parametrize("target", sorted(set(terminology().tumor_marker_units.values())))
def test_table_conversion_equals_ucumvert(target: str) -> None:
    """The rounded value through the table is the one ucumvert's registry gives, for values
    across the range a laboratory reports."""
    rng = random.Random(17)
    values = [0.0, 1.0, 0.001, 2.5, 35.0, 1e6, *(rng.uniform(0, 10_000) for _ in range(6))]
    for unit in units.TABLE_UNITS:
        if unit == target:
            continue
        for value in values:
            via_registry = units._registry_magnitude(value, unit, target)
            expected = None if via_registry is None else units._rounded(via_registry)
            assert units.convert(value, unit, target) == expected, (value, unit, target)


def test_table_hit_does_not_build_the_registry() -> None:
    units._registry.cache_clear()
    units._build_registry.cache_clear()
    assert units.convert(2.5, "ug/L", "ng/mL") == 2.5
    assert units.convert(1.0, "nmol/L", "ng/mL") is None
    assert units._build_registry.cache_info().currsize == 0


def test_unit_outside_the_table_converts_through_ucumvert() -> None:
    assert "ng/uL" not in units.TABLE_UNITS
    assert units.convert(1.0, "ng/uL", "ng/mL") == 1000.0
    assert units.convert(1.0, "mg", "ng/mL") is None  # another dimension
    assert units.convert(1.0, "not a unit", "ng/mL") is None
