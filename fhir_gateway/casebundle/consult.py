"""The consult question and the specimens of a case, read from its resources (pure).

- The question: what the referrer asks, from the referral's ServiceRequest (`code`,
  `reasonCode`, `reasonReference` (shown with the referenced resource's code), `note`).
- The specimens: each Specimen's accession identifier (`Specimen.accessionIdentifier`, or an
  identifier typed `ACSN` in v2-0203; HL7 v2 SPM-30 / the filler order number OBR-3 in anatomic
  pathology), its other identifiers (SPM-2 placer/filler specimen ids), its containers
  (`Specimen.container.identifier`: slides and blocks, HL7 v2 SAC-3) and parent specimens (a
  slide cut from a block, SPM-3).

These are clinical data for the authorised reviewer (the summary and the report), never for logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fhir_gateway.resources import Resource

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_SLIDE_WORDS = ("slide",)
_BLOCK_WORDS = ("block", "cassette", "paraffin")


def _dicts(value: Any) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]


def concept_display(concept: Any) -> str:
    """A CodeableConcept as a short display: text, else the first coding's display or code."""
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in _dicts(concept.get("coding")):
        if coding.get("display"):
            return str(coding["display"])
    for coding in _dicts(concept.get("coding")):
        if coding.get("code"):
            return f"{coding.get('system', '')}|{coding['code']}".lstrip("|")
    return ""


def _codings(concept: Any) -> list[dict[str, Any]]:
    out = []
    for coding in _dicts(concept.get("coding") if isinstance(concept, dict) else None):
        item = {k: coding[k] for k in ("system", "code", "display") if coding.get(k)}
        if item:
            out.append(item)
    return out


def _ref(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def consult_question(
    resources: Iterable[Resource], referral: set[str] | None = None
) -> dict[str, Any] | None:
    """What the referrer asks: the referral ServiceRequest's code, reasons and notes.

    `referral`: refs of the referral's resources (the ServiceRequest among them is the
    question); without it, the first ServiceRequest with a reason or note is used.
    """
    by_ref = {_ref(r): r for r in resources}
    requests = [r for ref, r in by_ref.items() if r["resourceType"] == "ServiceRequest"]
    if referral:
        chosen = [r for r in requests if _ref(r) in referral]
        requests = chosen or requests
    asking = [
        r for r in requests if r.get("reasonCode") or r.get("reasonReference") or r.get("note")
    ]
    if not (asking or requests):
        return None
    request = (asking or requests)[0]
    reasons = [
        {"text": concept_display(cc), "coding": _codings(cc)}
        for cc in _dicts(request.get("reasonCode"))
    ]
    references = []
    for item in _dicts(request.get("reasonReference")):
        ref = item.get("reference")
        target = by_ref.get(ref) if isinstance(ref, str) else None
        display = item.get("display") or (concept_display(target.get("code")) if target else "")
        references.append({k: v for k, v in (("reference", ref), ("display", display)) if v})
    notes = [str(n["text"]) for n in _dicts(request.get("note")) if n.get("text")]
    question: dict[str, Any] = {
        "serviceRequest": _ref(request),
        "code": concept_display(request.get("code")),
        "reasons": reasons,
        "reasonReferences": references,
        "notes": notes,
    }
    for key in ("authoredOn", "priority"):
        if request.get(key):
            question[key] = request[key]
    return question


def question_text(question: dict[str, Any] | None) -> str:
    """The question as one line of text for the report (reasons, then the notes)."""
    if not question:
        return ""
    parts = [r["text"] for r in question.get("reasons", []) if r.get("text")]
    parts += [r["display"] for r in question.get("reasonReferences", []) if r.get("display")]
    reason = "; ".join(dict.fromkeys(parts))
    out = [f"{question.get('code') or 'Referral'}" + (f" for {reason}" if reason else "")]
    out += question.get("notes", [])
    text = ". ".join(p.strip().rstrip(".") for p in out if p.strip())
    return text if text.endswith(("?", "!")) else text + "."


def _identifier(ident: dict[str, Any]) -> dict[str, Any]:
    out = {k: ident[k] for k in ("system", "value") if ident.get(k)}
    kind = concept_display(ident.get("type"))
    codes = [c.get("code") for c in _dicts((ident.get("type") or {}).get("coding"))]
    if kind or codes:
        out["type"] = next((c for c in codes if c), None) or kind
    return out


def _container_kind(container: dict[str, Any]) -> str:
    text = " ".join(
        [concept_display(container.get("type")), str(container.get("description") or "")]
    ).lower()
    if any(w in text for w in _SLIDE_WORDS):
        return "slide"
    if any(w in text for w in _BLOCK_WORDS):
        return "block"
    return "container"


def specimen_summary(specimen: Resource) -> dict[str, Any]:
    """One Specimen: accession, identifiers, containers (slides, blocks), parents, collection."""
    identifiers = [_identifier(i) for i in _dicts(specimen.get("identifier"))]
    accession: dict[str, Any] | None = specimen.get("accessionIdentifier")
    if not isinstance(accession, dict) or not accession.get("value"):
        typed = [i for i in identifiers if i.get("type") == "ACSN" and i.get("value")]
        accession = typed[0] if typed else None
    containers = []
    for container in _dicts(specimen.get("container")):
        idents = [_identifier(i) for i in _dicts(container.get("identifier"))]
        containers.append(
            {
                "kind": _container_kind(container),
                "type": concept_display(container.get("type")),
                "identifiers": [i for i in idents if i.get("value")],
                "description": container.get("description"),
            }
        )
    found = specimen.get("collection")
    collection: dict[str, Any] = found if isinstance(found, dict) else {}
    collected = collection.get("collectedDateTime") or (
        (collection.get("collectedPeriod") or {}).get("start")
    )
    out: dict[str, Any] = {
        "resource": _ref(specimen),
        "type": concept_display(specimen.get("type")),
        "accession": (
            {k: accession[k] for k in ("system", "value") if accession.get(k)}
            if accession
            else None
        ),
        "identifiers": [i for i in identifiers if i.get("value")],
        "containers": [{k: v for k, v in c.items() if v} for c in containers],
        "parents": [
            str(p["reference"]) for p in _dicts(specimen.get("parent")) if p.get("reference")
        ],
        "collected": collected,
        "bodySite": concept_display(collection.get("bodySite")),
        "source": (specimen.get("meta") or {}).get("source"),
    }
    return {k: v for k, v in out.items() if v not in (None, "", [])} | {
        "resource": out["resource"],
        "accession": out["accession"],
    }


def specimen_label(summary: dict[str, Any]) -> str:
    """A specimen as one line: type, accession, containers (for the report)."""
    parts = [summary.get("type") or "Specimen"]
    if summary.get("accession"):
        parts.append(f"accession {summary['accession']['value']}")
    for container in summary.get("containers", []):
        values = ", ".join(i["value"] for i in container.get("identifiers", []))
        if values:
            parts.append(f"{container.get('kind', 'container')} {values}")
    if summary.get("collected"):
        parts.append(f"collected {summary['collected']}")
    return "; ".join(parts)


def specimens(resources: Iterable[Resource]) -> list[dict[str, Any]]:
    return [specimen_summary(r) for r in resources if r["resourceType"] == "Specimen"]


__all__ = [
    "concept_display",
    "consult_question",
    "question_text",
    "specimen_label",
    "specimen_summary",
    "specimens",
]
