"""The case's clinical events in date order, from the normalised resources (pure).

One event per resource that is a diagnosis (Condition: onset, else recorded date), a staging
(TNM / cancer stage Observation), a procedure, a treatment (medication request, administration or
statement), a radiotherapy course, a tumour-marker value (the canonical unit, plus the original
value when the mapper converted it), an imaging study, or a document (DocumentReference,
DiagnosticReport). Each event names its resource, date, kind, a short display (the code's
display: clinical data for the authorised reviewer, never logged) and its source (`meta.source`).

Dates of mixed precision and zones are ordered by the instant they start at (UTC; a date alone
is its midnight UTC). Events without a date come last. Linear in the number of resources.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from fhir_gateway.casebundle.consult import concept_display
from fhir_gateway.resources import Resource

CLASS_SYSTEM = "urn:fhir-gateway:class"
PQ_TRANSLATION = "http://hl7.org/fhir/StructureDefinition/iso21090-PQ-translation"
RADIOTHERAPY_COURSE = "1217123003"  # SNOMED; mCODE RadiotherapyCourseSummary.code
# Kinds, in the order events of the same instant are listed.
KINDS = (
    "diagnosis",
    "staging",
    "tumour-marker",
    "imaging",
    "procedure",
    "radiotherapy",
    "treatment",
    "document",
)
_KIND_ORDER = {k: n for n, k in enumerate(KINDS)}
TIMELINE_TYPES = frozenset(
    {"Condition", "Observation", "Procedure", "MedicationRequest", "MedicationAdministration"}
    | {"MedicationStatement", "ImagingStudy", "DocumentReference", "DiagnosticReport"}
)
_STAGING = frozenset(
    {"tnm-stage-group", "tnm-primary-tumor-category", "tnm-regional-nodes-category"}
    | {"tnm-distant-metastases-category", "cancer-stage"}
)


def _classes(resource: Resource) -> set[str]:
    return {
        str(t.get("code"))
        for t in (resource.get("meta") or {}).get("tag") or []
        if isinstance(t, dict) and t.get("system") == CLASS_SYSTEM
    }


def _start(value: Any) -> str | None:
    """A dateTime, or the start of a Period."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        start = value.get("start") or value.get("end")
        return start if isinstance(start, str) and start else None
    return None


def _first(resource: Resource, *keys: str) -> str | None:
    for key in keys:
        found = _start(resource.get(key))
        if found:
            return found
    return None


def sort_key(date: str | None) -> str:
    """An ISO instant in UTC for ordering FHIR date/dateTime values of any precision."""
    if not date:
        return "~"  # after every digit: undated events last
    text = date.strip()
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed.isoformat(timespec="microseconds")


def _kind(resource: Resource, classes: set[str]) -> tuple[str, str | None] | None:
    """(kind, date) of a resource, or None when it is no timeline event."""
    rtype = resource["resourceType"]
    if rtype == "Condition":
        return "diagnosis", _first(resource, "onsetDateTime", "onsetPeriod", "recordedDate")
    if rtype == "Observation":
        when = _first(resource, "effectiveDateTime", "effectivePeriod", "effectiveInstant")
        when = when or _first(resource, "issued")
        if classes & _STAGING:
            return "staging", when
        if "tumor-marker" in classes:
            return "tumour-marker", when
        return None
    if rtype == "Procedure":
        when = _first(resource, "performedDateTime", "performedPeriod")
        codes = {c.get("code") for c in (resource.get("code") or {}).get("coding") or [] if c}
        if "radiation-procedure" in classes or RADIOTHERAPY_COURSE in codes:
            return "radiotherapy", when
        return "procedure", when
    if rtype == "MedicationRequest":
        return "treatment", _first(resource, "authoredOn")
    if rtype in ("MedicationAdministration", "MedicationStatement"):
        return "treatment", _first(resource, "effectiveDateTime", "effectivePeriod", "dateAsserted")
    if rtype == "ImagingStudy":
        return "imaging", _first(resource, "started")
    if rtype == "DocumentReference":
        found = resource.get("context")
        context: dict[str, Any] = found if isinstance(found, dict) else {}
        return "document", _start(context.get("period")) or _first(resource, "date")
    if rtype == "DiagnosticReport":
        return "document", _first(resource, "effectiveDateTime", "effectivePeriod", "issued")
    return None


def _display(resource: Resource) -> str:
    rtype = resource["resourceType"]
    if rtype in ("MedicationRequest", "MedicationAdministration", "MedicationStatement"):
        reference = resource.get("medicationReference")
        return concept_display(resource.get("medicationCodeableConcept")) or (
            str(reference.get("display", "")) if isinstance(reference, dict) else ""
        )
    if rtype == "ImagingStudy":
        modalities = [
            str(m.get("code")) for m in resource.get("modality") or [] if isinstance(m, dict)
        ]
        text = str(resource.get("description") or "")
        return " ".join(p for p in (" ".join(modalities), text) if p) or "Imaging study"
    if rtype == "DocumentReference":
        return concept_display(resource.get("type")) or str(resource.get("description") or "")
    return concept_display(resource.get("code"))


def _quantity(q: Any) -> dict[str, Any] | None:
    if not isinstance(q, dict) or "value" not in q:
        return None
    return {k: q[k] for k in ("value", "unit", "system", "code", "comparator") if k in q}


def _value(resource: Resource) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(value, original value) of a marker: the stored Quantity and the one it was converted
    from (iso21090-PQ-translation), or a coded/string value as text."""
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, dict):
        original = next(
            (
                _quantity(e.get("valueQuantity"))
                for e in quantity.get("extension") or []
                if isinstance(e, dict) and e.get("url") == PQ_TRANSLATION
            ),
            None,
        )
        return _quantity(quantity), original
    if "valueCodeableConcept" in resource:
        return {"text": concept_display(resource["valueCodeableConcept"])}, None
    if "valueString" in resource:
        return {"text": str(resource["valueString"])}, None
    ratio = resource.get("valueRatio")
    if isinstance(ratio, dict):
        return {"numerator": ratio.get("numerator"), "denominator": ratio.get("denominator")}, None
    return None, None


def event(resource: Resource) -> dict[str, Any] | None:
    """The timeline event of one resource, or None."""
    if resource["resourceType"] not in TIMELINE_TYPES:
        return None
    classes = _classes(resource)
    found = _kind(resource, classes)
    if found is None:
        return None
    kind, date = found
    out: dict[str, Any] = {
        "date": date,
        "kind": kind,
        "resource": f"{resource['resourceType']}/{resource['id']}",
        "display": _display(resource),
        "source": (resource.get("meta") or {}).get("source"),
    }
    if kind == "diagnosis" and classes & {"primary-cancer-condition", "secondary-cancer-condition"}:
        out["cancer"] = True
    if kind in ("staging", "tumour-marker"):
        value, original = _value(resource)
        if value is not None:
            out["value"] = value
        if original is not None:
            out["original"] = original
    return out


def timeline(resources: Iterable[Resource]) -> list[dict[str, Any]]:
    """Every event of the case in date order (undated last; ties by kind, then resource)."""
    events = [e for e in (event(r) for r in resources) if e is not None]
    events.sort(key=lambda e: (sort_key(e["date"]), _KIND_ORDER[e["kind"]], e["resource"]))
    return events


__all__ = ["KINDS", "TIMELINE_TYPES", "event", "sort_key", "timeline"]
