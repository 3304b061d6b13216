"""Referral intake (transaction or single POSTs): resources stored, the Case opened, pulls queued.

A referral is a Task (`focus` -> ServiceRequest, `for` -> Patient) from a registered partner.
Intake stores the resources, creates the Case, moves the Task `requested -> received` and queues
the pulls, all in one database transaction: a crash leaves a whole case or nothing.

Exactly once, by construction: identifiers are unique per partner and type in the database and a
case is unique per Task and per ServiceRequest, so of two identical pushes racing, one writes and
the other is re-run and answered with the winner's resources. Right partner: a referral may
reference only its own partner's resources, entries of the same push, or contained ones.
The slow part (validation, lookups, reference rewriting) runs before the write transaction, so a
big push holds the SQLite write lock only for its inserts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.errors import (
    ConflictError,
    ForbiddenError,
    PayloadTooLargeError,
    UnknownPartnerError,
    ValidationError,
)
from fhir_gateway.intake import hosted
from fhir_gateway.intake.tasks import TRANSITIONS, queue_v2_status
from fhir_gateway.intake.validation import validate_resource
from fhir_gateway.notify import subscriptions
from fhir_gateway.resources import Resource, new_id
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Partner, PartnersFile
from fhir_gateway.store import Store
from fhir_gateway.store.models import Base, FhirResource, json_text, utcnow
from fhir_gateway.store.prebuilt import Prebuilt, Prefetched

log = structlog.get_logger(__name__)


@dataclass
class EntryOutcome:
    """What happened to one request entry (one transaction-response entry): the stored
    resource's type, id and version (its body only for a single POST)."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    created: bool
    case_id: str | None = None
    body: Resource | None = None

    @property
    def status(self) -> str:
        return "201 Created" if self.created else "200 OK"


@dataclass
class IntakeResult:
    entries: list[EntryOutcome]
    case_id: str | None
    new_case: bool
    jobs: list[str] = field(default_factory=list)


# --- intake -------------------------------------------------------------------------------

MAX_REFERENCE_CHARS = 512  # a Reference.reference longer than this is refused (422)
ATTEMPTS = 3  # a push that loses a race to an identical one is re-run against the winner's rows
_RELATIVE = re.compile(
    r"^(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-\.]{1,64})(/_history/[A-Za-z0-9\-\.]{1,64})?$"
)


@dataclass
class _Entry:
    index: int
    path: str  # FHIRPath prefix for errors
    resource: Resource
    full_url: str | None
    if_none_exist: str | None
    keys: list[hosted.IdentifierKey] = field(default_factory=list)

    @property
    def rtype(self) -> str:
        return str(self.resource["resourceType"])


@dataclass
class _Plan:
    """What the input alone decides (no database): the partner, the entries, and the
    references to resources pushed before, which must be this partner's."""

    entries: list[_Entry]
    partner: Partner
    bundle_mode: bool
    stored_refs: dict[tuple[str, str], str]  # (type, id) -> FHIRPath of the first use


@dataclass
class _Matches:
    """Which entries are already stored (id) or repeat an earlier entry (its index)."""

    existing: dict[int, str]
    repeats: dict[int, int]
    # PostgreSQL: version, time and case of resources found by identifier, read by the match
    # in the write transaction (no second query for them)
    versions: hosted.Versions = field(default_factory=dict)


@dataclass
class IntakeOptions:
    """Settings intake needs, passed inward as plain values."""

    our_org: Resource | None = None
    our_base: str | None = None  # our public base URL: absolute references to it are local
    max_entries: int = 1000


def intake_transaction(
    store: Store,
    bundle: Any,
    who: Principal,
    partners: PartnersFile,
    options: IntakeOptions | None = None,
) -> IntakeResult:
    """Process a transaction Bundle (RS-30): all entries or none, each at most once.

    Raises:
        ValidationError, UnknownPartnerError, ForbiddenError, PreconditionFailedError,
        PayloadTooLargeError: the whole transaction is rejected and nothing is stored.
    """
    options = options or IntakeOptions()
    entries = _transaction_entries(bundle, options.max_entries)
    return _run(store, entries, who, partners, options, bundle_mode=True)


def intake_single(
    store: Store,
    resource: Any,
    who: Principal,
    partners: PartnersFile,
    if_none_exist: str | None,
    options: IntakeOptions | None = None,
) -> IntakeResult:
    """POST [type]: one resource, with optional conditional create (RS-05)."""
    resource = validate_resource(resource, allowed=hosted.HOSTED_TYPES)
    entry = _Entry(0, resource["resourceType"], resource, None, if_none_exist)
    return _run(store, [entry], who, partners, options or IntakeOptions(), bundle_mode=False)


