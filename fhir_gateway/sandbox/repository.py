"""The sandbox EHR's data: resources loaded from a folder, searched and written in memory.

Loads Synthea transaction bundles (`urn:uuid:` references rewritten to `Type/id`, as a real
server does when it processes the transaction), NDJSON files and single resources.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhir_gateway.errors import InputError, NotFoundError, PreconditionFailedError
from fhir_gateway.resources import Resource, split_token

# Search parameters the sandbox understands, besides _count/_format (others get a 400, as HAPI).
COMMON_PARAMS = frozenset({"_id", "_lastUpdated", "identifier", "target"})
PATIENT_PARAMS = frozenset({"patient", "subject"})
TOKEN_PARAMS = frozenset({"category", "code", "status", "type"})
REFERENCE_FIELDS = ("subject", "patient")


def now_instant() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def load_folder(data_dir: Path) -> list[Resource]:
    """Every resource in `data_dir` (*.json bundles or resources, *.ndjson; or that one file),
    with `urn:uuid:` references resolved.

    Raises:
        InputError: a file is not JSON or holds something that is not a resource.
    """
    resources: list[Resource] = []
    paths = [data_dir] if data_dir.is_file() else sorted(data_dir.rglob("*"))
    for path in paths:
        if path.suffix == ".ndjson":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    resources += _resources_of(_parse(line, f"{path.name}:{n}"))
        elif path.suffix == ".json":
            resources += _resources_of(_parse(path.read_text(encoding="utf-8"), path.name))
    return resources


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"sandbox data {where} is not JSON: {exc.msg}") from exc


def _resources_of(doc: Any) -> list[Resource]:
    if not isinstance(doc, dict) or "resourceType" not in doc:
        raise InputError("sandbox data holds something that is not a FHIR resource")
    if doc["resourceType"] != "Bundle":
        return [doc]
    targets: dict[str, str] = {}
    out: list[Resource] = []
    for entry in doc.get("entry") or []:
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        resource.setdefault("id", str(uuid.uuid4()))
        if entry.get("fullUrl"):
            targets[entry["fullUrl"]] = f"{resource['resourceType']}/{resource['id']}"
        out.append(resource)
    for resource in out:
        _rewrite_references(resource, targets)
    return out


def _rewrite_references(value: Any, targets: dict[str, str]) -> None:
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref in targets:
            value["reference"] = targets[ref]
        for child in value.values():
            _rewrite_references(child, targets)
    elif isinstance(value, list):
        for child in value:
            _rewrite_references(child, targets)


@dataclass(frozen=True)
class WriteResult:
    resource: Resource
    status: int  # 200 or 201


class ResourceStore:
    """Thread-safe in-memory resources keyed by (type, id), with versions and lastUpdated."""

    def __init__(self, resources: Iterable[Resource] = ()) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Resource]] = {}
        stamp = now_instant()
        for resource in resources:
            meta = resource.setdefault("meta", {})
            meta.setdefault("versionId", "1")
            meta.setdefault("lastUpdated", stamp)
            self._data.setdefault(resource["resourceType"], {})[resource["id"]] = resource

    def types(self) -> list[str]:
        return sorted(self._data)

    def get(self, resource_type: str, resource_id: str) -> Resource:
        with self._lock:
            found = self._data.get(resource_type, {}).get(resource_id)
        if found is None:
            raise NotFoundError(f"{resource_type}/{resource_id} is not known")
        return found

    def all(self, resource_type: str | None = None) -> list[Resource]:
        with self._lock:
            if resource_type is not None:
                return list(self._data.get(resource_type, {}).values())
            return [r for by_id in self._data.values() for r in by_id.values()]

    def search(self, resource_type: str, params: list[tuple[str, str]]) -> list[Resource]:
        """Resources of a type matching every parameter (values comma-separated = OR).

        Raises:
            InputError: a parameter the sandbox does not support (as HAPI answers 400).
        """
        allowed = COMMON_PARAMS | TOKEN_PARAMS | (PATIENT_PARAMS - {"patient"})
        if resource_type != "Patient":
            allowed |= PATIENT_PARAMS
        for name, _ in params:
            if name.split(":")[0] not in allowed:
                raise InputError(f"unknown search parameter {name!r} for {resource_type}")
        return [r for r in self.all(resource_type) if all(_matches(r, n, v) for n, v in params)]

    def compartment(self, patient_id: str) -> list[Resource]:
        """The Patient and every resource whose subject/patient is that patient."""
        out = [self.get("Patient", patient_id)]
        for resource in self.all():
            if resource["resourceType"] != "Patient" and _refers_to_patient(resource, patient_id):
                out.append(resource)
        return out

    def create(
        self, resource: Resource, if_none_exist: list[tuple[str, str]] | None
    ) -> WriteResult:
        """POST, with conditional create (RS-05: 0 -> 201, 1 -> 200, more -> 412)."""
        with self._lock:
            if if_none_exist is not None:
                found = self._search_unlocked(resource["resourceType"], if_none_exist)
                if len(found) == 1:
                    return WriteResult(found[0], 200)
                if len(found) > 1:
                    raise PreconditionFailedError(
                        f"If-None-Exist matched {len(found)} {resource['resourceType']} resources"
                    )
            stored = copy.deepcopy(resource)
            stored["id"] = str(uuid.uuid4())
            stored["meta"] = {**(stored.get("meta") or {}), "versionId": "1"}
            stored["meta"]["lastUpdated"] = now_instant()
            self._data.setdefault(stored["resourceType"], {})[stored["id"]] = stored
            return WriteResult(stored, 201)

    def update(self, resource: Resource, if_match: str | None) -> WriteResult:
        """PUT by id; `If-Match: W/"n"` must name the current version (RS-03: else 412)."""
        with self._lock:
            by_id = self._data.setdefault(resource["resourceType"], {})
            current = by_id.get(resource["id"])
            version = int(current["meta"]["versionId"]) if current else 0
            if if_match is not None and if_match.removeprefix("W/").strip('"') != str(version):
                raise PreconditionFailedError(
                    f"If-Match {if_match} does not match current version {version}"
                )
            stored = copy.deepcopy(resource)
            stored["meta"] = {**(stored.get("meta") or {}), "versionId": str(version + 1)}
            stored["meta"]["lastUpdated"] = now_instant()
            by_id[stored["id"]] = stored
            return WriteResult(stored, 200 if current else 201)

    def _search_unlocked(self, resource_type: str, params: list[tuple[str, str]]) -> list[Resource]:
        rows = self._data.get(resource_type, {}).values()
        return [r for r in rows if all(_matches(r, n, v) for n, v in params)]


def _matches(resource: Resource, name: str, value: str) -> bool:
    if name in ("_count", "_format"):
        return True
    if name == "_id":
        return resource.get("id") in value.split(",")
    if name == "_lastUpdated":
        return _date_matches(str((resource.get("meta") or {}).get("lastUpdated", "")), value)
    if name == "target":  # Provenance.target (a reference search, exact `Type/id`)
        return any(t.get("reference") == value for t in resource.get("target") or [])
    if name in PATIENT_PARAMS:
        patient_id = value.split(",")[0].rstrip("/").split("/")[-1]
        return _refers_to_patient(resource, patient_id)
    if name == "identifier":
        pairs = [(i.get("system"), str(i.get("value"))) for i in resource.get("identifier") or []]
        return any(_token_hit(pairs, v) for v in value.split(","))
    if name in TOKEN_PARAMS:
        pairs = list(_codings(resource.get(name)))
        return any(_token_hit(pairs, v) for v in value.split(","))
    return False


def _token_hit(pairs: list[tuple[Any, str]], token: str) -> bool:
    system, code = split_token(token)
    return any(c == code and (system is None or (s or "") == system) for s, c in pairs)


def _codings(value: Any) -> Iterator[tuple[Any, str]]:
    if isinstance(value, list):
        for item in value:
            yield from _codings(item)
    elif isinstance(value, dict):
        for c in value.get("coding") or []:
            yield c.get("system"), str(c.get("code"))
    elif isinstance(value, str):
        yield None, value


def _refers_to_patient(resource: Resource, patient_id: str) -> bool:
    if resource.get("resourceType") == "Patient":
        return resource.get("id") == patient_id
    for field_name in REFERENCE_FIELDS:
        ref = (resource.get(field_name) or {}).get("reference")
        wanted = f"Patient/{patient_id}"
        if isinstance(ref, str) and (ref == wanted or ref.endswith(f"/{wanted}")):
            return True
    return False


def _date_matches(instant: str, value: str) -> bool:
    prefix, when = ("eq", value)
    if value[:2] in ("ge", "gt", "le", "lt", "eq"):
        prefix, when = value[:2], value[2:]
    try:
        have = _parse_instant(instant)
        want = _parse_instant(when)
    except ValueError as exc:
        raise InputError(f"bad date in _lastUpdated: {value!r}") from exc
    return {
        "ge": have >= want,
        "gt": have > want,
        "le": have <= want,
        "lt": have < want,
        "eq": have == want,
    }[prefix]


def _parse_instant(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
