"""HL7 v2 messages received over MLLP: stored before they are acknowledged, then routed to a
case (results), turned into a case (360X referral orders), or held for an operator.

`V2Inbox` is the MLLP listener's store callback (`connectors.mllp`): it answers AR for what it
will not take (unparseable, unsupported type or version, too large) and otherwise inserts one
`V2Message` row, its audit row and a `route_v2` job in one transaction, and only then lets the
listener send AA. A control id already stored for the same sender (MSH-3 + MSH-4) is not
stored again (the unique constraint decides) and is answered AA again.

The `route_v2` job applies the matching rule (docs/hl7v2.md) to an ORU^R01:

1. candidate cases: open cases whose referral patient has an identifier equal, system and
   value, to a PID-3 identifier (system from the partner's `v2_authorities`, else the HD's
   universal id, else our URN for the namespace); restricted to the sender's partner when
   MSH-4 names one (`v2_facilities`);
2. of those, the cases whose ServiceRequest or Specimen identifiers (identifier,
   accessionIdentifier; value) include an order or accession number of the message (ORC-2,
   ORC-3, OBR-2, OBR-3, SPM-2, SPM-30);
3. exactly one such case: the message is `matched` into it, the identity check runs on its
   PID, and the case is normalised (the v2 mapper runs in the normalise job). Otherwise it is
   `held` with the rule that failed (`no-patient-match`, `no-order-match`, `ambiguous`) until an
   operator assigns it to a case or discards it (admin API, `fhir-gateway v2`), audited.

An OMG^O19 goes to `intake.v2_referrals` (360X). Logs carry ids and rule names, never values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connectors.mllp import (
    ERR_INTERNAL,
    MAX_MESSAGE_BYTES,
    AckDecision,
    parse_header,
)
from connectors.mllp import decode_message as _decode
from fhir_gateway import jobs
from fhir_gateway.casebundle import held
from fhir_gateway.casebundle.normalise import v2_source
from fhir_gateway.errors import ConflictError, InputError, NotFoundError, ParseError
from fhir_gateway.intake import hosted, v2_referrals
from fhir_gateway.jobs import JobContext
from fhir_gateway.resources import identifiers_of, new_id
from fhir_gateway.security import audit
from fhir_gateway.security.audit import Actor
from fhir_gateway.settings import PartnersFile, Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Case, FhirResource, V2Message, utcnow
from mappers.hl7v2 import (
    SUPPORTED_VERSIONS,
    Message,
    message_keys,
    message_to_resources,
    parse_message,
)

log = structlog.get_logger(__name__)

KIND = "route_v2"
NORMALISE_KIND = "normalise_case"
RESULT_TYPES = frozenset({"ORU^R01"})
REFERRAL_TYPES = frozenset({"OMG^O19"})
SUPPORTED_TYPES = RESULT_TYPES | REFERRAL_TYPES
RECEIVED, MATCHED, HELD, ASSIGNED, REFERRAL, DISCARDED = (
    "received",
    "matched",
    "held",
    "assigned",
    "referral",
    "discarded",
)
NO_PATIENT, NO_ORDER, AMBIGUOUS = "no-patient-match", "no-order-match", "ambiguous"
CLOSED = frozenset({"cancelled", "rejected", "completed", "failed"})
ERR_UNSUPPORTED_TYPE, ERR_UNSUPPORTED_VERSION, ERR_SEGMENT = "200", "203", "100"


def short_type(message_type: str, component_sep: str = "^") -> str:
    return "^".join(message_type.split(component_sep)[:2])


# --------------------------------------------------------------------------- the store callback


class V2Inbox:
    """`inbox(message_bytes) -> AckDecision`: the MLLP store callback (thread-safe: one
    session per call)."""

    def __init__(self, store: Store, *, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.store = store
        self.max_bytes = max_bytes

    def __call__(self, data: bytes) -> AckDecision:
        if len(data) > self.max_bytes:
            return AckDecision.reject(f"message larger than {self.max_bytes} bytes", ERR_INTERNAL)
        header = parse_header(_decode(data))
        if header is None:
            return AckDecision.reject("not an HL7 v2 message", ERR_SEGMENT)
        kind = short_type(header.message_type, header.component_sep)
        if kind not in SUPPORTED_TYPES:
            return AckDecision.reject(
                f"unsupported message type {kind}: this receiver takes "
                + ", ".join(sorted(SUPPORTED_TYPES)),
                ERR_UNSUPPORTED_TYPE,
            )
        version = header.version.split(header.component_sep, 1)[0]
        if version not in SUPPORTED_VERSIONS:
            return AckDecision.reject(
                "unsupported HL7 version (MSH-12); supported: " + ", ".join(SUPPORTED_VERSIONS),
                ERR_UNSUPPORTED_VERSION,
            )
        try:
            parse_message(data)
        except ParseError as exc:
            return AckDecision.reject(f"message cannot be parsed: {exc.message}", ERR_SEGMENT)
        row = V2Message(
            id=new_id(),
            sending_application=header.sending_application[:227],
            sending_facility=header.sending_facility[:227],
            control_id=header.control_id[:199],
            message_type=header.message_type[:32],
            received_at=utcnow(),
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            body=data,
            state=RECEIVED,
        )
        if self._exists(row):
            log.debug("v2.message.duplicate", kind=kind)
            return AckDecision.accept()
        try:
            with self.store.session() as s:
                s.add(row)
                s.flush()
                jobs.enqueue(s, KIND, payload={"message": row.id}, dedup_key=f"{KIND}:{row.id}")
                audit.record(
                    s,
                    "v2.receive",
                    _sender_actor(row),
                    entity=[f"v2-message:{row.id}", f"hl7v2:{kind}"],
                )
        except IntegrityError:  # the same control id from the same sender, stored meanwhile
            if self._exists(row):
                log.debug("v2.message.duplicate", kind=kind)
                return AckDecision.accept()
            raise
        log.debug("v2.message.stored", message_id=row.id, kind=kind, size=row.size)
        return AckDecision.accept()

    def _exists(self, row: V2Message) -> bool:
        with self.store.session() as s:
            found = s.scalar(
                select(V2Message.id).where(
                    V2Message.sending_application == row.sending_application,
                    V2Message.sending_facility == row.sending_facility,
                    V2Message.control_id == row.control_id,
                )
            )
        return found is not None


def _sender_actor(row: V2Message) -> Actor:
    return Actor(f"mllp:{row.sending_facility.split('^', 1)[0] or row.sending_application}", "ehr")


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Match:
    case_id: str | None
    reason: str | None  # the rule that failed, when no case


def match_message(session: Session, message: Message, partners: PartnersFile, sender: str) -> Match:
    """The matching rule (module docstring, docs/hl7v2.md) for one parsed result message."""
    partner = partners.by_v2_facility(sender) if sender else None
    keys = message_keys(message, partner.v2_authorities if partner else None)
    candidates: set[str] = set()
    for system, value in keys.patient_identifiers:
        candidates |= _cases_of_patient(session, system, value)
    open_cases = {
        c.id: c
        for c in session.scalars(select(Case).where(Case.id.in_(candidates)))
        if c.status not in CLOSED and (partner is None or c.partner_id == partner.id)
    }
    if not open_cases:
        return Match(None, NO_PATIENT)
    numbers = set(keys.order_numbers)
    hits = [cid for cid in sorted(open_cases) if numbers & _order_numbers(session, cid)]
    if not hits:
        return Match(None, NO_ORDER)
    if len(hits) > 1:
        return Match(None, AMBIGUOUS)
    return Match(hits[0], None)


def _cases_of_patient(session: Session, system: str, value: str) -> set[str]:
    found = set(
        session.scalars(select(Case.id).where(Case.patient_ref == f"identifier:{system}|{value}"))
    )
    token = f"{system}|{value}"
    for row in hosted.find_by_identifier(session, "Patient", token, partner_id=None):
        if row.case_id:
            found.add(row.case_id)
        found |= set(
            session.scalars(select(Case.id).where(Case.patient_ref == f"Patient/{row.id}"))
        )
    return found


def _order_numbers(session: Session, case_id: str) -> set[str]:
    rows = session.scalars(
        select(FhirResource).where(
            FhirResource.case_id == case_id,
            FhirResource.resource_type.in_(("ServiceRequest", "Specimen")),
        )
    )
    out: set[str] = set()
    for row in rows:
        out |= {value for _, value in identifiers_of(row.body)}
        accession = row.body.get("accessionIdentifier") or {}
        if isinstance(accession, dict) and accession.get("value"):
            out.add(str(accession["value"]))
    return out


# --------------------------------------------------------------------------- the job


def run_route_v2(ctx: JobContext) -> None:
    """Job `route_v2`: a stored message -> matched into a case, held, or a 360X referral."""
    message_id = str(ctx.payload.get("message") or "")
    with ctx.store.session(readonly=True) as s:
        row = s.get(V2Message, message_id)
        if row is None:
            raise InputError("route_v2: no such message")
        if row.state != RECEIVED:
            return  # routed already (a re-run after a crash between commit and completion)
        if short_type(row.message_type) in REFERRAL_TYPES:
            parsed = parse_message(row.body)[0]
            referral = True
        else:
            referral = False
    if referral:  # intake runs its own transactions
        v2_referrals.open_referral(ctx.store, message_id, parsed, ctx.settings)
        return
    with ctx.store.session() as s:
        row = s.get(V2Message, message_id)
        if row is None or row.state != RECEIVED:
            return
        parsed = parse_message(row.body)[0]
        found = match_message(s, parsed, ctx.settings.partners, row.sending_facility)
        if found.case_id is None:
            v2_referrals.hold_message(s, row, found.reason or NO_PATIENT)
            return
        _into_case(s, row, parsed, found.case_id, MATCHED, audit.SYSTEM, ctx.settings)


def _into_case(
    session: Session,
    row: V2Message,
    parsed: Message,
    case_id: str,
    state: str,
    by: Actor,
    settings: Settings,
) -> None:
    """The message enters the case: identity check of its PID, normalisation queued."""
    jobs.require_case_open(session, case_id, "adding an HL7 v2 message")
    row.state, row.case_id, row.reason = state, case_id, None
    if state == ASSIGNED:
        row.decided_by, row.decided_at = by.sub, utcnow()
    source = v2_source(row)
    partner = settings.partners.by_v2_facility(row.sending_facility)
    resources, _ = message_to_resources(parsed, source, partner.v2_authorities if partner else None)
    patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
    if patient is not None:
        held.check_patient(session, case_id, source, patient)
    audit.record(
        session,
        "v2.match" if state == MATCHED else "v2.assign",
        by,
        case_id=case_id,
        patient=audit.patient_of_case(session, case_id),
        entity=[f"v2-message:{row.id}"],
    )
    key = f"normalise:{case_id}:v2:{row.id}"
    jobs.enqueue(session, NORMALISE_KIND, case_id=case_id, payload={"key": key}, dedup_key=key)
    log.info("v2.message.in_case", message_id=row.id, case_id=case_id, state=state)


# --------------------------------------------------------------------------- operator actions


def list_messages(session: Session, state: str | None = HELD) -> list[V2Message]:
    stmt = select(V2Message).order_by(V2Message.received_at, V2Message.id)
    if state is not None:
        stmt = stmt.where(V2Message.state == state)
    return list(session.scalars(stmt))


def _decidable(session: Session, message_id: str) -> V2Message:
    row = session.get(V2Message, message_id)
    if row is None:
        raise NotFoundError("no HL7 v2 message with this id")
    if row.state != HELD:
        raise ConflictError(f"only a held message can be decided: this one is {row.state}")
    return row


def assign(
    session: Session, message_id: str, case_id: str, by: Actor, settings: Settings
) -> V2Message:
    """An operator puts a held result message into a case (identity check and normalisation
    follow as for a matched one).

    Raises:
        NotFoundError: no such message or case. ConflictError: not held, or the case is closed.
    """
    row = _decidable(session, message_id)
    case = session.get(Case, case_id)
    if case is None:
        raise NotFoundError("no case with this id")
    if case.status in CLOSED:
        raise ConflictError(f"the case is {case.status}: nothing more enters it")
    _into_case(session, row, parse_message(row.body)[0], case_id, ASSIGNED, by, settings)
    return row


def discard(session: Session, message_id: str, by: Actor) -> V2Message:
    """An operator discards a held message: it stays stored, marked discarded.

    Raises:
        NotFoundError: no such message. ConflictError: it is not held.
    """
    row = _decidable(session, message_id)
    row.state, row.decided_by, row.decided_at = DISCARDED, by.sub, utcnow()
    audit.record(session, "v2.discard", by, entity=[f"v2-message:{row.id}"])
    log.info("v2.message.discarded", message_id=row.id)
    return row


def message_view(row: V2Message) -> dict[str, Any]:
    """A message as JSON for operators: ids, type, sender, state and the rule, never content."""
    return {
        "id": row.id,
        "type": row.message_type,
        "controlId": row.control_id,
        "sendingApplication": row.sending_application,
        "sendingFacility": row.sending_facility,
        "received": hosted.fhir_instant(row.received_at),
        "size": row.size,
        "sha256": row.sha256,
        "state": row.state,
        "reason": row.reason,
        "case": row.case_id,
        "decidedBy": row.decided_by,
    }


__all__ = [
    "KIND",
    "V2Inbox",
    "assign",
    "discard",
    "list_messages",
    "match_message",
    "message_view",
    "run_route_v2",
    "v2_source",
]
