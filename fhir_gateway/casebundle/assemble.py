"""Case bundle assembly (pure, no DB): one Bundle `collection` per case, id = the patient id.

- exactly one Patient (mCODE patient bundle): the patients of every source are linked by
  identifier onto the case Patient; conflicting demographics are reported, never merged silently;
- duplicates across sources (same identifier, or same code + effective time + value + subject)
  become one resource; the Provenance of every source that sent it targets that resource;
- one Provenance per source (agent = the source system as author, the gateway as transmitter;
  STANDARDS.md PV-01..PV-03);
- every reference resolves inside the bundle (unresolvable ones are reported and kept as display);
- mCODE claims that depend on other resources decided again over the whole case
  (`casebundle.claims`: a staging in one source whose primary cancer is in another);
- a summary for the reviewer: completeness per cancer type (`casebundle.completeness`), the
  consult question and the specimens (`casebundle.consult`).

`iter_bundle_json()` streams a Bundle from already-serialised resource JSON (the service keeps
JSON as stored, DESIGN.md: "serve bundles by streaming stored JSON").
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fhir_gateway.casebundle import consult
from fhir_gateway.casebundle.claims import claim_across_case
from fhir_gateway.casebundle.completeness import completeness as case_completeness
from fhir_gateway.resources import Resource, deterministic_id, json_compact

Issue = dict[str, Any]

CLASS_SYSTEM = "urn:fhir-gateway:class"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
GATEWAY_NAME = "fhir-gateway"
DEFAULT_BASE_URL = "https://fhir-gateway.local/fhir"

_EFFECTIVE_KEYS = (
    "effectiveDateTime",
    "effectivePeriod",
    "effectiveInstant",
    "performedDateTime",
    "performedPeriod",
    "onsetDateTime",
    "authoredOn",
    "started",
    "recordedDate",
    "occurrenceDateTime",
    "period",
    "billablePeriod",
    "created",
    "issued",
    "date",
)
# Types de-duplicated by content (code + time + value + subject); others only by identifier.
_CONTENT_DEDUP_TYPES = frozenset(
    {"Observation", "Condition", "Procedure", "DiagnosticReport", "MedicationRequest"}
    | {"MedicationStatement", "MedicationAdministration", "Immunization", "AllergyIntolerance"}
    | {"Encounter", "DocumentReference", "ImagingStudy", "Specimen"}
)
_VALUE_KEYS = (
    "valueQuantity",
    "valueCodeableConcept",
    "valueString",
    "valueBoolean",
    "valueInteger",
    "valueDateTime",
    "valueRange",
    "valueRatio",
)


@dataclass
class SourceBatch:
    """The normalised resources of one source document (file, message, pull)."""

    source: str  # source system (partner id, sending facility, file name)
    resources: list[Resource]
    issues: list[Issue] = field(default_factory=list)
    kind: str = ""  # fhir | ccda | hl7v2 | dicom
    document: str = ""  # what was received (file name, URL, message control id)
    received: str = "1970-01-01T00:00:00Z"  # FHIR instant; passed in (no clock here)


@dataclass
class CaseBundle:
    patient_id: str
    resources: list[Resource]
    issues: list[Issue]
    summary: dict[str, Any]
    base_url: str = DEFAULT_BASE_URL

    def as_dict(self) -> Resource:
        """The Bundle as one JSON dict (for validation and small cases)."""
        return json.loads(b"".join(self.iter_json()))  # type: ignore[no-any-return]

    def iter_json(self) -> Iterator[bytes]:
        return iter_bundle_json(
            self.patient_id,
            ((r["resourceType"], r["id"], _dumps(r)) for r in self.resources),
            base_url=self.base_url,
        )


def _dumps(resource: Resource) -> str:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"))


def iter_bundle_json(
    bundle_id: str,
    entries: Iterable[tuple[str, str, str]],
    *,
    base_url: str = DEFAULT_BASE_URL,
    chunk_size: int = 64 * 1024,
) -> Iterator[bytes]:
    """Stream `Bundle` JSON from (resourceType, id, resource JSON) triples, in ~chunk_size bytes.

    The resource JSON is written as stored, without parsing it again.
    """
    head = {"resourceType": "Bundle", "id": bundle_id, "type": "collection"}
    buffer: list[str] = [json.dumps(head, separators=(",", ":"))[:-1], ',"entry":[']
    size = 0
    first = True
    base = base_url.rstrip("/")
    for rtype, rid, body in entries:
        part = f'{"" if first else ","}{{"fullUrl":"{base}/{rtype}/{rid}","resource":{body}}}'
        first = False
        buffer.append(part)
        size += len(part)
        if size >= chunk_size:
            yield "".join(buffer).encode("utf-8")
            buffer, size = [], 0
    buffer.append("]}")
    yield "".join(buffer).encode("utf-8")


def _issue(severity: str, code: str, diagnostics: str, expression: str | None = None) -> Issue:
    out: Issue = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


def _ref(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


# --------------------------------------------------------------------------- assembly


def assemble_case_bundle(
    patient_id: str, sources: list[SourceBatch], *, base_url: str = DEFAULT_BASE_URL
) -> CaseBundle:
    """All normalised resources of a case -> one de-duplicated, fully resolved CaseBundle."""
    issues: list[Issue] = [i for batch in sources for i in batch.issues]
    patient, patient_refs = _case_patient(patient_id, sources, issues)
    redirect: dict[str, str] = dict.fromkeys(patient_refs, f"Patient/{patient_id}")
    kept: dict[str, Resource] = {}
    by_identifier: dict[tuple[str, str, str], str] = {}
    by_content: dict[tuple[Any, ...], tuple[str, int]] = {}
    targets_per_source: list[list[str]] = []
    for number, batch in enumerate(sources):
        targets: list[str] = []
        for resource in batch.resources:
            ref = _ref(resource)
            if resource["resourceType"] == "Patient":
                targets.append(f"Patient/{patient_id}")
                continue
            if resource["resourceType"] == "Provenance":
                continue  # we write our own, one per source
            if ref in kept or ref in redirect:
                canonical = redirect.get(ref, ref)
                targets.append(canonical)
                continue
            content = _content_key(resource, redirect)  # once: for the lookup and the index
            found = _find_duplicate(resource, number, content, by_identifier, by_content)
            if found is not None:
                redirect[ref] = found
                _merge_into(kept[found], resource)
                targets.append(found)
                continue
            kept[ref] = resource
            _index(resource, ref, number, content, by_identifier, by_content)
            targets.append(ref)
        targets_per_source.append(list(dict.fromkeys(targets)))
    merged = len(redirect) - len(patient_refs)
    if merged:
        issues.append(
            _issue(
                "information", "duplicate", f"{merged} duplicate resources merged across sources"
            )
        )
    resources: list[Resource] = [patient, *kept.values()]
    known = {_ref(r) for r in resources}
    unresolved = 0
    for resource in resources:
        unresolved += _rewrite_references(resource, redirect, known, patient_id)
    if unresolved:
        issues.append(
            _issue(
                "warning",
                "not-found",
                f"{unresolved} references to resources that no source sent; kept as display",
            )
        )
    claim_across_case(resources, issues)
    referral = {
        t
        for batch, targets in zip(sources, targets_per_source, strict=True)
        if batch.kind == "referral"
        for t in targets
    }
    summary = completeness(resources)
    summary["question"] = consult.consult_question(resources, referral)
    summary["specimens"] = consult.specimens(resources)
    for batch, targets in zip(sources, targets_per_source, strict=True):
        if targets:
            resources.append(_provenance(patient_id, batch, targets))
    return CaseBundle(patient_id, resources, issues, summary, base_url)


def _case_patient(
    patient_id: str, sources: list[SourceBatch], issues: list[Issue]
) -> tuple[Resource, set[str]]:
    patients = [(b, r) for b in sources for r in b.resources if r["resourceType"] == "Patient"]
    refs = {_ref(r) for _, r in patients}
    if not patients:
        issues.append(_issue("error", "required", "no source sent a Patient", "Patient"))
        return {"resourceType": "Patient", "id": patient_id}, refs
    base = json.loads(json.dumps(patients[0][1]))
    base["id"] = patient_id
    identifiers = _dicts(base.get("identifier"))
    seen = {_ident_key(i) for i in identifiers}
    for batch, other in patients[1:]:
        other_ids = {_ident_key(i) for i in _dicts(other.get("identifier"))}
        if not other_ids & seen:
            issues.append(
                _issue(
                    "warning",
                    "business-rule",
                    f"Patient from source {batch.source} shares no identifier with the case "
                    "patient; linked by case membership only",
                    "Patient.identifier",
                )
            )
        for ident in _dicts(other.get("identifier")):
            key = _ident_key(ident)
            if key not in seen:
                seen.add(key)
                identifiers.append(ident)
        for element in _demographic_conflicts(base, other):
            issues.append(
                _issue(
                    "warning",
                    "conflict",
                    f"Patient.{element} differs between sources ({patients[0][0].source} vs "
                    f"{batch.source}); the first source's value is kept",
                    f"Patient.{element}",
                )
            )
    if identifiers:
        base["identifier"] = identifiers
    return base, refs


def _demographic_conflicts(a: Resource, b: Resource) -> list[str]:
    out = []
    for element in ("gender", "birthDate"):
        if a.get(element) and b.get(element) and a[element] != b[element]:
            out.append(element)
    fam_a = {str(n["family"]).casefold() for n in _dicts(a.get("name")) if n.get("family")}
    fam_b = {str(n["family"]).casefold() for n in _dicts(b.get("name")) if n.get("family")}
    if fam_a and fam_b and not fam_a & fam_b:
        out.append("name")
    return out


def _dicts(value: Any) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]


def _ident_key(identifier: dict[str, Any]) -> tuple[str, str]:
    return str(identifier.get("system", "")), str(identifier.get("value", ""))


def _identifier_keys(resource: Resource) -> list[tuple[str, str, str]]:
    return [
        (resource["resourceType"], str(i.get("system") or ""), str(i["value"]))
        for i in _dicts(resource.get("identifier"))
        if i.get("value") and i.get("system")
    ]


def _content_key(resource: Resource, redirect: dict[str, str]) -> tuple[Any, ...] | None:
    if resource["resourceType"] not in _CONTENT_DEDUP_TYPES:
        return None
    concept = (
        resource.get("code")
        or resource.get("medicationCodeableConcept")
        or resource.get("vaccineCode")
        or next(iter(_dicts(resource.get("type"))), None)
    )
    codings = _dicts(concept.get("coding")) if isinstance(concept, dict) else []
    codes = tuple(sorted((str(c.get("system", "")), str(c.get("code", ""))) for c in codings))
    when = next((resource[k] for k in _EFFECTIVE_KEYS if k in resource), None)
    if not codes or when is None:
        return None
    value = next((resource[k] for k in _VALUE_KEYS if k in resource), None)
    who = resource.get("subject") or resource.get("patient")
    subject = str(who.get("reference", "")) if isinstance(who, dict) else ""
    subject = redirect.get(subject, subject)
    return (
        resource["resourceType"],
        codes,
        _json_key(when),
        _json_key(value),
        subject,
    )


def _json_key(value: Any) -> Any:
    """A hashable, order-independent key of a JSON value (a string as it is)."""
    if isinstance(value, str):
        return value
    return ("json", json_compact(value, sort_keys=True))


def _find_duplicate(
    resource: Resource,
    number: int,
    content: tuple[Any, ...] | None,
    by_identifier: dict[tuple[str, str, str], str],
    by_content: dict[tuple[Any, ...], tuple[str, int]],
) -> str | None:
    for key in _identifier_keys(resource):
        if key in by_identifier:
            return by_identifier[key]
    found = by_content.get(content) if content is not None else None
    # Within one source, distinct ids mean distinct resources: content matches only across.
    if found is not None and found[1] != number:
        return found[0]
    return None


def _index(
    resource: Resource,
    ref: str,
    number: int,
    content: tuple[Any, ...] | None,
    by_identifier: dict[tuple[str, str, str], str],
    by_content: dict[tuple[Any, ...], tuple[str, int]],
) -> None:
    for key in _identifier_keys(resource):
        by_identifier.setdefault(key, ref)
    if content is not None:
        by_content.setdefault(content, (ref, number))


def _merge_into(kept: Resource, duplicate: Resource) -> None:
    """Add what the duplicate knows and the kept resource lacks (identifiers, tags)."""
    if duplicate.get("identifier"):
        have = {_ident_key(i) for i in _dicts(kept.get("identifier"))}
        for ident in _dicts(duplicate["identifier"]):
            if _ident_key(ident) not in have:
                kept.setdefault("identifier", []).append(ident)
    meta = kept.setdefault("meta", {})
    tags = meta.get("tag") or []
    for tag in (duplicate.get("meta") or {}).get("tag") or []:
        if tag not in tags:
            tags.append(tag)
    if tags:
        meta["tag"] = tags


def _rewrite_references(
    node: Any, redirect: dict[str, str], known: set[str], patient_id: str
) -> int:
    """Point references at kept resources; return how many could not be resolved."""
    unresolved = 0
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and not ref.startswith("#"):
            ref = redirect.get(ref, ref)
            if ref not in known and ref.startswith("Patient/"):
                ref = f"Patient/{patient_id}"
            if ref in known:
                node["reference"] = ref
            else:
                del node["reference"]
                node.setdefault("display", "reference to a resource not received")
                unresolved += 1
        for _key, value in node.items():
            if isinstance(value, dict | list):
                unresolved += _rewrite_references(value, redirect, known, patient_id)
    elif isinstance(node, list):
        for item in node:
            unresolved += _rewrite_references(item, redirect, known, patient_id)
    return unresolved


def _provenance(patient_id: str, batch: SourceBatch, targets: list[str]) -> Resource:
    provenance: Resource = {
        "resourceType": "Provenance",
        "id": deterministic_id("Provenance", patient_id, batch.source, batch.document),
        "target": [{"reference": t} for t in targets],
        "recorded": batch.received,
        "activity": {
            "coding": [{"system": DATA_OPERATION, "code": "CREATE"}],
            "text": f"normalised from {batch.kind or 'source'} by {GATEWAY_NAME}",
        },
        "agent": [
            {
                "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "author"}]},
                "who": {"display": batch.source},
            },
            {
                "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "transmitter"}]},
                "who": {"display": GATEWAY_NAME},
            },
        ],
    }
    if batch.document.startswith("DocumentReference/"):  # a document read into the case
        provenance["entity"] = [{"role": "source", "what": {"reference": batch.document}}]
    elif batch.document:
        provenance["entity"] = [{"role": "source", "what": {"display": batch.document}}]
    return provenance


def completeness(resources: Iterable[Resource]) -> dict[str, Any]:
    """`{need: {"present", "count", "resources"}}` for the general needs, plus `cancer`,
    `checklist` (general and cancer-type needs) and `missing` (casebundle/completeness.py)."""
    return case_completeness(resources)
