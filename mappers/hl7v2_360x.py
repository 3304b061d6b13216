"""IHE/ONC 360X closed-loop referral over HL7 v2.5.1: OMG^O19 -> a referral (Patient,
ServiceRequest, Task as a FHIR transaction), and a Task status -> OSU^O51.

STANDARDS RF-40..RF-44. The order: PID -> Patient, ORC-2 (placer order number, the referral
id) -> ServiceRequest.identifier and Task.identifier, OBR-4 -> ServiceRequest.code, OBR-31
(reason for study) and NTE -> reasonCode / note, ORC-9 -> authoredOn. A C-CDA sent inside the
message (OBX value type ED, base64, subtype XML) is returned as bytes for the C-CDA mapper.
The status message: ORC-1 `SC` (status changed), ORC-5 from `TASK_ORDER_STATUS` (HL7 table
0038), ORC-2 the referral's placer order number, ORC-3 our filler number (the Task id).
Pure: no clock (the caller passes the time) and no random ids.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fhir_gateway.errors import MappingError
from fhir_gateway.resources import Resource, codeable_concept, compact, deterministic_id
from mappers._common import Issue, issue
from mappers.hl7v2 import (
    V2_0203,
    Message,
    _authority_system,
    _State,
    cwe_to_concept,
    pid_to_patient,
    ts_to_datetime,
)

REFERRAL_TYPES = frozenset({"OMG^O19"})
ORIGIN_TAG = {"system": "urn:fhir-gateway:origin", "code": "hl7v2-360x"}
TASK_CODE = {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]}
# Task.status -> ORC-5 order status (HL7 table 0038). 360X names ORC-1 = SC for a status
# change and ORC-5 = CA for a discontinued referral (RF-43); the rest follow table 0038's
# meanings: SC "in process, scheduled" (received, not yet started), IP "in process", HD "on
# hold", CM "completed", CA "cancelled" (also for a declined referral, with ORC-16 the reason).
TASK_ORDER_STATUS = {
    "received": "SC",
    "accepted": "IP",
    "in-progress": "IP",
    "on-hold": "HD",
    "completed": "CM",
    "cancelled": "CA",
    "rejected": "CA",
    "failed": "CA",
}
# ORC-16 order control code reason for the statuses that carry one (free text in CWE.2).
STATUS_REASON = {"rejected": "DECLINED", "cancelled": "CANCELLED", "failed": "FAILED"}


@dataclass
class Referral:
    """What an OMG^O19 holds: a transaction Bundle to intake, and the C-CDA documents."""

    bundle: Resource
    placer: tuple[str, str]  # (system, value) of ORC-2
    documents: list[bytes] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)


def _ei_system(seg: Any, f: int) -> str:
    """EI namespace^universal id^type -> a system (the universal OID when given)."""
    return _authority_system(seg.get(f, 2), seg.get(f, 3), seg.get(f, 4)) or "urn:fhir-gateway:v2"


def omg_to_referral(message: Message, source: str, requester: tuple[str, str]) -> Referral:
    """One OMG^O19 -> the referral as a FHIR transaction (conditional creates on identifiers,
    so a resent order makes no second case). `requester` is the partner's Organization
    identifier (system, value) found from MSH-4 in the partners file.

    Raises:
        MappingError: no PID, ORC or OBR, or ORC-2 is empty (the referral has no id).
    """
    segs: dict[str, Any] = {}
    notes: list[str] = []
    documents: list[bytes] = []
    issues: list[Issue] = []
    for seg in message.segments:
        segs.setdefault(seg.name, seg)
        if seg.name == "NTE":
            notes.append(seg.text(3))
        elif seg.name == "OBX" and seg.get(2) == "ED":
            doc = _ed_document(seg, issues)
            if doc is not None:
                documents.append(doc)
    for name in ("PID", "ORC", "OBR"):
        if name not in segs:
            raise MappingError(f"OMG^O19 has no {name} segment", source="hl7v2", path=name)
    orc, obr = segs["ORC"], segs["OBR"]
    placer_value = orc.get(2) or obr.get(2)
    if not placer_value:
        raise MappingError(
            "ORC-2 placer order number (the referral id) is empty", source="hl7v2", path="ORC.2"
        )
    placer = (_ei_system(orc if orc.get(2) else obr, 2), placer_value)
    state = _State(source, message, issues)
    pid_to_patient(segs["PID"], state)
    patient = state.patient or {}
    patient.pop("meta", None)
    pid_idents = patient.get("identifier") or []
    org_ident = {"system": requester[0], "value": requester[1]}
    reason = cwe_to_concept(obr, 31)
    authored, _ = ts_to_datetime(orc.get(9))
    placer_ident = {
        "system": placer[0],
        "value": placer[1],
        "type": codeable_concept({"system": V2_0203, "code": "PLAC"}),
    }
    p_url = f"urn:uuid:{deterministic_id(source, 'Patient', *placer)}"
    sr_url = f"urn:uuid:{deterministic_id(source, 'ServiceRequest', *placer)}"
    task_url = f"urn:uuid:{deterministic_id(source, 'Task', *placer)}"
    service_request = compact(
        {
            "resourceType": "ServiceRequest",
            "meta": {"tag": [ORIGIN_TAG]},
            "identifier": [placer_ident],
            "status": "active",
            "intent": "order",
            "code": cwe_to_concept(obr, 4) or {"text": "referral"},
            "subject": {"reference": p_url},
            "requester": {"identifier": org_ident},
            "authoredOn": authored,
            "reasonCode": [reason] if reason else None,
            "note": [{"text": n} for n in notes if n],
        }
    )
    task: Resource = {
        "resourceType": "Task",
        "meta": {"tag": [ORIGIN_TAG]},
        "identifier": [{"system": placer[0], "value": placer[1]}],
        "status": "requested",
        "intent": "order",
        "code": TASK_CODE,
        "focus": {"reference": sr_url},
        "for": {"reference": p_url},
        "requester": {"identifier": org_ident},
        **({"authoredOn": authored} if authored else {}),
    }
    entries = [
        _entry(p_url, {"resourceType": "Patient", **_without(patient, "id")}, pid_idents),
        _entry(sr_url, service_request, [placer_ident]),
        _entry(task_url, task, task["identifier"]),
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return Referral(bundle, placer, documents, issues)


def _without(resource: Resource, *keys: str) -> Resource:
    return {k: v for k, v in resource.items() if k not in keys and k != "resourceType"}


def _entry(full_url: str, resource: Resource, idents: list[dict[str, Any]]) -> dict[str, Any]:
    request: dict[str, Any] = {"method": "POST", "url": resource["resourceType"]}
    first = next((i for i in idents if i.get("value")), None)
    if first is not None:
        request["ifNoneExist"] = f"identifier={first.get('system', '')}|{first['value']}"
    return {"fullUrl": full_url, "resource": resource, "request": request}


def _ed_document(seg: Any, issues: list[Issue]) -> bytes | None:
    """OBX-5 ED (source^type^subtype^encoding^data): base64 XML -> bytes; else an issue."""
    subtype, encoding, data = seg.get(5, 3).upper(), seg.get(5, 4).upper(), seg.get(5, 5)
    if encoding != "BASE64" or ("XML" not in subtype and seg.get(5, 2).upper() != "TEXT"):
        issues.append(
            issue(
                "warning",
                "not-supported",
                "OBX-5 ED document is not base64 XML; not read",
                f"{seg.path}.5",
            )
        )
        return None
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        issues.append(issue("error", "invalid", "OBX-5 ED data is not base64", f"{seg.path}.5"))
        return None


# --------------------------------------------------------------------------- OSU^O51


@dataclass(frozen=True)
class StatusUpdate:
    """One Task status change to tell the referral's initiator."""

    control_id: str  # MSH-10: deterministic per change (a resend is the same message)
    sending_facility: str  # us (MSH-4)
    receiving_facility: str  # the partner (MSH-6, the OMG's MSH-4)
    placer: tuple[str, str]  # ORC-2 (system, value) of the referral
    filler: str  # ORC-3: our Task id
    task_status: str
    patient_identifiers: list[tuple[str, str]]  # PID-3 (system, value)
    when: datetime


