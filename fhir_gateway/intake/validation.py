"""Inbound FHIR validation with the fhir.resources R4B models (R4B equals R4 for what we host).

Validation runs once at ingest; errors come back as OperationOutcome issues whose `expression`
is a FHIRPath to the element (e.g. `Bundle.entry[1].resource.code`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

from fhir_gateway.errors import ParseError, ValidationError, pydantic_message
from fhir_gateway.resources import Resource

# Strings are removed before brackets are counted, so `"[[["` does not count as nesting.
_JSON_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_ONE_KIND = str.maketrans("[{]}", "(())")  # depth counts both kinds alike
FAST_DEPTH_ROUNDS = 256  # json_depth without a limit: past this, the exact count
# FHIR strings SHALL NOT hold characters below U+0020 except tab, CR and LF (R4 datatypes).
_CONTROL_ESCAPE_RE = re.compile(r"\\u00(?:0[0-8bBcCeEfF]|1[0-9a-fA-F])")
MAX_DECIMAL_DIGITS = 18  # FHIR decimal (R4 datatypes): at most 18 significant digits
MAX_INTEGER_DIGITS = 19  # FHIR integer64 fits 19 digits; integer (32-bit) is checked by the models


def json_depth(text: str, limit: int | None = None) -> int:
    """How deeply arrays/objects nest in JSON `text`, found without parsing it (no recursion,
    so a body nested 100,000 levels costs one pass, not a RecursionError).

    Fast path, in C string passes: the brackets alone, every innermost pair removed per
    round; brackets that vanish that way are balanced and the rounds are their depth. Past
    `limit` rounds (a body too deep anyway), or for unbalanced brackets (which the JSON
    parser refuses), they are counted one by one, as before."""
    brackets = _NOT_BRACKET_RE.sub("", _outside_strings(text)).translate(_ONE_KIND)
    left, rounds = brackets, 0
    cap = FAST_DEPTH_ROUNDS if limit is None else min(limit, FAST_DEPTH_ROUNDS)
    while left:
        shorter = left.replace("()", "")
        if len(shorter) == len(left) or rounds >= cap:
            return _counted_depth(brackets)
        left, rounds = shorter, rounds + 1
    return rounds


def _outside_strings(text: str) -> str:
    """`text` without its JSON string literals. Without an escaped quote and with quotes in
    pairs, every quote opens or closes a string: a split does it; otherwise the regex."""
    if '\\"' in text or text.count('"') % 2:
        return _JSON_STRING_RE.sub("", text)
    return "".join(text.split('"')[::2])


def _counted_depth(brackets: str) -> int:
    depth = deepest = 0
    for b in brackets:
        depth += 1 if b == "(" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(data: bytes, *, max_depth: int = 64) -> Any:
    """Parse a JSON request body strictly.

    Nesting is measured before parsing; numbers FHIR cannot hold (NaN, Infinity, decimals
    with more than 18 significant digits, integers over 19 digits) and escaped control
    characters are refused. Messages name the rule broken and where, never the value.

    Raises:
        ParseError: not UTF-8, not JSON, nested deeper than `max_depth`, or such a number.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ParseError(f"body is not UTF-8 (byte {exc.start})") from exc
    if json_depth(text, limit=max_depth) > max_depth:
        raise ParseError(f"JSON nested deeper than {max_depth} levels")
    if _CONTROL_ESCAPE_RE.search(text):
        raise ParseError(
            "a JSON string holds a control character (below U+0020, other than tab, CR, LF)"
        )
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_float=_checked_decimal,
            parse_int=_checked_integer,
            parse_constant=_no_constant,
        )
    except _BadNumber as exc:
        where = _number_path(text)
        raise ParseError(f"body is not valid FHIR JSON: {exc}", path=where) from exc
    except _BadJson as exc:
        raise ParseError(f"body is not valid FHIR JSON: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ParseError(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except (RecursionError, ValueError) as exc:  # belt and braces: never a 500 from parsing
        raise ParseError("body is not valid JSON") from exc


class _BadJson(ValueError):
    pass


class _BadNumber(_BadJson):
    pass


_OFFENDING = object()


def _number_path(text: str) -> str:
    """FHIRPath-like location of the first number the checks refuse (for the message)."""

    def mark(check: Any) -> Any:
        def hook(literal: str) -> Any:
            try:
                return check(literal)
            except _BadNumber:
                return _OFFENDING

        return hook

    try:
        value = json.loads(
            text, parse_float=mark(_checked_decimal), parse_int=mark(_checked_integer)
        )
    except ValueError:
        return ""
    root = value.get("resourceType") if isinstance(value, dict) else None
    stack: list[tuple[str, Any]] = [
        (root if isinstance(root, str) and root.isalpha() else "", value)
    ]
    while stack:
        path, node = stack.pop()
        if node is _OFFENDING:
            return path.lstrip(".") or "$"
        if isinstance(node, dict):
            stack.extend((f"{path}.{k}", v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(node))))
    return ""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a repeated key are ambiguous (RFC 8259 §4): refuse them."""
    out = dict(pairs)  # in C; only an object with a repeated key is walked in Python
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadJson(f"property {key!r} appears twice in one object")
            seen.add(key)
    return out


def _checked_decimal(literal: str) -> float:
    mantissa = re.split("[eE]", literal.lstrip("-"))[0].replace(".", "").lstrip("0")
    if len(mantissa) > MAX_DECIMAL_DIGITS:
        raise _BadNumber(
            f"a decimal has more than {MAX_DECIMAL_DIGITS} significant digits (FHIR decimal)"
        )
    value = float(literal)
    if math.isinf(value):
        raise _BadNumber("a decimal is out of range")
    return value


def _checked_integer(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _BadNumber(f"an integer has more than {MAX_INTEGER_DIGITS} digits")
    return int(literal)


def _no_constant(name: str) -> Any:
    raise _BadJson("NaN and Infinity are not JSON numbers")


def preload(resource_types: Iterable[str]) -> None:
    """Import the model classes of `resource_types` now (the service does at start, in a
    thread of its own): fhir.resources imports each type's modules on first use, ~0.1 s of
    the first referral's CPU."""
    for rtype in sorted(resource_types):
        _model(rtype)


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
            f"{rtype} is not valid FHIR R4", expression=[where], status_code=400
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


_REQUIRED_BY_TYPE: dict[str, list[tuple[str, frozenset[str]]]] = {}
for (_type, _element), _allowed in REQUIRED_CODES.items():
    _REQUIRED_BY_TYPE.setdefault(_type, []).append((_element, _allowed))


def check_required_codes(resource: Resource, where: str) -> None:
    """Raises ValidationError (400) for a code outside its required value set."""
    rtype = resource.get("resourceType", "")
    for element, allowed in _REQUIRED_BY_TYPE.get(rtype, ()):
        if element in resource and resource[element] not in allowed:
            raise ValidationError(
                f"{rtype}.{element} is not a code of its required value set",
                expression=[f"{where}.{element}"],
                status_code=400,
            )


def _issue(err: Any, prefix: str) -> dict[str, Any]:
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()))
    msg = pydantic_message(err)
    code = "required" if err.get("type") == "missing" else "structure"
    return {
        "severity": "error",
        "code": code,
        "diagnostics": f"{prefix}{loc}: {msg}",
        "expression": [f"{prefix}{loc}"],
    }
