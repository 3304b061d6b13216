"""One parametrised invariant test over every fixture (and over all of them as one case).

For the case bundle built from each fixture: it validates with fhir.resources R4B, every
reference resolves inside the bundle, ids are unique and stable across two runs, no element is
empty, and every clinical code in the output appears in the source or in our code tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from mappers.terminology import known_codes
from tests.unit.mappers._helpers import case_of, fixture_files, fixture_id

ALL = [[p] for p in fixture_files()] + [fixture_files()]
IDS = [fixture_id(p[0]) for p in ALL[:-1]] + ["all-fixtures-as-one-case"]
# Codes of these systems are structural (status, category, data-absent-reason, our own tags):
# FHIR fixes them per element, so they need not be traceable to the source.
STRUCTURAL = (
    "http://terminology.hl7.org/CodeSystem/",
    "urn:fhir-gateway:",
    "http://hl7.org/fhir/",
    "http://ihe.net/",
)
CLINICAL = (
    "http://loinc.org",
    "http://snomed.info/sct",
    "http://hl7.org/fhir/sid/icd-10-cm",
    "http://www.nlm.nih.gov/research/umls/rxnorm",
    "http://unitsofmeasure.org",
)


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")


@pytest.mark.parametrize("paths", ALL, ids=IDS)
def test_case_bundle_invariants(paths: list[Path]) -> None:
    bundle = case_of(paths).as_dict()

    Bundle.model_validate(bundle)  # R4B structural validation

    assert bundle["type"] == "collection"
    resources = [entry["resource"] for entry in bundle["entry"]]
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    assert len(patients) == 1
    assert patients[0]["id"] == bundle["id"]

    refs = [f"{r['resourceType']}/{r['id']}" for r in resources]
    assert len(refs) == len(set(refs)), "duplicate resource ids"
    known = set(refs)
    for where, node in _walk(bundle):
        if isinstance(node, dict) and isinstance(node.get("reference"), str):
            ref = node["reference"]
            assert ref.startswith("#") or ref in known, f"unresolved {ref} at {where}"
        assert node not in ("", [], {}, None), f"empty element at {where}"

    again = case_of(paths).as_dict()
    assert [e["fullUrl"] for e in again["entry"]] == [e["fullUrl"] for e in bundle["entry"]]
    assert again == bundle

    source_text = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in paths)
    ours = known_codes()
    for where, node in _walk(bundle):
        if isinstance(node, dict) and "code" in node and isinstance(node.get("system"), str):
            system, code = node["system"], str(node["code"])
            if system.startswith(STRUCTURAL) and not system.startswith(CLINICAL):
                continue
            assert code in ours or code in source_text or json.dumps(code)[1:-1] in source_text, (
                f"code {system}|{code} at {where} is neither in the source nor in our tables"
            )
