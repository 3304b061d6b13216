"""SQLAlchemy 2 tables: cases, hosted FHIR resources, pulled resources, binaries, jobs, audit.

One schema for SQLite (embedded default) and PostgreSQL (scale-out). JSON is stored as text
(`JsonText`): it is written once and served as it is, never queried inside the database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fhir_gateway.resources import json_compact, json_loads


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every engine (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to UTCDateTime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_text(value: Any) -> str:
    """JSON as `JsonText` stores it (for writers that serialise before their transaction)."""
    return json_compact(value)


class JsonText(TypeDecorator[Any]):
    """JSON stored as compact UTF-8 text."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return json_text(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json_loads(value)


class Base(DeclarativeBase):
    pass


class Case(Base):
    """One second-opinion case, born from one referral (ServiceRequest + Task)."""

    __tablename__ = "cases"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    partner_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    service_request_id: Mapped[str] = mapped_column(String(64))
    patient_ref: Mapped[str] = mapped_column(String(512))  # Patient/<id> here, or absolute URL
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    # One case per referral, whoever wins a race: enforced here, not by check-then-insert.
    __table_args__ = (UniqueConstraint("service_request_id", name="uq_cases_service_request"),)


class FhirResource(Base):
    """A resource we host at /fhir (Patient, ServiceRequest, Task, ... pushed by a partner)."""

    __tablename__ = "fhir_resources"

    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, default=1)
    partner_id: Mapped[str | None] = mapped_column(String(64), index=True)
    case_id: Mapped[str | None] = mapped_column(ForeignKey("cases.id"), index=True)
    last_updated: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    body: Mapped[Any] = mapped_column(JsonText)


class ResourceIdentifier(Base):
    """Identifiers of hosted resources, unique per partner and type: conditional create,
    idempotent re-push and `?identifier=` search, by index, whatever the value's length.

    The key is (type, sha256 of the value, partner, sha256 of the system): a second resource of
    the same partner and type with the same identifier cannot be stored, so two concurrent
    pushes of one referral cannot both create it (the loser re-reads the winner's). Values are
    kept only as hashes here; the resource body holds them. The key starts with the type and
    the value's hash, so it also serves a search by value alone or across partners: one index
    where there were two (a random page of each at every insert; at 1,000,000 stored resources
    the second one was ~19 of SQLite's 70 page reads per referral, migration 0021).
    """

    __tablename__ = "resource_identifiers"

    partner_id: Mapped[str] = mapped_column(String(64))  # "" for none
    resource_type: Mapped[str] = mapped_column(String(64))
    value_hash: Mapped[str] = mapped_column(String(64))
    system_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        PrimaryKeyConstraint("resource_type", "value_hash", "partner_id", "system_hash"),
        Index("ix_resource_identifiers_resource", "resource_type", "resource_id"),
    )


class StoredResource(Base):
    """A resource pulled or received for a case, as the source sent it (one row per source id)."""

    __tablename__ = "stored_resources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    source: Mapped[str] = mapped_column(String(512))  # e.g. the partner's FHIR base URL
    resource_type: Mapped[str] = mapped_column(String(64))
    source_id: Mapped[str] = mapped_column(String(256))
    fetched_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_updated: Mapped[str | None] = mapped_column(String(40))  # the source's meta.lastUpdated
    body: Mapped[Any] = mapped_column(JsonText)

    __table_args__ = (
        UniqueConstraint(
            "case_id", "source", "resource_type", "source_id", name="uq_stored_resources_source"
        ),
    )


