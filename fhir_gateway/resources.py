"""FHIR R4 JSON helpers: the `Resource` type, builders, deterministic ids and code system URIs.

Resources travel as plain JSON dicts (DESIGN.md: models only at the edges). This module imports
nothing of ours, so `mappers` and `connectors` may use it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

Resource = dict[str, Any]

# Code systems (FHIR R4 terminology page, http://hl7.org/fhir/R4/terminologies-systems.html)
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
DICOM_UID = "urn:dicom:uid"
TASK_STATUS = "http://hl7.org/fhir/task-status"

# Identifier systems of our own.
GATEWAY_SYSTEM = "urn:fhir-gateway"
CASE_ID_SYSTEM = "urn:fhir-gateway:case"


def json_loads(text: str | bytes) -> Any:
    """JSON text -> Python values, as `json.loads` gives them (orjson: ~4x faster on the pull
    and normalise paths); what orjson refuses and `json` reads (NaN, Infinity) is read by `json`.

    Raises:
        ValueError: not JSON (`json.JSONDecodeError`).
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def json_bytes(value: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON as UTF-8 bytes, characters as they are (= `json.dumps(value,
    ensure_ascii=False, separators=(",", ":"))` but for the spelling of some floats, e.g. `1e16`
    for `1e+16`); what orjson refuses (non-string keys, integers beyond 64 bits) goes through
    `json`."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)
        return text.encode("utf-8")


def json_compact(value: Any, *, sort_keys: bool = False) -> str:
    """`json_bytes` as text."""
    return json_bytes(value, sort_keys=sort_keys).decode()


# Namespace for uuid5 ids; fixed forever, so ids stay stable across releases.
ID_NAMESPACE = uuid.UUID("5b1f2a1e-6f7c-4d55-9a1e-2f0c1a9d7e33")


def new_id() -> str:
    """A new row or resource id: a UUID version 7 (RFC 9562 §5.7: 48 bits of Unix time in
    milliseconds, then 74 random bits). Ids made one after another sort together, so inserting
    them adds to the right edge of every index keyed by them (the table's key, the case and
    resource columns of the tables that point at it) instead of at a random page of a large
    B-tree: at 1,000,000 stored resources a random insert reads and dirties a page the cache
    rarely holds, and each dirtied page is one more WAL frame and checkpoint write. The random
    bits keep ids unguessable as uuid4's are (access never rests on an id being secret). Python
    3.14's `uuid.uuid7` makes the same; this can give way to it when 3.14 is the oldest
    supported."""
    ms = time.time_ns() // 1_000_000
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10)) & _RAND_74
    return str(uuid.UUID(int=value | _V7_BITS))


_RAND_74 = (0xFFF << 64) | 0x3FFF_FFFF_FFFF_FFFF  # rand_a (12 bits) and rand_b (62 bits)
_V7_BITS = (0x7 << 76) | (0b10 << 62)  # version 7, variant RFC 9562


def deterministic_id(*parts: str) -> str:
    """A uuid5 over the joined parts (e.g. resource type, source system, source id).

    The same input gives the same id, so re-pulling or re-mapping is safe (DESIGN.md).
    """
    return str(uuid.uuid5(ID_NAMESPACE, "|".join(parts)))


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = compact({"system": system, "code": code, "display": display})
    return out


def codeable_concept(*codings: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = compact({"coding": list(codings), "text": text})
    return out


def reference(resource_or_type: Resource | str, id_: str | None = None) -> dict[str, str]:
    """`Reference` to a resource dict, or to `type` + `id`."""
    if isinstance(resource_or_type, str):
        if id_ is None:
            raise ValueError("reference(type, id) needs an id")
        return {"reference": f"{resource_or_type}/{id_}"}
    return {"reference": f"{resource_or_type['resourceType']}/{resource_or_type['id']}"}


def identifier(system: str, value: str) -> dict[str, str]:
    return {"system": system, "value": value}


def compact(value: Any) -> Any:
    """Drop None, empty strings, empty lists and empty dicts, recursively (FHIR forbids empties)."""
    if isinstance(value, Mapping):
        out = {k: compact(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if not _empty(v)}
    if isinstance(value, list):
        items = [compact(v) for v in value]
        return [v for v in items if not _empty(v)]
    return value


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def split_token(token: str) -> tuple[str | None, str]:
    """Split a FHIR token search value `system|value` (system None when there is no `|`)."""
    if "|" in token:
        system, value = token.split("|", 1)
        return system, value
    return None, token


def identifiers_of(resource: Resource) -> Iterable[tuple[str, str]]:
    """(system, value) of each identifier of a resource that has both."""
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            yield ident.get("system") or "", str(ident["value"])
