"""360X closed-loop referrals over HL7 v2.5.1 (docs/hl7v2.md): an OMG^O19 opens a case, and
every status change of its Task goes back as an OSU^O51 over MLLP.

`open_referral` (from the `route_v2` job) maps the order (`mappers.hl7v2_360x`) into a FHIR
referral transaction and runs the same intake as a FHIR push (`intake.referrals`), as the
partner whose `v2_facilities` names MSH-4; a C-CDA carried in the order (OBX ED, base64 XML)
is mapped by the C-CDA mapper and stored as a source of the case, identity-checked.

`tasks.queue_v2_status` is called by the Task state machine in the transaction of every change of a
Task that came from a 360X order: one `send_v2_status` job per change (keyed by the Task
version, so never twice). The job sends the OSU^O51 with `connectors.mllp.MllpClient` to the
partner's `v2_destination`; its control id is fixed per change, so a resend after a crash
between the ACK and the job's completion is the same message (the receiver drops repeats).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import structlog
from sqlalchemy.orm import Session

from connectors.mllp import MllpClient
from fhir_gateway import jobs
from fhir_gateway.casebundle import held
from fhir_gateway.casebundle.normalise import v2_source
from fhir_gateway.errors import (
    ConfigError,
    GatewayError,
    InputError,
    UpstreamRejectedError,
)
from fhir_gateway.intake.referrals import IntakeOptions, intake_transaction
from fhir_gateway.jobs import JobContext
from fhir_gateway.resources import identifiers_of
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Case, FhirResource, StoredResource, V2Message
from mappers import ccda
from mappers.hl7v2 import Message
from mappers.hl7v2_360x import (
    TASK_ORDER_STATUS,
    StatusUpdate,
    omg_to_referral,
    task_status_to_osu,
)

log = structlog.get_logger(__name__)

UNKNOWN_SENDER, INVALID_REFERRAL = "unknown-sender", "referral-invalid"


def open_referral(store: Store, message_id: str, message: Message, settings: Settings) -> None:
    """A stored OMG^O19 -> a case (or held with the rule that failed: unknown sender, or an
    order the referral intake refuses).

    Intake runs its own transactions (exactly once by database keys), so this is called outside
    any open session; a re-run after a crash finds the same case (the push is idempotent)."""
    partners = settings.partners
    with store.session(readonly=True) as s:
        row = s.get(V2Message, message_id)
        if row is None:
            return
        facility, source = row.sending_facility, v2_source(row)
    partner = partners.by_v2_facility(facility)
    if partner is None:
        with store.session() as s:
            hold_message(s, _row(s, message_id), UNKNOWN_SENDER)
        return
    who = Principal(sub=f"mllp:{partner.id}", role="ehr", partner_id=partner.id)
    org = partners.organization
    our_org = {
        "identifier": {"system": org.identifier.system, "value": org.identifier.value},
        "display": org.name,
    }
    options = IntakeOptions(our_org=our_org, our_base=settings.base_url)
    try:
        referral = omg_to_referral(
            message, source, (partner.identifier.system, partner.identifier.value)
        )
        result = intake_transaction(store, referral.bundle, who, partners, options)
    except GatewayError as exc:
        log.info("v2.referral.refused", message_id=message_id, error=type(exc).__name__)
        with store.session() as s:
            hold_message(s, _row(s, message_id), INVALID_REFERRAL)
        return
    case_id = result.case_id
    with store.session() as s:
        row = _row(s, message_id)
        row.state, row.case_id = "referral", case_id
        if case_id is None:
            return
        for n, document in enumerate(referral.documents):
            _store_ccda(s, case_id, f"{source}:ccda:{row.id}:{n}", document)
        key = f"normalise:{case_id}:v2:{row.id}"
        jobs.enqueue(s, "normalise_case", case_id=case_id, payload={"key": key}, dedup_key=key)
    log.info("v2.referral.case", message_id=message_id, case_id=case_id, new=result.new_case)


def _row(session: Session, message_id: str) -> V2Message:
    row = session.get(V2Message, message_id)
    assert row is not None  # stored before the job that routes it was queued
    return row


def hold_message(session: Session, row: V2Message, reason: str) -> None:
    """Hold a stored v2 message for an operator, naming the rule that failed (audited)."""
    row.state, row.reason = "held", reason  # = v2inbox.HELD
    audit.record(
        session, "v2.hold", audit.SYSTEM, entity=[f"v2-message:{row.id}", f"rule:{reason}"]
    )
    log.info("v2.message.held", message_id=row.id, reason=reason)


def _store_ccda(session: Session, case_id: str, source: str, data: bytes) -> None:
    """The referral's C-CDA -> resources (C-CDA mapper) stored as a source of the case; its
    Patient goes through the identity check. A document the mapper refuses is logged, skipped."""
    try:
        resources, _ = ccda.document_to_resources(ccda.parse_document(data), source, data)
    except InputError as exc:
        log.info("v2.referral.ccda_refused", case_id=case_id, error=type(exc).__name__)
        return
    for resource in resources:
        session.add(
            StoredResource(
                case_id=case_id,
                source=source,
                resource_type=resource["resourceType"],
                source_id=resource["id"],
                body=resource,
            )
        )
        if resource["resourceType"] == "Patient":
            held.check_patient(session, case_id, source, resource)
    session.flush()


# --------------------------------------------------------------------------- OSU^O51


def run_send_v2_status(ctx: JobContext) -> None:
    """Job `send_v2_status`: the OSU^O51 of one Task change -> the partner, once AA'd.

    Raises:
        ConfigError: the partner has no `v2_destination` (retried: the operator can add it).
        UpstreamRejectedError: AE/AR (final). UpstreamUnavailableError: no ACK (retried).
    """
    task_id, status = str(ctx.payload["task"]), str(ctx.payload["status"])
    with ctx.store.session() as s:
        task = s.get(FhirResource, ("Task", task_id))
        case = s.get(Case, task.case_id) if task is not None and task.case_id else None
        if task is None or case is None:
            raise InputError("send_v2_status: the Task or its case is gone")
        partner = ctx.settings.partners.by_id(case.partner_id)
        if partner is None or not partner.v2_destination:
            raise ConfigError(f"partner {case.partner_id} has no v2_destination for OSU^O51")
        service_request = s.get(FhirResource, ("ServiceRequest", case.service_request_id))
        placer = next(iter(identifiers_of(service_request.body if service_request else {})), None)
        patient_ids: list[tuple[str, str]] = []
        if case.patient_ref.startswith("Patient/"):
            patient = s.get(FhirResource, ("Patient", case.patient_ref.split("/", 1)[1]))
            patient_ids = list(identifiers_of(patient.body)) if patient is not None else []
        patient_ref = case.patient_ref
    if placer is None:
        raise InputError("send_v2_status: the referral has no placer order number")
    dedup = f"{task_id}:{ctx.payload.get('version')}"
    update = StatusUpdate(
        control_id=hashlib.sha256(dedup.encode()).hexdigest()[:20].upper(),
        sending_facility=ctx.settings.partners.organization.identifier.value,
        receiving_facility=(partner.v2_facilities or [partner.id])[0],
        placer=placer,
        filler=task_id,
        task_status=status,
        patient_identifiers=patient_ids,
        when=datetime.now(UTC),
    )
    host, _, port = partner.v2_destination.rpartition(":")
    with MllpClient(host.strip("[]"), int(port), timeout_s=30) as client:
        ack = client.send(task_status_to_osu(update))
    if not ack.accepted:
        raise UpstreamRejectedError(
            f"OSU^O51 answered {ack.code}", system="mllp", url=f"mllp://{partner.v2_destination}"
        )
    with ctx.store.session() as s:
        audit.record(
            s,
            "v2.status.sent",
            audit.SYSTEM,
            case_id=case.id,
            patient=patient_ref,
            entity=[f"Task/{task_id}", f"order-status:{TASK_ORDER_STATUS[status]}"],
        )
    log.info("v2.status.sent", task_id=task_id, order_status=TASK_ORDER_STATUS[status])


__all__ = ["open_referral", "run_send_v2_status"]