class Binary(Base):
    """A binary payload (PDF, DICOM, attachment) kept as a file addressed by its SHA-256."""

    __tablename__ = "binaries"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    """A durable unit of work (transactional outbox): leased, retried, or dead with a reason."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    case_id: Mapped[str | None] = mapped_column(ForeignKey("cases.id"), index=True)
    payload: Mapped[Any] = mapped_column(JsonText, default=dict)
    dedup_key: Mapped[str | None] = mapped_column(String(256), unique=True)
    state: Mapped[str] = mapped_column(String(16))  # queued | running | done | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=8)
    run_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[Any] = mapped_column(JsonText, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_jobs_claim", "state", "kind", "run_at"),)


class Assignment(Base):
    """A reviewer assigned to a case, optionally until a given time."""

    __tablename__ = "assignments"

    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(256), primary_key=True)  # the token's subject
    assigned_by: Mapped[str] = mapped_column(String(256))
    assigned_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditRow(Base):
    """Append-only audit log; each row carries the hash of the previous one."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    recorded: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(String(64))  # e.g. referral.intake, case.read
    outcome: Mapped[str] = mapped_column(String(8))  # FHIR AuditEvent.outcome: 0, 4, 8, 12
    agent: Mapped[str] = mapped_column(String(256))
    agent_role: Mapped[str] = mapped_column(String(32))
    case_id: Mapped[str | None] = mapped_column(String(36), index=True)
    patient: Mapped[str | None] = mapped_column(String(512), index=True)  # Patient reference
    entity: Mapped[Any] = mapped_column(JsonText, default=list)  # references touched
    request_id: Mapped[str | None] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class Report(Base):
    """The reviewer's report on a case: the draft, and the DiagnosticReport last submitted."""

    __tablename__ = "reports"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # draft | submitted | amended | retracted
    draft: Mapped[Any] = mapped_column(JsonText)
    draft_changed: Mapped[bool] = mapped_column(default=True)  # edited since the last submit
    version: Mapped[int] = mapped_column(Integer, default=0)  # submissions so far
    fhir_status: Mapped[str | None] = mapped_column(String(20))  # final|amended|corrected|e-i-e
    diagnostic_report: Mapped[Any] = mapped_column(JsonText, nullable=True)
    identifier_system: Mapped[str] = mapped_column(String(512))
    identifier_value: Mapped[str] = mapped_column(String(256))
    author: Mapped[str] = mapped_column(String(256))  # the reviewer's token subject
    # Where the report lives on the destination once delivered (for amend/retract).
    dest_type: Mapped[str | None] = mapped_column(String(64))
    dest_id: Mapped[str | None] = mapped_column(String(128))
    dest_version: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Delivery(Base):
    """One version of a report on its way to the destination EHR, with what the EHR answered."""

    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id"), index=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    report_version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))  # create | update | retract
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending|delivered|dead|superseded
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_outcome: Mapped[Any] = mapped_column(JsonText, nullable=True)  # the EHR's OperationOutcome
    last_error: Mapped[str | None] = mapped_column(Text)
    next_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    server_type: Mapped[str | None] = mapped_column(String(64))
    server_id: Mapped[str | None] = mapped_column(String(128))
    server_version: Mapped[str | None] = mapped_column(String(64))
    fallback_used: Mapped[bool] = mapped_column(default=False)
    job_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # "destination" (the treating EHR, completes the Task) or the name of a further recipient.
    recipient: Mapped[str] = mapped_column(
        String(64), default="destination", server_default="destination"
    )

    __table_args__ = (
        UniqueConstraint(
            "report_id", "report_version", "recipient", name="uq_deliveries_report_version"
        ),
    )


class ImageInstance(Base):
    """One DICOM instance held for a case: where its bytes are and what it is (index row).

    `sha256` addresses the file in the file image store (`<data_dir>/blobs/sha256/ab/cdef...`);
    the Orthanc backend keeps its own copy and records `orthanc_id` instead.
    """

    __tablename__ = "image_instances"

    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    backend: Mapped[str] = mapped_column(String(16))  # file | orthanc
    orthanc_id: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(512))  # e.g. the partner's DICOMweb base URL
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The instance's attributes as DICOM JSON text (PS3.18 F, bulk data left out), taken at
    # ingest: QIDO-RS and WADO-RS metadata serve it without reading the file. NULL for rows
    # stored before migration 0013 (the file is read then).
    dicom_json: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_image_instances_series", "case_id", "study_uid", "series_uid"),)


class NormalisedResource(Base):
    """One resource of a case's normalised bundle, as the JSON text served (never re-parsed)."""

    __tablename__ = "normalised_resources"

    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # order in the Bundle
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)  # compact JSON, written once