def _transaction_entries(bundle: Any, max_entries: int) -> list[_Entry]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ValidationError("expected a Bundle", expression=["Bundle"], status_code=400)
    if bundle.get("type") != "transaction":
        raise ValidationError(
            "Bundle.type must be 'transaction'",
            expression=["Bundle.type"],
            status_code=400,
        )
    raw_entries = bundle.get("entry")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ValidationError(
            "transaction has no entries", expression=["Bundle.entry"], status_code=400
        )
    if len(raw_entries) > max_entries:
        raise PayloadTooLargeError(
            f"transaction has {len(raw_entries)} entries; at most {max_entries} are accepted "
            "(limits.max_transaction_entries): split it into several transactions",
            expression=["Bundle.entry"],
        )
    entries: list[_Entry] = []
    for i, e in enumerate(raw_entries):
        path = f"Bundle.entry[{i}]"
        if not isinstance(e, dict):
            raise ValidationError("entry is not an object", expression=[path], status_code=400)
        request = e.get("request") or {}
        if not isinstance(request, dict):
            raise ValidationError(
                "entry.request is not an object", expression=[f"{path}.request"], status_code=400
            )
        method = request.get("method")
        if method != "POST":
            raise ValidationError(
                "only POST entries are accepted in a referral",
                expression=[f"{path}.request.method"],
                status_code=400,
            )
        resource = validate_resource(
            e.get("resource"), path=f"{path}.resource", allowed=hosted.HOSTED_TYPES
        )
        url, _, query = str(request.get("url") or "").partition("?")
        if url.strip("/") != resource["resourceType"]:
            raise ValidationError(
                "request.url does not name the entry's resourceType",
                expression=[f"{path}.request.url"],
                status_code=400,
            )
        if_none_exist = request.get("ifNoneExist")
        if query:  # `POST Patient?identifier=...`: conditional create by query (as fhirpy sends)
            if if_none_exist and if_none_exist != query:
                raise ValidationError(
                    "request.url carries search criteria and request.ifNoneExist different ones",
                    expression=[f"{path}.request.url"],
                    status_code=400,
                )
            if_none_exist = query
        full_url = e.get("fullUrl")
        entries.append(
            _Entry(
                i,
                f"{path}.resource",
                resource,
                full_url if isinstance(full_url, str) else None,
                if_none_exist if isinstance(if_none_exist, str) else None,
            )
        )
    return entries


def _run(
    store: Store,
    entries: list[_Entry],
    who: Principal,
    partners: PartnersFile,
    options: IntakeOptions,
    *,
    bundle_mode: bool,
) -> IntakeResult:
    """Plan from the input, look up what exists in a read-only session (no write lock), prepare
    the rows, then write them in one short transaction that re-checks the lookup (SQLite; on
    PostgreSQL the lookup is in the write transaction: `_run_in_one`).

    The database makes it exactly once: identifiers are unique per partner and type, and a case
    is unique per Task and per ServiceRequest. A push that loses a race to an identical one
    (IntegrityError at insert) is rolled back whole and run again, and then finds the winner's
    rows: 200 with them, never a second case.
    """
    plan = _plan(entries, who, partners, options, bundle_mode=bundle_mode)
    if store.is_postgres:
        return _run_in_one(store, plan, who, options)
    with _lookup(store, plan) as s:
        _check_stored_refs(s, plan)
        matches = _match(s, plan)
    for attempt in range(1, ATTEMPTS + 1):
        prepared = _prepare(plan, matches, options)
        try:
            with store.session() as s:
                # Identifiers stored since the lookup make the insert fail (unique key) and the
                # push run again; conditional criteria are not all keys: ask them again here.
                if _conditional_changed(s, plan, matches):
                    matches = _match(s, plan)
                    prepared = _prepare(plan, matches, options)
                return _write(s, plan, matches, prepared, who, options)
        except IntegrityError:
            log.info("referral.intake.race", attempt=attempt, entries=len(entries))
            with _lookup(store, plan) as s:
                matches = _match(s, plan)
    raise ConflictError(
        "the same resources are being pushed concurrently; retry the request",
        expression=["Bundle.entry" if bundle_mode else entries[0].path],
    )


