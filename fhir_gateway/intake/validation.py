"""Inbound FHIR validation with the fhir.resources R4B models (R4B equals R4 for what we host).

Validation runs once at ingest; errors come back as OperationOutcome issues whose `expression`
is a FHIRPath to the element (e.g. `Bundle.entry[1].resource.code`).
"""

from __future__ import annotations

import json
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

from fhir_gateway.errors import ParseError, ValidationError
from fhir_gateway.resources import Resource


def parse_json(data: bytes, *, max_depth: int = 64) -> Any:
    """Parse a JSON request body.

    Raises:
        ParseError: not UTF-8, not JSON, or nested deeper than `max_depth`.
    """
    try:
        value = json.loads(data.decode("utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise ParseError(f"body is not UTF-8 (byte {exc.start})") from exc
    except _DuplicateKey as exc:
        raise ParseError(f"body is not valid FHIR JSON: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ParseError(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    if _depth(value) > max_depth:
        raise ParseError(f"JSON nested deeper than {max_depth} levels")
    return value


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a repeated key are ambiguous (RFC 8259 §4): refuse them."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"property {key!r} appears twice in one object")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        nxt: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        level = nxt
    return depth - 1


def _model(resource_type: str) -> type[pydantic.BaseModel]:
    model: type[pydantic.BaseModel] = get_fhir_model_class(resource_type)
    return model


def validate_resource(
    resource: Any, *, path: str | None = None, allowed: frozenset[str] | None = None
) -> Resource:
    """Check `resource` is a FHIR R4 resource of an allowed type; return it unchanged.

    Raises:
        ValidationError: 400 for an unknown/unsupported type or structural errors, with paths.
    """
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        where = path or "resource"
        raise ValidationError(
            "not a FHIR resource: resourceType missing", expression=[where], status_code=400
        )
    rtype: str = resource["resourceType"]
    where = path or rtype
    if allowed is not None and rtype not in allowed:
        raise ValidationError(
            f"resource type {rtype} is not accepted here", expression=[where], status_code=400
        )
    try:
        model = _model(rtype)
    except (ImportError, AttributeError) as exc:
        raise ValidationError(
            f"unknown resource type {rtype}", expression=[where], status_code=400
        ) from exc
    try:
        model.model_validate(resource)
    except pydantic.ValidationError as exc:
        issues = [_issue(err, where) for err in exc.errors()[:20]]
        first = issues[0]
        raise ValidationError(
            f"{rtype} is not valid FHIR R4: {first['diagnostics']}",
            expression=first["expression"],
            issues=issues,
            status_code=400,
        ) from exc
    except (TypeError, ValueError) as exc:  # validators that raise outside pydantic
        raise ValidationError(
            f"{rtype} is not valid FHIR R4: {exc}", expression=[where], status_code=400
        ) from exc
    check_required_codes(resource, where)
    return resource


# Top-level `code` elements with a *required* binding in FHIR R4 for the types we host: the
# R4B models check their pattern only, so values outside the value set are caught here.
REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Task", "status"): frozenset(
        {
            "draft",
            "requested",
            "received",
            "accepted",
            "rejected",
            "ready",
            "cancelled",
            "in-progress",
            "on-hold",
            "failed",
            "completed",
            "entered-in-error",
        }
    ),
    ("Task", "intent"): frozenset(
        {
            "unknown",
            "proposal",
            "plan",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        }
    ),
    ("ServiceRequest", "status"): frozenset(
        {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
    ),
    ("ServiceRequest", "intent"): frozenset(
        {
            "proposal",
            "plan",
            "directive",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        }
    ),
    ("ServiceRequest", "priority"): frozenset({"routine", "urgent", "asap", "stat"}),
    ("Observation", "status"): frozenset(
        {
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("DiagnosticReport", "status"): frozenset(
        {
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("DocumentReference", "status"): frozenset({"current", "superseded", "entered-in-error"}),
    ("ImagingStudy", "status"): frozenset(
        {"registered", "available", "cancelled", "entered-in-error", "unknown"}
    ),
}


def check_required_codes(resource: Resource, where: str) -> None:
    """Raises ValidationError (400) for a code outside its required value set."""
    rtype = resource.get("resourceType", "")
    for (type_, element), allowed in REQUIRED_CODES.items():
        if type_ == rtype and element in resource and resource[element] not in allowed:
            raise ValidationError(
                f"{rtype}.{element} {resource[element]!r} is not in its required value set",
                expression=[f"{where}.{element}"],
                status_code=400,
            )


def _issue(err: Any, prefix: str) -> dict[str, Any]:
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid"))
    code = "required" if err.get("type") == "missing" else "structure"
    return {
        "severity": "error",
        "code": code,
        "diagnostics": f"{prefix}{loc}: {msg}",
        "expression": [f"{prefix}{loc}"],
    }