class CaseBundleState(Base):
    """The last normalisation of a case: what the bundle endpoints serve."""

    __tablename__ = "case_bundles"

    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    base_url: Mapped[str] = mapped_column(String(512))  # of the entries' fullUrl
    etag: Mapped[str] = mapped_column(String(80))
    resource_count: Mapped[int] = mapped_column(Integer)
    counts: Mapped[Any] = mapped_column(JsonText)  # resources per type
    summary: Mapped[Any] = mapped_column(JsonText)  # completeness (bundle.completeness)
    issues: Mapped[Any] = mapped_column(JsonText)  # data-quality issues with source paths
    sources: Mapped[Any] = mapped_column(JsonText)  # [{source, kind, resources}]
    built_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What the inputs were when built (normalise._inputs_mark, as text): a normalise job whose
    # inputs are unchanged does not build again. NULL before migration 0013.
    inputs_mark: Mapped[str | None] = mapped_column(String(512))


class CaseBuild(Base):
    """A normalisation of the case being built (casebundle/normalise.py): at most one at a time.

    The row names the `normalise_case` job building; it holds while that job is running with a
    live lease. A normalisation that finds it held sets `rerun` and ends; the builder, before it
    lets go, checks its inputs again and builds once more when they changed (no lost update)."""

    __tablename__ = "case_builds"

    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36))
    rerun: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CaseView(Base):
    """What the case page and the timeline endpoint show, derived from a build of the bundle
    (`casebundle.derived`): written with the bundle, served only while `etag` is the stored
    bundle's and `version` the code's. No row for cases normalised before migration 0017."""

    __tablename__ = "case_views"

    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    # Small columns first, the timeline last: SQLite reads a row's columns in order, so the
    # cases list (etag, version, glance) never walks the timeline's overflow pages.
    etag: Mapped[str] = mapped_column(String(80))  # CaseBundleState.etag it was derived from
    version: Mapped[int] = mapped_column(Integer)  # derived.VERSION
    built_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    glance: Mapped[Any] = mapped_column(JsonText)  # the cases list's line (derived.glance)
    page: Mapped[Any] = mapped_column(JsonText)  # marker ranges, documents, studies
    timeline: Mapped[str] = mapped_column(Text)  # the events as compact JSON, served as is


class SmartJti(Base):
    """A client assertion's `jti` already used (SMART SM-21 replay cache), shared by every
    process on the database and kept until the assertion expires. The jti is stored hashed."""

    __tablename__ = "smart_jtis"

    client_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    jti_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AuditCheckpoint(Base):
    """The audit chain's signed high-water mark (one row, id 1): how many rows the chain has,
    its newest row and hash, and an HMAC over them with the audit key. Updated in the
    transaction of every audit row, so deleting the newest rows is detected."""

    __tablename__ = "audit_checkpoint"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    keyed_from: Mapped[int] = mapped_column(Integer)  # first row hashed with the key
    count: Mapped[int] = mapped_column(Integer)
    last_id: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


class HeldItem(Base):
    """Something that entered a case but failed the identity check (casebundle/held.py): a DICOM
    study (`key` = Study Instance UID) or a pulled Patient with the records that point at it
    (`key` = `Patient/<id>` at `source`). Held and rejected items stay out of the case bundle
    and the per-case DICOMweb; `fields` names what differed, never the values."""

    __tablename__ = "held_items"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid5(case, kind, source, key)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # study | patient
    source: Mapped[str] = mapped_column(String(512))
    key: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))  # probable | mismatch
    fields: Mapped[Any] = mapped_column(JsonText)  # {"differ": [...], "unconfirmed": [...]}
    state: Mapped[str] = mapped_column(String(16), index=True)  # held | released | rejected
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    decided_by: Mapped[str | None] = mapped_column(String(256))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("case_id", "kind", "source", "key", name="uq_held_items_item"),
    )


class V2Message(Base):
    """One HL7 v2 message received over MLLP (intake/v2inbox.py), stored as received before it
    was acknowledged. `state`: received (routing queued) | matched (in `case_id`) | held
    (awaiting an operator: `reason` says which rule failed) | assigned (by an operator, in
    `case_id`) | referral (a 360X order that opened `case_id`) | discarded. A sender's control
    id is stored once (the unique constraint): a resend is acknowledged again, not stored."""

    __tablename__ = "v2_messages"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    sending_application: Mapped[str] = mapped_column(String(227))  # MSH-3 (HD) as sent
    sending_facility: Mapped[str] = mapped_column(String(227))  # MSH-4 (HD) as sent
    control_id: Mapped[str] = mapped_column(String(199))  # MSH-10
    message_type: Mapped[str] = mapped_column(String(32))  # MSH-9, e.g. ORU^R01^ORU_R01
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    body: Mapped[bytes] = mapped_column(LargeBinary)  # the message bytes as received
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(64))  # why held (a rule name, no values)
    case_id: Mapped[str | None] = mapped_column(ForeignKey("cases.id"), index=True)
    decided_by: Mapped[str | None] = mapped_column(String(256))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint(
            "sending_application", "sending_facility", "control_id", name="uq_v2_messages_control"
        ),
    )