def _run_in_one(store: Store, plan: _Plan, who: Principal, options: IntakeOptions) -> IntakeResult:
    """PostgreSQL: the lookup in the write transaction itself (one transaction per push, not
    a read-only one before it). SQLite looks up first because its write transaction holds the
    database's one write lock; PostgreSQL locks only the rows written, at the inserts, so the
    second transaction bought nothing and cost a BEGIN, a COMMIT and a pool checkout. The same
    rule makes it exactly once: identifiers stored since the lookup fail the insert (unique key)
    and the push is run again."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with store.session() as s:
                # A Task can open a case, which tells the partner's live subscriptions: they
                # are read with the match, not in a round trip of their own before the audit's.
                live = (
                    subscriptions.prefetch_live(s, plan.partner.id)
                    if any(e.rtype == "Task" for e in plan.entries)
                    else None
                )
                _check_stored_refs(s, plan)
                matches = _match(s, plan)
                prepared = _prepare(plan, matches, options)
                return _write(s, plan, matches, prepared, who, options, live)
        except IntegrityError:
            log.info("referral.intake.race", attempt=attempt, entries=len(plan.entries))
    raise ConflictError(
        "the same resources are being pushed concurrently; retry the request",
        expression=["Bundle.entry" if plan.bundle_mode else plan.entries[0].path],
    )


def _lookup(store: Store, plan: _Plan) -> AbstractContextManager[Session | Connection]:
    """The read-only transaction of the lookups before the write: a Core connection unless
    conditional criteria need the ORM (`hosted.conditional_match` loads rows)."""
    if any(e.if_none_exist for e in plan.entries):
        return store.session(readonly=True)
    return store.connection(readonly=True)


def _plan(
    entries: list[_Entry],
    who: Principal,
    partners: PartnersFile,
    options: IntakeOptions,
    *,
    bundle_mode: bool,
) -> _Plan:
    by_type: dict[str, list[_Entry]] = {}
    for e in entries:
        by_type.setdefault(e.rtype, []).append(e)
        e.keys = hosted.identifier_keys(e.resource)
    for rtype in ("ServiceRequest", "Task"):
        if len(by_type.get(rtype, [])) > 1:
            extra = by_type[rtype][1]
            raise ValidationError(
                f"a referral carries one {rtype}, found several", expression=[extra.path]
            )
    if bundle_mode and "Task" not in by_type:
        raise ValidationError(
            "a referral transaction needs a Task (focus -> ServiceRequest)",
            expression=["Bundle.entry"],
        )
    partner = _resolve_partner(entries, who, partners)
    for e in by_type.get("ServiceRequest", []):
        _check_service_request(e)
    for e in by_type.get("Task", []):
        _check_task(e)
    stored_refs = _check_references(entries, partner, options.our_base)
    return _Plan(entries, partner, bundle_mode, stored_refs)


# --- references: own partner's, same transaction, or contained (DESIGN "right partner") -----


def _references(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(FHIRPath of the Reference, its `reference`) for every Reference in `value`. Only
    objects and arrays are walked into (a call and a path per leaf value was most of it)."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            yield path, ref
        for key, item in value.items():
            if key != "reference" and isinstance(item, (dict, list)):
                yield from _references(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (dict, list)):
                yield from _references(item, f"{path}[{i}]")


def _check_references(
    entries: list[_Entry], partner: Partner, our_base: str | None
) -> dict[tuple[str, str], str]:
    """Every reference must resolve to a contained resource, an entry of this push, this
    partner's own systems (its registered FHIR base URLs), or a resource this partner pushed
    before. Returns the last kind, to be checked against the store; refuses the rest (422)."""
    aliases = {alias for e in entries for alias in _aliases(e)}
    partner_bases = [
        f"{endpoint.base_url}/"
        for endpoint in (partner.fhir, partner.destination)
        if endpoint is not None
    ]
    own = f"{our_base.rstrip('/')}/fhir/" if our_base else None
    stored: dict[tuple[str, str], str] = {}
    for e in entries:
        contained = {
            str(c.get("id"))
            for c in e.resource.get("contained") or []
            if isinstance(c, dict) and c.get("id")
        }
        for path, ref in _references(e.resource, e.path):
            if len(ref) > MAX_REFERENCE_CHARS:
                raise ValidationError(
                    f"reference is longer than {MAX_REFERENCE_CHARS} characters",
                    expression=[path],
                )
            if ref.startswith("#"):
                if ref == "#" or ref[1:] in contained:
                    continue
                raise ValidationError(
                    "contained reference does not name a contained resource", expression=[path]
                )
            if ref in aliases:
                continue
            if own is not None and ref.startswith(own):
                ref = ref[len(own) :]
            elif "://" in ref:
                if any(ref.startswith(base) for base in partner_bases):
                    continue
                raise ValidationError(
                    "reference points outside the requesting partner's registered systems",
                    expression=[path],
                )
            match = _RELATIVE.match(ref)
            if match is None:
                raise ValidationError(
                    "reference does not resolve: not contained, not an entry of this "
                    "transaction, and not a Type/id of a resource stored here",
                    expression=[path],
                )
            stored.setdefault((match["type"], match["id"]), path)
    return stored


_RESOURCES = FhirResource.__table__
# Built once, run on the DBAPI cursor (`store.prebuilt`): no ORM or execution layer per push.
_VERSIONS = Prebuilt(
    select(
        _RESOURCES.c.id, _RESOURCES.c.version_id, _RESOURCES.c.last_updated, _RESOURCES.c.case_id
    ).where(
        _RESOURCES.c.resource_type == bindparam("rtype"),
        _RESOURCES.c.id.in_(bindparam("ids", expanding=True)),
    )
)
_OWNED = Prebuilt(
    select(_RESOURCES.c.id).where(
        _RESOURCES.c.resource_type == bindparam("rtype"),
        _RESOURCES.c.id.in_(bindparam("ids", expanding=True)),
        _RESOURCES.c.partner_id == bindparam("partner"),
    )
)


def _check_stored_refs(session: Session | Connection, plan: _Plan) -> None:
    """Resources referenced by Type/id must exist and be the requesting partner's. The answer is
    the same for "not there" and "another partner's": no probing of other partners' ids."""
    by_type: dict[str, list[str]] = {}
    for rtype, rid in plan.stored_refs:
        by_type.setdefault(rtype, []).append(rid)
    owned: set[tuple[str, str]] = set()
    for rtype, ids in by_type.items():
        if rtype not in hosted.HOSTED_TYPES:
            continue
        for start in range(0, len(ids), 500):
            params = {"rtype": rtype, "ids": ids[start : start + 500], "partner": plan.partner.id}
            owned.update((rtype, rid) for (rid,) in _OWNED.rows(_core(session), params))
    for key, path in plan.stored_refs.items():
        if key not in owned:
            raise ValidationError(
                "reference does not resolve to a resource of the requesting partner (only "
                "its own resources, entries of this transaction and contained resources)",
                expression=[path],
            )


