"""HL7 v2: nothing dropped silently, and every generated URI is a valid URI.

For every v2 fixture, each populated field of a mapped segment is either read by the mapper
(hl7v2.MAPPED_FIELDS) or reported as an OperationOutcome issue with its path (DESIGN.md
"Nothing silently dropped"; V2-02..V2-05). The raw ER7 is split here independently of the
`hl7` package the mapper uses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from mappers import hl7v2
from tests.unit.mappers._helpers import FIXTURES, map_one

V2_FILES = sorted(p for p in (FIXTURES / "hl7v2").iterdir() if p.is_file())
_CONTACT_SYSTEMS = {"phone", "fax", "email", "pager", "url", "sms", "other"}
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]+")


def _populated_fields(path: Path) -> list[str]:
    """`SEG[n].f` of every populated field of a mapped segment, message by message."""
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    lines = [ln for ln in re.split(r"\r\n|\r|\n", text) if ln.strip()]
    out: list[str] = []
    counts: dict[str, int] = {}
    sep = "|"
    for line in lines:
        if line.startswith("MSH"):
            counts = {}
            sep = line[3]
        name = line[:3]
        counts[name] = counts.get(name, 0) + 1
        if name not in hl7v2.MAPPED_FIELDS:
            continue
        parts = line.split(sep)
        fields = (
            {n: parts[n - 1] for n in range(3, len(parts) + 1)}
            if name == "MSH"
            else {n: parts[n] for n in range(1, len(parts))}
        )
        out += [
            f"{name}[{counts[name]}].{n}" for n, v in fields.items() if any(c.isalnum() for c in v)
        ]
    return out


@pytest.mark.parametrize("path", V2_FILES, ids=lambda p: p.name)
def test_every_populated_field_is_mapped_or_reported(path: Path) -> None:
    _, issues, _ = map_one(path)
    reported = {e for i in issues for e in i.get("expression", [])}
    missing = []
    for where in _populated_fields(path):
        name, field = where.split("[")[0], int(where.rsplit(".", 1)[1])
        if field not in hl7v2.MAPPED_FIELDS[name] and where not in reported:
            missing.append(where)
    assert not missing, f"populated fields neither mapped nor reported: {missing}"


@pytest.mark.parametrize(
    ("name", "paths"),
    [
        ("ORU-R01-01.hl7", {"PID[1].10", "PID[1].22"}),
        ("LAB-ORU-1.hl7", {"PID[1].10", "OBR[1].16"}),
    ],
)
def test_unmapped_fields_are_reported_with_their_path(name: str, paths: set[str]) -> None:
    _, issues, _ = map_one(FIXTURES / "hl7v2" / name)
    reported = {e for i in issues for e in i.get("expression", [])}
    assert paths <= reported


def test_pid_13_phone_is_mapped_not_reported() -> None:
    resources, issues, _ = map_one(FIXTURES / "hl7v2" / "ORU-R01-01.hl7")
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    assert patient.get("telecom") or not any(
        e == "PID[1].13" for i in issues for e in i.get("expression", [])
    )


def _uris(value: Any, key: str = "") -> list[str]:
    if isinstance(value, dict):
        return [u for k, v in value.items() for u in _uris(v, k)]
    if isinstance(value, list):
        return [u for v in value for u in _uris(v, key)]
    if key == "system" and value in _CONTACT_SYSTEMS:
        return []  # ContactPoint.system is a code, not a URI
    return [value] if key in ("system", "url") and isinstance(value, str) else []


@pytest.mark.parametrize("path", V2_FILES, ids=lambda p: p.name)
def test_generated_uris_are_valid(path: Path) -> None:
    resources, _, _ = map_one(path)
    bad = [u for r in resources for u in _uris(r) if not _URI_RE.fullmatch(u)]
    assert not bad, bad


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("POST 12H CFST", "urn:fhir-gateway:v2-coding-system:POST%2012H%20CFST"),
        ("2.16.840.1.113883.6.1", "urn:oid:2.16.840.1.113883.6.1"),
        ("L", "urn:fhir-gateway:v2-coding-system:L"),
    ],
)
def test_coding_system_names_become_valid_uris(system: str, expected: str) -> None:
    assert hl7v2._urn("v2-coding-system", system) == expected


@pytest.mark.parametrize(
    ("hd", "expected"),
    [
        (("NIST MPI", "", ""), "urn:fhir-gateway:v2-assigning-authority:NIST%20MPI"),
        (("NIST", "2.16.840.1.113883.3.72.5.30.2", "ISO"), "urn:oid:2.16.840.1.113883.3.72.5.30.2"),
        (("", "http://example.org/mrn", "URI"), "http://example.org/mrn"),
        (("", "", ""), None),
    ],
)
def test_assigning_authority_system(hd: tuple[str, str, str], expected: str | None) -> None:
    assert hl7v2._authority_system(*hd) == expected


def test_v2_table_names_map_to_hl7_code_systems() -> None:
    msg = hl7v2.parse_message(
        b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5.1\r"
        b"PID|1||123^^^NIST MPI||Doe^Jane||19700101|F|||||||||||||||||||||20240102+0000|Y\r"
        b"OBR|1||F1|1234-5^X^LN|||20240101||||||||||||||20240101+0000|||F\r"
        b"OBX|1|CWE|1234-5^X^LN||Y^Yes^HL70136||||||F\r"
    )[0]
    resources, issues = hl7v2.message_to_resources(msg, "s")
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    assert patient["identifier"][0]["system"].endswith(":NIST%20MPI")
    assert patient["deceasedDateTime"].startswith("2024-01-02")
    obs = next(r for r in resources if r["resourceType"] == "Observation")
    assert obs["valueCodeableConcept"]["coding"][0]["system"] == (
        "http://terminology.hl7.org/CodeSystem/v2-0136"
    )
    assert any(i.get("expression") == ["MSH[1].3"] for i in issues)
