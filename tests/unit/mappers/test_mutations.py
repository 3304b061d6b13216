"""Hypothesis: random mutations of valid inputs raise nothing but our InputError family.

The kind-specific mappers are called directly (not `map_document`, whose safety net would turn
a mapper bug into a MappingError and hide it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_gateway.casebundle.assemble import SourceBatch, assemble_case_bundle
from fhir_gateway.errors import InputError
from mappers import ccda, fhir, hl7v2
from mappers._common import MapResult
from tests.unit.mappers._helpers import FIXTURES

# More examples for a deeper run: FHIR_GATEWAY_HYPOTHESIS_EXAMPLES=2000 pytest ...
SETTINGS = settings(
    max_examples=int(os.environ.get("FHIR_GATEWAY_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SAMPLES: dict[str, tuple[bytes, Callable[[bytes, str], MapResult]]] = {
    "fhir": (
        (FIXTURES / "fhir" / "Observation-mCODETNMClinicalStageGroupExample01.json").read_bytes(),
        fhir.document_to_resources,
    ),
    "hl7v2": ((FIXTURES / "hl7v2" / "LAB-ORU-1.hl7").read_bytes(), hl7v2.document_to_resources),
    "ccda": (
        (FIXTURES / "ccda" / "CCD_2.xml").read_bytes()[:60000],
        ccda.map_bytes,
    ),
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _mutate(data: bytes, position: int, action: int, byte: int) -> bytes:
    position %= max(len(data), 1)
    if action == 0:
        return data[:position] + data[position + 1 :]
    if action == 1:
        return data[:position] + bytes([byte]) + data[position:]
    if action == 2:
        return data[:position] + bytes([byte]) + data[position + 1 :]
    return data[:position]  # truncation


def _only_input_errors(mapper: Callable[[bytes, str], MapResult], data: bytes) -> None:
    try:
        result = mapper(data, "src")
    except InputError as exc:
        message = exc.message
        assert message
        return
    # What a mapper accepted, the case bundle assembles without error.
    batch = SourceBatch("src", result.resources, result.issues, result.kind, "doc", "2026-01-01Z")
    bundle = assemble_case_bundle("p", [batch]).as_dict()
    assert sum(e["resource"]["resourceType"] == "Patient" for e in bundle["entry"]) == 1


@pytest.mark.parametrize("kind", sorted(SAMPLES))
@SETTINGS
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 3), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_byte_mutations_raise_only_input_errors(
    kind: str, mutations: list[tuple[int, int, int]]
) -> None:
    data, mapper = SAMPLES[kind]
    for position, action, byte in mutations:
        data = _mutate(data, position, action, byte)
    _only_input_errors(mapper, data)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


@SETTINGS
@given(choice=st.integers(0, 10**6), value=JSON_VALUES)
def test_json_structure_mutations_raise_only_input_errors(choice: int, value: Any) -> None:
    for name in ("ctms_breast_metastatic_patient_data.json", "mef_csv-staging-bundle.json"):
        document = json.loads((FIXTURES / "fhir" / name).read_bytes().decode("utf-8-sig"))
        paths = _paths(document)[1:]
        path = paths[choice % len(paths)]
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        _only_input_errors(fhir.document_to_resources, json.dumps(document).encode())


@SETTINGS
@given(
    segment=st.sampled_from(["OBX", "OBR", "PID", "SPM", "NTE", "ZZZ"]),
    fields=st.lists(st.text(alphabet="abc123^~&\\|.-+ ", max_size=12), max_size=26),
)
def test_random_hl7_segments_raise_only_input_errors(segment: str, fields: list[str]) -> None:
    data, _ = SAMPLES["hl7v2"]
    extra = (segment + "|" + "|".join(fields)).encode()
    _only_input_errors(hl7v2.document_to_resources, data.rstrip() + b"\r" + extra + b"\r")