# --- exactly once: match, prepare, write ----------------------------------------------------


def _core(session: Session | Connection) -> Connection:
    return session.connection() if isinstance(session, Session) else session


def _orm(session: Session | Connection) -> Session:
    """The session of a lookup with conditional criteria (`_lookup` opens one for those)."""
    assert isinstance(session, Session), "conditional criteria are looked up in a Session"
    return session


def _match(session: Session | Connection, plan: _Plan) -> _Matches:
    """Which entries exist already (conditional create, or any identifier the partner pushed
    before) and which repeat an earlier entry of the same push (same type and identifier).
    `session` may be a Core connection when no entry has conditional criteria (`_lookup`)."""
    existing: dict[int, str] = {}
    by_type: dict[str, set[hosted.IdentifierKey]] = {}
    for e in plan.entries:
        if e.if_none_exist:
            row = hosted.conditional_match(
                _orm(session), e.rtype, e.if_none_exist, partner_id=plan.partner.id
            )
            if row is not None:
                existing[e.index] = row.id
                continue
        by_type.setdefault(e.rtype, set()).update(e.keys)
    versions: hosted.Versions = {}
    found = (
        hosted.match_identifiers(_core(session), plan.partner.id, by_type, versions)
        if by_type
        else {}
    )
    repeats: dict[int, int] = {}
    first_with: dict[tuple[str, hosted.IdentifierKey], int] = {}
    for e in plan.entries:
        if e.index in existing:
            continue
        held = found.get(e.rtype, {})
        if e.if_none_exist:
            # Explicit criteria matched nothing, but an identifier of the new resource already
            # identifies another resource of this partner: two resources cannot share it.
            taken = next((i for i, k in enumerate(e.keys) if k in held), None)
            if taken is not None:
                # Or a concurrent push committed it between the two queries: ask again.
                again = hosted.conditional_match(
                    _orm(session), e.rtype, str(e.if_none_exist), partner_id=plan.partner.id
                )
                if again is not None:
                    existing[e.index] = again.id
                    continue
                raise ConflictError(
                    f"an identifier of this {e.rtype} already identifies another {e.rtype} "
                    "of this partner",
                    expression=[f"{e.path}.identifier[{_identifier_index(e, taken)}]"],
                )
        else:
            hit = next((held[k] for k in e.keys if k in held), None)
            if hit is not None:
                existing[e.index] = hit
                continue
        earlier = next(
            (first_with[(e.rtype, k)] for k in e.keys if (e.rtype, k) in first_with), None
        )
        if earlier is not None:
            repeats[e.index] = earlier
            continue
        for k in e.keys:
            first_with[(e.rtype, k)] = e.index
    return _Matches(existing, repeats, versions)


def _identifier_index(e: _Entry, key_index: int) -> int:
    """Position in `identifier` of the entry's `key_index`-th distinct identifier key."""
    key = e.keys[key_index]
    for i, ident in enumerate(e.resource.get("identifier") or []):
        if hosted.identifier_keys({"identifier": [ident]}) == [key]:
            return i
    return key_index


def _conditional_changed(session: Session, plan: _Plan, matches: _Matches) -> bool:
    """Whether criteria that matched nothing before the write match something now. Criteria
    naming one of the entry's own identifiers (system and value) need no second look: a
    resource stored since with that identifier makes our insert fail (unique key) instead."""
    for e in plan.entries:
        if (
            e.if_none_exist
            and e.index not in matches.existing
            and hosted.criteria_key(e.if_none_exist) not in e.keys
            and hosted.conditional_match(
                session, e.rtype, e.if_none_exist, partner_id=plan.partner.id
            )
        ):
            return True
    return False


