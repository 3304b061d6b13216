"""C-CDA R2.1 (and 1.1) document -> FHIR R4 resources.

Patient (recordTarget), Condition (problem observations), Observation + DiagnosticReport (results
organizers; vital signs and social history observations too), Procedure, MedicationStatement,
AllergyIntolerance and one DocumentReference for the document itself. Sections without entries
keep their narrative as text attachments of the DocumentReference; every entry we do not map is
reported with its XPath. Follows the shape of Microsoft FHIR-Converter's C-CDA templates.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fhir_gateway.errors import ParseError
from fhir_gateway.resources import (
    UCUM,
    Resource,
    codeable_concept,
    coding,
    compact,
    deterministic_id,
    reference,
)
from mappers._common import Issue, MapResult, hl7_ts_to_datetime, issue, source_uri
from mappers._xml import NS, XSI_TYPE, Element, attr, first, parse_xml, template_ids, text, xpath_of
from mappers.terminology import terminology

# C-CDA R2.1 template ids (HL7 C-CDA R2.1 IG, Volume 2).
PROBLEM_CONCERN_ACT = "2.16.840.1.113883.10.20.22.4.3"
PROBLEM_OBSERVATION = "2.16.840.1.113883.10.20.22.4.4"
ALLERGY_CONCERN_ACT = "2.16.840.1.113883.10.20.22.4.30"
ALLERGY_OBSERVATION = "2.16.840.1.113883.10.20.22.4.7"
RESULT_ORGANIZER = "2.16.840.1.113883.10.20.22.4.1"
RESULT_OBSERVATION = "2.16.840.1.113883.10.20.22.4.2"
VITAL_SIGNS_ORGANIZER = "2.16.840.1.113883.10.20.22.4.26"
SMOKING_STATUS = "2.16.840.1.113883.10.20.22.4.78"
SOCIAL_HISTORY_OBSERVATION = "2.16.840.1.113883.10.20.22.4.38"
PROCEDURE_ACTIVITY_PROCEDURE = "2.16.840.1.113883.10.20.22.4.14"
PROCEDURE_ACTIVITY_OBSERVATION = "2.16.840.1.113883.10.20.22.4.13"
PROCEDURE_ACTIVITY_ACT = "2.16.840.1.113883.10.20.22.4.12"
MEDICATION_ACTIVITY = "2.16.840.1.113883.10.20.22.4.16"
US_REALM_HEADER = "2.16.840.1.113883.10.20.22.1.1"
CCDA_DOCUMENT_PREFIX = "2.16.840.1.113883.10.20.22.1."  # US Realm Header and document types
CDA_OID_SYSTEMS = {
    "2.16.840.1.113883.5.1": "http://terminology.hl7.org/CodeSystem/v3-AdministrativeGender",
    "2.16.840.1.113883.5.83": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
}
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
GENDER = {"M": "male", "F": "female", "UN": "other", "U": "unknown"}
PROCEDURE_STATUS = {
    "completed": "completed",
    "active": "in-progress",
    "aborted": "stopped",
    "cancelled": "not-done",
    "new": "preparation",
    "held": "on-hold",
}
RESULT_STATUS = {
    "completed": "final",
    "active": "preliminary",
    "aborted": "cancelled",
    "cancelled": "cancelled",
    "held": "registered",
    "new": "registered",
}
REPORT_STATUS = {
    "completed": "final",
    "active": "partial",
    "aborted": "cancelled",
    "cancelled": "cancelled",
    "held": "registered",
    "new": "registered",
}
MED_STATUS = {
    "completed": "completed",
    "active": "active",
    "aborted": "stopped",
    "cancelled": "not-taken",
    "suspended": "on-hold",
    "held": "on-hold",
    "new": "intended",
}
# substanceAdministration moodCode (HL7 v3 ActMood) -> MedicationRequest.intent; EVN = statement.
MED_INTENT = {"INT": "plan", "RQO": "order", "PRP": "proposal", "PRMS": "plan"}
MED_REQUEST_STATUS = {"active": "active", "completed": "completed", "aborted": "stopped",
                      "cancelled": "cancelled", "suspended": "on-hold", "held": "on-hold",
                      "new": "draft"}  # fmt: skip
CONCERN_STATUS = {
    "active": "active",
    "suspended": "inactive",
    "completed": "resolved",
    "aborted": "inactive",
}


def parse_document(data: bytes) -> Element:
    root = parse_xml(data, "ccda")
    if root.tag != "{urn:hl7-org:v3}ClinicalDocument":
        raise ParseError("XML is not an HL7 CDA ClinicalDocument", source="ccda")
    return root


# --------------------------------------------------------------------------- datatypes


def ts(element: Element | None, path: str = ".") -> str | None:
    """CDA TS (value attribute) -> FHIR dateTime; times without a zone keep date precision."""
    return hl7_ts_to_datetime(attr(element, path, "value"))[0]


def effective(element: Element) -> dict[str, Any]:
    """effectiveTime (TS or IVL_TS) -> {'effectiveDateTime'|'effectivePeriod': ...} items."""
    et = first(element, "cda:effectiveTime")
    if et is None:
        return {}
    if et.get("value"):
        return {"dateTime": ts(et)}
    period = compact({"start": ts(et, "cda:low"), "end": ts(et, "cda:high")})
    if list(period) == ["start"] and attr(et, "cda:high", "value") == "":
        return {"dateTime": period["start"]}
    return {"period": period} if period else {}


def code_system(oid: str) -> str:
    if oid in CDA_OID_SYSTEMS:
        return CDA_OID_SYSTEMS[oid]
    return terminology().canonical_system(f"urn:oid:{oid}") or f"urn:oid:{oid}"


def cd_to_concept(element: Element | None) -> dict[str, Any] | None:
    """CD/CE/CV (+ translations, originalText) -> CodeableConcept; None when nothing is coded."""
    if element is None:
        return None
    codings = []
    for cd in [element, *element.findall("cda:translation", NS)]:
        code, system = cd.get("code"), cd.get("codeSystem")
        if code and system:
            codings.append(coding(code_system(system), code, cd.get("displayName")))
    original = text(first(element, "cda:originalText"))
    if original.startswith("#"):
        original = ""
    display = element.get("displayName")
    if not codings and not original:
        return None
    concept: dict[str, Any] = codeable_concept(*codings, text=original or display or None)
    return concept


def value_to_fhir(value: Element | None) -> dict[str, Any]:
    """Observation value (xsi:type PQ, CD, CO, CE, ST, INT, REAL, IVL_PQ) -> value[x]."""
    if value is None:
        return {}
    kind = (value.get(XSI_TYPE) or "").split(":")[-1]
    if kind == "PQ":
        raw = value.get("value")
        try:
            measured = float(raw or "")
        except ValueError:
            return {"valueString": f"{raw or ''} {value.get('unit') or ''}".strip()} if raw else {}
        number: float | int = measured
        if measured.is_integer() and "." not in (raw or ""):
            number = int(measured)
        unit = value.get("unit") or ""
        quantity: dict[str, Any] = {"value": number}
        if unit and unit != "1":
            quantity["unit"] = unit
            ucum = terminology().ucum(unit)
            if ucum:
                quantity.update(system=UCUM, code=ucum)
        return {"valueQuantity": quantity}
    if kind in ("CD", "CE", "CO", "CV"):
        concept = cd_to_concept(value)
        return {"valueCodeableConcept": concept} if concept else {}
    if kind in ("INT", "REAL"):
        try:
            return {"valueQuantity": {"value": float(value.get("value") or "")}}
        except ValueError:
            return {}
    if kind == "ST" or (kind == "" and text(value)):
        return {"valueString": text(value)} if text(value) else {}
    if kind == "IVL_PQ":
        low, high = first(value, "cda:low"), first(value, "cda:high")
        rng = compact(
            {
                "low": {"value": float(low.get("value") or 0), "unit": low.get("unit")}
                if low is not None and low.get("value")
                else None,
                "high": {"value": float(high.get("value") or 0), "unit": high.get("unit")}
                if high is not None and high.get("value")
                else None,
            }
        )
        return {"valueRange": rng} if rng else {}
    return {}


def id_key(element: Element) -> str:
    """A stable key from the first `id` (root + extension) of an entry, '' when absent."""
    ident = first(element, "cda:id")
    if ident is None or ident.get("nullFlavor"):
        return ""
    return "|".join(p for p in (ident.get("root"), ident.get("extension")) if p)


def identifier_of(element: Element) -> list[dict[str, Any]]:
    out = []
    for ident in element.findall("cda:id", NS):
        root, ext = ident.get("root"), ident.get("extension")
        if not root or ident.get("nullFlavor"):
            continue
        if ext:
            out.append({"system": f"urn:oid:{root}", "value": ext})
        else:
            scheme = "uuid" if "-" in root else "oid"
            out.append({"system": "urn:ietf:rfc:3986", "value": f"urn:{scheme}:{root.lower()}"})
    return out


# --------------------------------------------------------------------------- mapping


@dataclass
class _Doc:
    source: str
    doc_key: str
    patient_ref: dict[str, str]
    issues: list[Issue]
    resources: list[Resource] = field(default_factory=list)

    def rid(self, rtype: str, element: Element) -> str:
        key = id_key(element) or xpath_of(element)
        return deterministic_id(self.source, rtype, self.doc_key, key)


def document_to_resources(
    doc: Element, source: str, raw: bytes = b""
) -> tuple[list[Resource], list[Issue]]:
    """A parsed ClinicalDocument -> resources + issues."""
    issues: list[Issue] = []
    if not any(t.startswith(CCDA_DOCUMENT_PREFIX) for t in template_ids(doc)):
        issues.append(
            issue(
                "warning",
                "not-supported",
                "document declares no C-CDA document template",
                "/ClinicalDocument/templateId",
            )
        )
    patient = record_target_to_patient(doc, source, issues)
    ctx = _Doc(source, id_key(doc) or hashlib.sha256(raw).hexdigest(), reference(patient), issues)
    ctx.resources.append(patient)
    narrative_sections: list[tuple[str, str]] = []
    body = first(doc, "cda:component/cda:structuredBody")
    if body is None:
        issues.append(
            issue(
                "information",
                "not-supported",
                "document has no structuredBody; kept as the document only",
                "/ClinicalDocument/component",
            )
        )
    else:
        for section in body.iterfind("cda:component/cda:section", NS):
            entries = section.findall("cda:entry", NS)
            if not entries:
                narrative = text(first(section, "cda:text"))
                if narrative:
                    narrative_sections.append(
                        (text(first(section, "cda:title")) or "section", narrative)
                    )
                continue
            before = len(ctx.resources)
            for entry in entries:
                entry_to_resources(entry, ctx)
            narrative = text(first(section, "cda:text"))
            if len(ctx.resources) == before and narrative:  # nothing structured: keep the text
                narrative_sections.append(
                    (text(first(section, "cda:title")) or "section", narrative)
                )
            for sub in section.iterfind("cda:component/cda:section", NS):
                narrative = text(first(sub, "cda:text"))
                if narrative:
                    narrative_sections.append(
                        (text(first(sub, "cda:title")) or "section", narrative)
                    )
    ctx.resources.append(document_to_document_reference(doc, ctx, raw, narrative_sections))
    for resource in ctx.resources:
        resource.setdefault("meta", {})["source"] = source_uri(source)
    return ctx.resources, issues


def record_target_to_patient(doc: Element, source: str, issues: list[Issue]) -> Resource:
    role = first(doc, "cda:recordTarget/cda:patientRole")
    if role is None:
        raise ParseError("C-CDA has no recordTarget/patientRole", source="ccda")
    person = first(role, "cda:patient")
    name = first(person, "cda:name") if person is not None else None
    key = id_key(role)
    if not key:
        issues.append(
            issue(
                "warning",
                "required",
                "patientRole has no id",
                "/ClinicalDocument/recordTarget/patientRole/id",
            )
        )
    addr = first(role, "cda:addr")
    patient: Resource = compact(
        {
            "resourceType": "Patient",
            "id": deterministic_id(source, "Patient", key or id_key(doc)),
            "identifier": identifier_of(role),
            "name": [
                {
                    "family": text(first(name, "cda:family")) if name is not None else None,
                    "given": [text(g) for g in name.findall("cda:given", NS)]
                    if name is not None
                    else None,
                }
            ],
            "gender": GENDER.get(attr(person, "cda:administrativeGenderCode", "code")),
            "birthDate": (ts(person, "cda:birthTime") or "")[:10] or None,
            "address": [
                {
                    "line": [text(x) for x in addr.findall("cda:streetAddressLine", NS)],
                    "city": text(first(addr, "cda:city")),
                    "state": text(first(addr, "cda:state")),
                    "postalCode": text(first(addr, "cda:postalCode")),
                    "country": text(first(addr, "cda:country")),
                }
            ]
            if addr is not None
            else None,
        }
    )
    return patient


def entry_to_resources(entry: Element, ctx: _Doc) -> None:
    children = [c for c in entry if isinstance(c.tag, str)]
    if not children:
        return
    act = children[0]
    for template in template_ids(act):
        handler = _ENTRY_HANDLERS.get(template)
        if handler is not None:
            handler(act, ctx)
            return
    ctx.issues.append(
        issue(
            "information",
            "not-supported",
            f"entry {act.tag.split('}')[-1]} with template "
            f"{(template_ids(act) or ['none'])[0]} not mapped",
            xpath_of(act),
        )
    )


def problem_act_to_conditions(act: Element, ctx: _Doc) -> None:
    concern_status = CONCERN_STATUS.get(attr(act, "cda:statusCode", "code"), "active")
    found = False
    for obs in act.iterfind("cda:entryRelationship/cda:observation", NS):
        if PROBLEM_OBSERVATION not in template_ids(obs):
            continue
        found = True
        code = cd_to_concept(first(obs, "cda:value"))
        if code is None:
            ctx.issues.append(
                issue(
                    "warning",
                    "required",
                    "problem observation without a coded value; skipped",
                    xpath_of(obs),
                )
            )
            continue
        negated = obs.get("negationInd") == "true"
        onset = effective(obs)
        ctx.resources.append(
            compact(
                {
                    "resourceType": "Condition",
                    "id": ctx.rid("Condition", obs),
                    "identifier": identifier_of(obs),
                    "clinicalStatus": codeable_concept(
                        coding(
                            "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "resolved"
                            if attr(obs, "cda:effectiveTime/cda:high", "value")
                            else concern_status,
                        )
                    ),
                    "verificationStatus": codeable_concept(
                        coding(
                            "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                            "refuted" if negated else "confirmed",
                        )
                    ),
                    "category": [
                        codeable_concept(
                            coding(
                                "http://terminology.hl7.org/CodeSystem/condition-category",
                                "problem-list-item",
                            )
                        )
                    ],
                    "code": code,
                    "bodySite": [c for c in [cd_to_concept(first(obs, "cda:targetSiteCode"))] if c],
                    "subject": ctx.patient_ref,
                    "onsetDateTime": onset.get("dateTime") or onset.get("period", {}).get("start"),
                    "abatementDateTime": onset.get("period", {}).get("end"),
                }
            )
        )
    if not found:
        ctx.issues.append(
            issue(
                "warning",
                "incomplete",
                "problem concern without a problem observation",
                xpath_of(act),
            )
        )


def allergy_act_to_allergies(act: Element, ctx: _Doc) -> None:
    for obs in act.iterfind("cda:entryRelationship/cda:observation", NS):
        if ALLERGY_OBSERVATION not in template_ids(obs):
            continue
        substance = cd_to_concept(
            first(obs, "cda:participant/cda:participantRole/cda:playingEntity/cda:code")
        ) or cd_to_concept(first(obs, "cda:value"))
        if obs.get("negationInd") == "true" or substance is None:
            ctx.issues.append(
                issue(
                    "information",
                    "not-supported",
                    "negated or uncoded allergy observation not mapped",
                    xpath_of(obs),
                )
            )
            continue
        onset = effective(obs)
        ctx.resources.append(
            compact(
                {
                    "resourceType": "AllergyIntolerance",
                    "id": ctx.rid("AllergyIntolerance", obs),
                    "identifier": identifier_of(obs),
                    "clinicalStatus": codeable_concept(
                        coding(
                            "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                            "resolved"
                            if attr(obs, "cda:effectiveTime/cda:high", "value")
                            else "active",
                        )
                    ),
                    "verificationStatus": codeable_concept(
                        coding(
                            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                            "confirmed",
                        )
                    ),
                    "code": substance,
                    "patient": ctx.patient_ref,
                    "onsetDateTime": onset.get("dateTime") or onset.get("period", {}).get("start"),
                }
            )
        )


def result_observation_to_observation(obs: Element, ctx: _Doc, category: str) -> Resource | None:
    code = cd_to_concept(first(obs, "cda:code"))
    if code is None:
        ctx.issues.append(
            issue("warning", "required", "observation without a code; skipped", xpath_of(obs))
        )
        return None
    when = effective(obs)
    value = value_to_fhir(first(obs, "cda:value"))
    resource: Resource = compact(
        {
            "resourceType": "Observation",
            "id": ctx.rid("Observation", obs),
            "identifier": identifier_of(obs),
            "status": RESULT_STATUS.get(attr(obs, "cda:statusCode", "code"), "final"),
            "category": [codeable_concept(coding(OBS_CATEGORY, category))],
            "code": code,
            "subject": ctx.patient_ref,
            "effectiveDateTime": when.get("dateTime"),
            "effectivePeriod": when.get("period"),
            **value,
            "interpretation": [
                c for c in [cd_to_concept(first(obs, "cda:interpretationCode"))] if c
            ],
            "referenceRange": [
                {"text": text(rr)}
                for rr in obs.iterfind("cda:referenceRange/cda:observationRange", NS)
                if text(rr)
            ],
        }
    )
    if not value:
        resource["dataAbsentReason"] = codeable_concept(
            coding("http://terminology.hl7.org/CodeSystem/data-absent-reason", "unknown")
        )
    return resource


def organizer_to_report(organizer: Element, ctx: _Doc, category: str = "laboratory") -> None:
    results: list[Resource] = []
    for obs in organizer.iterfind("cda:component/cda:observation", NS):
        mapped = result_observation_to_observation(obs, ctx, category)
        if mapped is not None:
            results.append(mapped)
    ctx.resources += results
    if category != "laboratory":
        return  # vital signs: the organizer is a grouping only
    code = cd_to_concept(first(organizer, "cda:code")) or {"text": "Results"}
    when = effective(organizer)
    if not when and results:
        when = {"dateTime": results[0].get("effectiveDateTime")}
    ctx.resources.append(
        compact(
            {
                "resourceType": "DiagnosticReport",
                "id": ctx.rid("DiagnosticReport", organizer),
                "identifier": identifier_of(organizer),
                "status": REPORT_STATUS.get(attr(organizer, "cda:statusCode", "code"), "final"),
                "category": [codeable_concept(coding(V2_0074, "LAB"))],
                "code": code,
                "subject": ctx.patient_ref,
                "effectiveDateTime": when.get("dateTime"),
                "effectivePeriod": when.get("period"),
                "result": [reference(r) for r in results],
            }
        )
    )


def procedure_to_procedure(act: Element, ctx: _Doc) -> None:
    code = cd_to_concept(first(act, "cda:code"))
    if code is None:
        ctx.issues.append(
            issue("warning", "required", "procedure without a code; skipped", xpath_of(act))
        )
        return
    when = effective(act)
    ctx.resources.append(
        compact(
            {
                "resourceType": "Procedure",
                "id": ctx.rid("Procedure", act),
                "identifier": identifier_of(act),
                "status": PROCEDURE_STATUS.get(attr(act, "cda:statusCode", "code"), "unknown"),
                "code": code,
                "subject": ctx.patient_ref,
                "performedDateTime": when.get("dateTime"),
                "performedPeriod": when.get("period"),
                "bodySite": [c for c in [cd_to_concept(first(act, "cda:targetSiteCode"))] if c],
            }
        )
    )


def medication_activity_to_statement(act: Element, ctx: _Doc) -> None:
    med = cd_to_concept(
        first(act, "cda:consumable/cda:manufacturedProduct/cda:manufacturedMaterial/cda:code")
    )
    if med is None:
        ctx.issues.append(
            issue(
                "warning",
                "required",
                "medication activity without a drug code; skipped",
                xpath_of(act),
            )
        )
        return
    period: dict[str, Any] = {}
    for et in act.findall("cda:effectiveTime", NS):
        if (et.get(XSI_TYPE) or "").endswith("IVL_TS") or first(et, "cda:low") is not None:
            period = compact({"start": ts(et, "cda:low"), "end": ts(et, "cda:high")})
            break
    dosage = text(first(act, "cda:text"))
    dosage_list = [{"text": dosage}] if dosage and not dosage.startswith("#") else None
    intent = MED_INTENT.get(act.get("moodCode") or "EVN")
    if intent is not None:  # a planned/ordered medication: MedicationRequest
        ctx.resources.append(
            compact(
                {
                    "resourceType": "MedicationRequest",
                    "id": ctx.rid("MedicationRequest", act),
                    "identifier": identifier_of(act),
                    "status": MED_REQUEST_STATUS.get(
                        attr(act, "cda:statusCode", "code"), "unknown"
                    ),
                    "intent": intent,
                    "medicationCodeableConcept": med,
                    "subject": ctx.patient_ref,
                    "dosageInstruction": [
                        {
                            **(dosage_list[0] if dosage_list else {}),
                            "timing": {"repeat": {"boundsPeriod": period}} if period else None,
                        }
                    ],
                }
            )
        )
        return
    ctx.resources.append(
        compact(
            {
                "resourceType": "MedicationStatement",
                "id": ctx.rid("MedicationStatement", act),
                "identifier": identifier_of(act),
                "status": MED_STATUS.get(attr(act, "cda:statusCode", "code"), "unknown"),
                "medicationCodeableConcept": med,
                "subject": ctx.patient_ref,
                "effectivePeriod": period or None,
                "dosage": dosage_list,
            }
        )
    )


def social_observation_to_observation(obs: Element, ctx: _Doc) -> None:
    mapped = result_observation_to_observation(obs, ctx, "social-history")
    if mapped is not None:
        ctx.resources.append(mapped)


def document_to_document_reference(
    doc: Element, ctx: _Doc, raw: bytes, narrative: list[tuple[str, str]]
) -> Resource:
    content = [
        {
            "attachment": compact(
                {
                    "contentType": "application/xml",
                    "title": text(first(doc, "cda:title")) or None,
                    "size": len(raw) if raw else None,
                    "hash": base64.b64encode(hashlib.sha1(raw).digest()).decode("ascii")
                    if raw
                    else None,
                }
            ),
            "format": {
                "system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                "code": "urn:hl7-org:sdwg:ccda-structuredBody:2.1",
            },
        }
    ]
    for title, body in narrative:
        content.append(
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "title": title,
                    "data": base64.b64encode(body.encode("utf-8")).decode("ascii"),
                }
            }
        )
    date = ts(doc, "cda:effectiveTime")
    resource: Resource = compact(
        {
            "resourceType": "DocumentReference",
            "id": deterministic_id(ctx.source, "DocumentReference", ctx.doc_key),
            "identifier": identifier_of(doc),
            "status": "current",
            "type": cd_to_concept(first(doc, "cda:code")),
            "category": [
                codeable_concept(
                    coding(
                        "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                        "clinical-note",
                    )
                )
            ],
            "subject": ctx.patient_ref,
            "date": date if date and "T" in date else None,
            "description": text(first(doc, "cda:title")) or None,
            "content": content,
        }
    )
    return resource


_ENTRY_HANDLERS: dict[str, Callable[[Element, _Doc], None]] = {
    PROBLEM_CONCERN_ACT: problem_act_to_conditions,
    ALLERGY_CONCERN_ACT: allergy_act_to_allergies,
    RESULT_ORGANIZER: organizer_to_report,
    VITAL_SIGNS_ORGANIZER: lambda el, ctx: organizer_to_report(el, ctx, "vital-signs"),
    PROCEDURE_ACTIVITY_PROCEDURE: procedure_to_procedure,
    PROCEDURE_ACTIVITY_OBSERVATION: procedure_to_procedure,
    PROCEDURE_ACTIVITY_ACT: procedure_to_procedure,
    MEDICATION_ACTIVITY: medication_activity_to_statement,
    SMOKING_STATUS: social_observation_to_observation,
    SOCIAL_HISTORY_OBSERVATION: social_observation_to_observation,
}


def map_bytes(data: bytes, source: str) -> MapResult:
    """Parse + map one C-CDA document."""
    resources, issues = document_to_resources(parse_document(data), source, data)
    return MapResult(resources, issues, "ccda")