class CaseDocument(Base):
    """A document of a case (an attachment pulled from the EHR, or a file uploaded): the bytes
    are a `Binary` file, the kind is what its content is (mappers/content.py), not what it was
    declared as. One row per (case, content): the same file twice is the same document.
    `records/documents.py` reads it; the case bundle shows it as a DocumentReference."""

    __tablename__ = "case_documents"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid5(case, sha256)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))  # ContentKind: pdf | ccda | hl7v2 | ...
    content_type: Mapped[str] = mapped_column(String(128))  # served as (by content)
    declared_type: Mapped[str] = mapped_column(String(128))  # as sent ("" when none)
    origin: Mapped[str] = mapped_column(String(16))  # pulled | upload
    source: Mapped[str] = mapped_column(String(512))  # the EHR's base URL, or the uploader
    attached_to: Mapped[str | None] = mapped_column(String(256))  # "DocumentReference/<id>"
    text_sha256: Mapped[str | None] = mapped_column(String(64))  # extracted text (PDF)
    no_text_layer: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16))  # mapped | stored | failed
    detail: Mapped[str | None] = mapped_column(Text)  # why not mapped (no values, no PHI)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("case_id", "sha256", name="uq_case_documents_content"),)


class SubscriptionState(Base):
    """A partner's topic-based Subscription (R4 Backport IG 1.1.0): its status, the event
    counter, and the send lease that keeps its notifications in order (one sender at a time).
    The Subscription resource itself is a hosted FhirResource with the same id."""

    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    partner_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))  # requested | active | error | off
    events_since_start: Mapped[int] = mapped_column(Integer, default=0)
    last_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sender: Mapped[str | None] = mapped_column(String(64))  # the job holding the send lease
    sender_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class SubscriptionEvent(Base):
    """One numbered event of a subscription (a Task status change), queued in the transaction
    of the change and sent once, in event-number order."""

    __tablename__ = "subscription_events"

    subscription_id: Mapped[str] = mapped_column(ForeignKey("subscriptions.id"), primary_key=True)
    event_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    focus: Mapped[str] = mapped_column(String(128))  # Task/<id>
    resource: Mapped[Any] = mapped_column(JsonText)  # the Task as it was after the change
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Question(Base):
    """A follow-up question from the treating team about a delivered report (a Communication
    pushed to /fhir) and the reviewer's answer (an addendum plus a reply Communication)."""

    __tablename__ = "questions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    communication_id: Mapped[str] = mapped_column(String(64), unique=True)
    text: Mapped[str] = mapped_column(Text)  # PHI: shown to the case's reviewer only
    status: Mapped[str] = mapped_column(String(16))  # open | answered
    asked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    answer: Mapped[str | None] = mapped_column(Text)
    answered_by: Mapped[str | None] = mapped_column(String(256))
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    report_version: Mapped[int | None] = mapped_column(Integer)  # the amended version
    reply_id: Mapped[str | None] = mapped_column(String(64))  # our reply Communication's id


class UploadLink(Base):
    """A patient upload link for one case: upload-only, expiring, revocable. Only the SHA-256 of
    its token is kept (the token itself is shown once, in the answer that created it)."""

    __tablename__ = "upload_links"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_by: Mapped[str | None] = mapped_column(String(256))


class UploadLinkFile(Base):
    """One file an upload link received (or refused), as the link's page lists it: the name the
    patient's browser gave, the result and the reason; no content."""

    __tablename__ = "upload_link_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    link_id: Mapped[str] = mapped_column(ForeignKey("upload_links.id"), index=True)
    name: Mapped[str] = mapped_column(String(1024))
    result: Mapped[str] = mapped_column(String(16))  # accepted | rejected | ignored
    kind: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