@dataclass
class _Prepared:
    ids: dict[int, str]  # entry index -> server id
    rows: list[dict[str, Any]]  # new fhir_resources rows
    keys: list[dict[str, str]]  # their resource_identifiers rows, in key order
    new: dict[tuple[str, str], dict[str, Any]]  # (type, id) -> its row in `rows`
    bodies: dict[tuple[str, str], Resource]  # (type, id) -> the body stored for it
    case_id: str | None = None  # the case the new referral Task opens


def _prepare(plan: _Plan, matches: _Matches, options: IntakeOptions) -> _Prepared:
    """Server ids for every entry, references rewritten to them, rows ready to insert (the
    expensive part, done before the write transaction starts). A new referral Task is stored
    as it will be once its case is open: `received` (version 2), owned by us."""
    ids: dict[int, str] = {}
    for e in plan.entries:
        if e.index in matches.existing:
            ids[e.index] = matches.existing[e.index]
        elif e.index in matches.repeats:
            ids[e.index] = ids[matches.repeats[e.index]]
        else:
            ids[e.index] = new_id()
    ref_map: dict[str, str] = {}
    for e in plan.entries:
        for alias in _aliases(e):
            ref_map[alias] = f"{e.rtype}/{ids[e.index]}"
    now = utcnow()
    prepared = _Prepared(ids, [], [], {}, {})
    for e in plan.entries:
        if e.index in matches.existing or e.index in matches.repeats:
            continue
        rid = ids[e.index]
        body = _rewrite_refs(e.resource, ref_map)
        body["id"] = rid
        version = 1
        if e.rtype == "Task":
            prepared.case_id = new_id()
            body, version = _received(body, options.our_org, now), 2
        body["meta"] = {
            **(body.get("meta") or {}),
            "versionId": str(version),
            "lastUpdated": hosted.fhir_instant(now),
        }
        row = {
            "resource_type": e.rtype,
            "id": rid,
            "version_id": version,
            "partner_id": plan.partner.id,
            "case_id": None,
            "last_updated": now,
            "body": json_text(body),  # serialised here, outside the write transaction
        }
        prepared.rows.append(row)
        prepared.new[(e.rtype, rid)] = row
        prepared.bodies[(e.rtype, rid)] = body
        for system_hash, value_hash in e.keys:
            prepared.keys.append(
                {
                    "partner_id": plan.partner.id,
                    "resource_type": e.rtype,
                    "value_hash": value_hash,
                    "system_hash": system_hash,
                    "resource_id": rid,
                }
            )
    # One lock order for every writer (PostgreSQL): no deadlock between overlapping pushes.
    prepared.keys.sort(key=lambda k: (k["resource_type"], k["value_hash"], k["system_hash"]))
    return prepared


def _received(task: Resource, our_org: Resource | None, now: datetime) -> Resource:
    """The new referral Task as intake leaves it (RF-03: requested -> received; a draft is
    taken as requested), owned by us unless it names its owner."""
    focus = str((task.get("focus") or {}).get("reference") or "")
    if not focus.startswith("ServiceRequest/"):
        raise ValidationError(
            "Task.focus must reference a ServiceRequest posted to this server "
            "(in the same transaction or before)",
            expression=["Task.focus"],
        )
    current = "requested" if task.get("status") == "draft" else str(task.get("status"))
    if "received" not in TRANSITIONS.get(current, frozenset()):
        raise ConflictError(
            f"Task cannot move from {current!r} to 'received'", expression=["Task.status"]
        )
    out = {**task, "status": "received", "lastModified": hosted.fhir_instant(now)}
    out.pop("statusReason", None)
    if our_org is not None and not task.get("owner"):
        out["owner"] = our_org
    return out