def task_status_to_osu(update: StatusUpdate) -> bytes:
    """OSU^O51^OSU_O51 (v2.5.1): MSH, PID, ORC with ORC-1 SC and ORC-5 per TASK_ORDER_STATUS.

    Raises:
        ValueError: a Task status that has no order status (draft, requested: nothing to say).
    """
    code = TASK_ORDER_STATUS[update.task_status]
    ts = update.when.strftime("%Y%m%d%H%M%S%z")
    msh = (
        f"MSH|^~\\&|FHIR-GATEWAY|{_esc(update.sending_facility)}||"
        f"{_esc(update.receiving_facility)}|{ts}||OSU^O51^OSU_O51|{update.control_id}|P|2.5.1"
        "|||AL|NE"
    )
    pid3 = "~".join(f"{_esc(v)}^^^&{_esc(s)}&URI" for s, v in update.patient_identifiers)
    orc = [
        "ORC",
        "SC",
        f"{_esc(update.placer[1])}^^{_esc(update.placer[0])}^URI",
        f"{_esc(update.filler)}^FHIR-GATEWAY",
        "",
        code,
        *[""] * 10,
        f"^{STATUS_REASON[update.task_status]}" if update.task_status in STATUS_REASON else "",
    ]
    segments = [msh, f"PID|1||{pid3}", "|".join(orc).rstrip("|")]
    return ("\r".join(segments) + "\r").encode("utf-8")


def _esc(text: str) -> str:
    out = text.replace("\\", "\\E\\")
    for char, code in (("|", "F"), ("^", "S"), ("~", "R"), ("&", "T")):
        out = out.replace(char, f"\\{code}\\")
    return out


__all__ = [
    "ORIGIN_TAG",
    "REFERRAL_TYPES",
    "TASK_ORDER_STATUS",
    "Referral",
    "StatusUpdate",
    "omg_to_referral",
    "task_status_to_osu",
]
