"""PHI terms of the fixtures (patient names, identifiers, birth dates) and a log collector that
the whole test session scans for them (DESIGN.md: logs never carry PHI)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MIN_LEN = 5  # shorter strings (e.g. "Ana", "M") match too much unrelated text


def _patients(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if value.get("resourceType") == "Patient":
            yield value
        for v in value.values():
            yield from _patients(v)
    elif isinstance(value, list):
        for v in value:
            yield from _patients(v)


def _fhir_terms(patient: dict[str, Any]) -> set[str]:
    terms: set[str] = set()
    for name in patient.get("name") or []:
        terms.add(str(name.get("family") or ""))
        terms.update(str(g) for g in name.get("given") or [])
    for ident in patient.get("identifier") or []:
        terms.add(str(ident.get("value") or ""))
    terms.add(str(patient.get("birthDate") or ""))
    return terms


def _json_docs(path: Path) -> Iterator[Any]:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if path.suffix == ".ndjson":
        for line in text.splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
    else:
        try:
            yield json.loads(text)
        except json.JSONDecodeError:
            return


def _hl7_terms(path: Path) -> set[str]:
    terms: set[str] = set()
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    for seg in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        if seg.startswith("PID") and len(seg) > 4:
            fields = seg.split(seg[3])
            comp = seg[4] if len(seg) > 4 else "^"
            for index in (3, 5, 7):  # PID-3 identifiers, PID-5 name, PID-7 birth date
                if index < len(fields):
                    terms.update(fields[index].split(comp)[:3])
    return terms


def _dicom_terms(path: Path) -> set[str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        terms = {str(ds.get("PatientID", "")), str(ds.get("PatientBirthDate", ""))}
        name = ds.get("PatientName")
        if name is not None:
            terms.update(str(p) for p in (name.family_name, name.given_name))
        return terms
    except Exception:
        return set()


def phi_terms(fixtures: Path) -> set[str]:
    terms: set[str] = set()
    for path in fixtures.rglob("*"):
        if not path.is_file() or "bad" in path.parts:
            continue
        if path.suffix in (".json", ".ndjson"):
            for doc in _json_docs(path):
                for patient in _patients(doc):
                    terms |= _fhir_terms(patient)
        elif path.suffix in (".hl7", ".er7", ".txt") and "hl7" in str(path):
            terms |= _hl7_terms(path)
        elif path.suffix == ".dcm":
            terms |= _dicom_terms(path)
    return {t.strip() for t in terms if len(t.strip()) >= MIN_LEN}


class Collector(logging.Handler):
    """Keeps the text of every log record of the session."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = str(record.msg) if not record.args else record.getMessage()
        except Exception:
            text = repr(record.msg)
        self.records.append((record.name, text))


def scan(records: list[tuple[str, str]], terms: set[str]) -> list[tuple[str, str, str]]:
    hits = []
    for name, text in records:
        for term in terms:
            if term in text:
                hits.append((name, term, text[:300]))
    return hits