def _write(
    session: Session,
    plan: _Plan,
    matches: _Matches,
    prepared: _Prepared,
    who: Principal,
    options: IntakeOptions,
    live: Prefetched | None = None,
) -> IntakeResult:
    """The write transaction: the case (when the push opens one), bulk inserts (Core, bodies
    already serialised), the jobs, the audit row last. Kept short, one statement per table
    where it can: on SQLite it holds the database's one write lock, on PostgreSQL the audit
    chain's head row from the audit append to COMMIT."""
    started = time.perf_counter()
    result = IntakeResult(entries=[], case_id=None, new_case=False)
    opened = _open_case(session, plan, prepared, who) if prepared.case_id else None
    hosted.insert_new(session, prepared.rows, prepared.keys)
    # Version and time of entries that were there already (their bodies only for a single POST).
    before = {
        (e.rtype, prepared.ids[e.index])
        for e in plan.entries
        if (e.rtype, prepared.ids[e.index]) not in prepared.new
    }
    # On PostgreSQL the match ran in this transaction and read them already (bundle mode).
    read = matches.versions if plan.bundle_mode else {}
    known = _load(session, before - read.keys(), bodies=not plan.bundle_mode)
    for key in before & read.keys():
        version, updated, case_id = read[key]
        known[key] = EntryOutcome(key[0], key[1], version, updated, False, case_id)
    for e in plan.entries:
        key = (e.rtype, prepared.ids[e.index])
        row = prepared.new.get(key)
        if row is None:
            result.entries.append(known[key])
            continue
        result.entries.append(
            EntryOutcome(
                e.rtype,
                row["id"],
                row["version_id"],
                row["last_updated"],
                e.index not in matches.repeats,
                row["case_id"],
                None if plan.bundle_mode else prepared.bodies[key],
            )
        )
    task_out = next((o for o in result.entries if o.resource_type == "Task"), None)
    if opened is not None:
        _case_opened(session, plan, prepared, opened, who, result, live)
    elif task_out is not None:
        result.case_id = task_out.case_id
    if not plan.bundle_mode and result.case_id is None and result.entries[0].created:
        out = result.entries[0]
        audit.record(
            session,
            "resource.create",
            who.actor,
            patient=_patient_of(out.resource_type, out.id, out.body),
            entity=[f"{out.resource_type}/{out.id}"],
        )
    log.info(
        "referral.intake.stored",
        partner=plan.partner.id,
        entries=len(plan.entries),
        created=len(prepared.rows),
        case_id=result.case_id,
        write_ms=round((time.perf_counter() - started) * 1000),  # before COMMIT
    )
    return result


def _load(
    session: Session, wanted: set[tuple[str, str]], *, bodies: bool
) -> dict[tuple[str, str], EntryOutcome]:
    """Stored entries by (type, id), batched: version, time, case (and body when asked)."""
    by_type: dict[str, list[str]] = {}
    for rtype, rid in wanted:
        by_type.setdefault(rtype, []).append(rid)
    out: dict[tuple[str, str], EntryOutcome] = {}
    for rtype, ids in by_type.items():
        for start in range(0, len(ids), 500):
            if bodies:
                where = (
                    FhirResource.resource_type == rtype,
                    FhirResource.id.in_(ids[start : start + 500]),
                )
                for row in session.scalars(select(FhirResource).where(*where)):
                    out[(rtype, row.id)] = EntryOutcome(
                        rtype,
                        row.id,
                        row.version_id,
                        row.last_updated,
                        False,
                        row.case_id,
                        row.body,
                    )
                continue
            params = {"rtype": rtype, "ids": ids[start : start + 500]}
            for rid, version, updated, case_id in _VERSIONS.rows(session.connection(), params):
                out[(rtype, rid)] = EntryOutcome(rtype, rid, version, updated, False, case_id)
    return out


def _patient_of(rtype: str, rid: str, body: Resource | None) -> str | None:
    """The patient a hosted resource is about (for the audit trail)."""
    if rtype == "Patient":
        return f"Patient/{rid}"
    for key in ("for", "subject", "patient"):
        ref = ((body or {}).get(key) or {}).get("reference")
        if isinstance(ref, str):
            return ref
    return None


def _aliases(e: _Entry) -> Iterator[str]:
    """Ways other entries may refer to this one: its fullUrl, and Type/id for an absolute one."""
    if e.full_url:
        yield e.full_url
        parts = e.full_url.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == e.resource["resourceType"]:
            yield f"{parts[-2]}/{parts[-1]}"
    if e.resource.get("id"):
        yield f"{e.resource['resourceType']}/{e.resource['id']}"


def _rewrite_refs(value: Any, ref_map: dict[str, str]) -> Any:
    """A copy of `value` with references to entries of the push rewritten to server ids
    (objects and arrays copied, leaf values shared)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                out[k] = _rewrite_refs(v, ref_map)
            elif k == "reference" and isinstance(v, str) and v in ref_map:
                out[k] = ref_map[v]
            else:
                out[k] = v
        return out
    if isinstance(value, list):
        return [_rewrite_refs(v, ref_map) if isinstance(v, (dict, list)) else v for v in value]
    return value


def _check_service_request(e: _Entry) -> None:
    sr = e.resource
    if not sr.get("code"):
        raise ValidationError(
            "ServiceRequest.code is required (US Core ServiceRequest)",
            expression=[f"{e.path}.code"],
        )
    if not (sr.get("subject") or {}).get("reference") and not (sr.get("subject") or {}).get(
        "identifier"
    ):
        raise ValidationError(
            "ServiceRequest.subject must reference the patient", expression=[f"{e.path}.subject"]
        )
    subject = sr["subject"]
    if len(subject.get("reference") or _identifier_ref(subject)) > MAX_REFERENCE_CHARS:
        raise ValidationError(
            f"the patient reference is longer than {MAX_REFERENCE_CHARS} characters",
            expression=[f"{e.path}.subject"],
        )


def _check_task(e: _Entry) -> None:
    task = e.resource
    if task.get("intent") != "order":
        raise ValidationError(
            "Task.intent must be 'order' for a referral", expression=[f"{e.path}.intent"]
        )
    if task.get("status") not in ("requested", "draft"):
        raise ValidationError(
            "a new referral Task must have status 'requested' (or 'draft')",
            expression=[f"{e.path}.status"],
        )
    if not (task.get("focus") or {}).get("reference"):
        raise ValidationError(
            "Task.focus must reference the referral ServiceRequest", expression=[f"{e.path}.focus"]
        )
    if not (task.get("for") or {}).get("reference") and not (task.get("for") or {}).get(
        "identifier"
    ):
        raise ValidationError("Task.for must reference the patient", expression=[f"{e.path}.for"])


def _resolve_partner(entries: list[_Entry], who: Principal, partners: PartnersFile) -> Partner:
    """The partner named by Task.requester / ServiceRequest.requester (else the token's)."""
    named: list[tuple[str, str, str]] = []  # (system, value, path)
    for e in entries:
        if e.resource["resourceType"] not in ("Task", "ServiceRequest"):
            continue
        requester = e.resource.get("requester")
        if not requester:
            continue
        ident = _requester_identifier(requester, e, entries)
        if ident is None:
            raise UnknownPartnerError(
                "requester must be an Organization with an identifier (in the reference, "
                "contained, or in the Bundle)",
                expression=[f"{e.path}.requester"],
            )
        named.append((*ident, f"{e.path}.requester"))
    partner: Partner | None = None
    for system, value, path in named:
        found = partners.by_identifier(system, value)
        if found is None:
            raise UnknownPartnerError("requester is not a registered partner", expression=[path])
        if partner is not None and found.id != partner.id:
            raise ValidationError(
                "Task and ServiceRequest name different requesters", expression=[path]
            )
        partner = found
    if partner is None:
        if who.partner_id is None:
            raise UnknownPartnerError(
                "no requester Organization identifies the partner", expression=[entries[0].path]
            )
        partner = partners.by_id(who.partner_id)
        if partner is None:
            raise UnknownPartnerError(f"token partner {who.partner_id} is not registered")
    if who.role == "ehr" and who.partner_id != partner.id:
        raise ForbiddenError("this client may not push referrals for another partner")
    return partner


def _requester_identifier(
    requester: Any, e: _Entry, entries: list[_Entry]
) -> tuple[str, str] | None:
    if not isinstance(requester, dict):
        return None
    ident = requester.get("identifier")
    if isinstance(ident, dict) and ident.get("value"):
        return ident.get("system") or "", str(ident["value"])
    ref = requester.get("reference")
    if not isinstance(ref, str):
        return None
    target: Resource | None = None
    if ref.startswith("#"):
        target = next(
            (
                c
                for c in e.resource.get("contained") or []
                if isinstance(c, dict) and c.get("id") == ref[1:]
            ),
            None,
        )
    else:
        target = next((o.resource for o in entries if ref in set(_aliases(o))), None)
    if not target or target.get("resourceType") != "Organization":
        return None
    for ident in target.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            return ident.get("system") or "", str(ident["value"])
    return None


_CASES = Base.metadata.tables["cases"]
_CASE_KEYS = (
    "id",
    "partner_id",
    "status",
    "task_id",
    "service_request_id",
    "patient_ref",
    "created_at",
    "updated_at",
)
_INSERT_CASE = Prebuilt(insert(_CASES), _CASE_KEYS)


@dataclass
class _Opened:
    """The case a new referral Task opened: its id, the ServiceRequest and the patient."""

    case_id: str
    task_id: str
    sr_id: str
    patient_ref: str
    sr_body: Resource
    stored_links: list[tuple[str, str]]  # stored before this push: claimed if still unclaimed


def _open_case(session: Session, plan: _Plan, prepared: _Prepared, who: Principal) -> _Opened:
    """Insert the Case for the new Task (before its rows: they point at it) and mark the new
    rows of the referral (Task, ServiceRequest, what it points at, the patient) as the case's.
    One case per referral: the database refuses a second case for a ServiceRequest."""
    assert prepared.case_id is not None
    case_id = prepared.case_id
    task_id, task = next((rid, b) for (t, rid), b in prepared.bodies.items() if t == "Task")
    sr_id = task["focus"]["reference"].split("/", 1)[1]
    sr_body = prepared.bodies.get(("ServiceRequest", sr_id))
    if sr_body is None:  # pushed before: it must be this partner's and not yet a referral's
        stored = session.execute(
            select(FhirResource.partner_id, FhirResource.case_id, FhirResource.body).where(
                FhirResource.resource_type == "ServiceRequest", FhirResource.id == sr_id
            )
        ).first()
        if stored is None or stored.partner_id != plan.partner.id:
            raise ValidationError(
                "Task.focus is not a ServiceRequest of this partner", expression=["Task.focus"]
            )
        if stored.case_id is not None:
            raise ConflictError(
                "this ServiceRequest already has a referral Task", expression=["Task.focus"]
            )
        sr_body = stored.body
    subject = sr_body.get("subject") or {}
    patient_ref = subject.get("reference") or _identifier_ref(subject)
    now = utcnow()
    _INSERT_CASE.insert(
        session.connection(),
        [
            {
                "id": case_id,
                "partner_id": plan.partner.id,
                "status": "received",
                "task_id": task_id,
                "service_request_id": sr_id,
                "patient_ref": patient_ref,
                "created_at": now,
                "updated_at": now,
            }
        ],
        later=True,  # PostgreSQL: sent with the next read; a taken key re-runs the push
    )
    # What the referral points at (images, documents, the cancer Condition) belongs to the case.
    targets = [("Task", task_id), ("ServiceRequest", sr_id)]
    for ref in (sr_body.get("supportingInfo") or []) + (sr_body.get("reasonReference") or []):
        link = str((ref or {}).get("reference") or "")
        if link.count("/") == 1:
            rtype, rid = link.split("/")
            targets.append((rtype, rid))
    if patient_ref.startswith("Patient/"):
        targets.append(("Patient", patient_ref.split("/", 1)[1]))
    stored_links: list[tuple[str, str]] = []
    for target in targets:
        row = prepared.new.get(target)
        if row is not None:
            row["case_id"] = row["case_id"] or case_id
        elif target not in stored_links:
            stored_links.append(target)
    return _Opened(case_id, task_id, sr_id, patient_ref, sr_body, stored_links)


def _case_opened(
    session: Session,
    plan: _Plan,
    prepared: _Prepared,
    opened: _Opened,
    who: Principal,
    result: IntakeResult,
    live: Prefetched | None,
) -> None:
    """After the rows are in: claim what was stored before, tell the Task's subscribers
    (RF-03 `received`), queue the pulls, and append the audit row (last: on PostgreSQL it
    holds the chain's head until COMMIT)."""
    partner, case_id = plan.partner, opened.case_id
    for rtype, rid in opened.stored_links:
        where = [
            FhirResource.resource_type == rtype,
            FhirResource.id == rid,
            FhirResource.case_id.is_(None),
        ]
        # The focus was checked above (this partner's, unclaimed; the case's unique key decides
        # a race); the patient is claimed whoever stored it, as before.
        if rtype != "Patient" and (rtype, rid) != ("ServiceRequest", opened.sr_id):
            where.append(FhirResource.partner_id == partner.id)
        session.execute(
            update(FhirResource)
            .where(*where)
            .values(case_id=case_id)
            .execution_options(synchronize_session=False)
        )
    task_row = prepared.new[("Task", opened.task_id)]
    task = FhirResource(  # transient: what the subscriptions and the 360X status read
        resource_type="Task",
        id=opened.task_id,
        version_id=task_row["version_id"],
        partner_id=partner.id,
        case_id=case_id,
        last_updated=task_row["last_updated"],
        body=prepared.bodies[("Task", opened.task_id)],
    )
    queue_v2_status(session, task, "received")
    subscriptions.task_changed(session, task, partner, live)
    kinds = []
    if partner.fhir is not None:
        kinds.append("pull_fhir")
    if partner.dicomweb is not None or partner.dimse is not None or _has_imaging(opened.sr_body):
        kinds.append("pull_imaging")
    result.jobs = jobs.enqueue_for_new_case(session, case_id, kinds)
    audit.record(
        session,
        "referral.intake",
        who.actor,
        case_id=case_id,
        patient=opened.patient_ref,
        entity=[f"Task/{opened.task_id}", f"ServiceRequest/{opened.sr_id}"],
        last=True,  # nothing follows but COMMIT (PostgreSQL: sent with it, one round trip)
    )
    result.case_id, result.new_case = case_id, True
    log.info("referral.intake.done", case_id=case_id, partner=partner.id, jobs=result.jobs)


def _identifier_ref(reference: dict[str, Any]) -> str:
    ident = reference.get("identifier") or {}
    return f"identifier:{ident.get('system', '')}|{ident.get('value', '')}"


def _has_imaging(service_request: Resource) -> bool:
    for info in service_request.get("supportingInfo") or []:
        ref = str((info or {}).get("reference") or "")
        if "ImagingStudy" in ref or (info or {}).get("type") == "ImagingStudy":
            return True
    return False


__all__ = ["IntakeResult", "intake_single", "intake_transaction"]
