"""Subscriptions of partners' EHRs to their referrals' Task status changes (R4 Subscriptions
Backport IG 1.1.0, topic-based): create / read / delete, `$status`, and the numbered events that
a Task change queues in its own transaction (transactional outbox; sent by `notify.channel`).

A Subscription belongs to the partner whose token created it and sees only that partner's
Tasks, whatever its filter says; `Task?status=`, `Task?requester=` and `Task?_id=` narrow it.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog
from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.errors import ForbiddenError, NotFoundError, ValidationError
from fhir_gateway.intake import hosted
from fhir_gateway.notify import bundles
from fhir_gateway.resources import Resource, identifiers_of
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import NotificationSettings, Partner
from fhir_gateway.store.models import (
    FhirResource,
    SubscriptionEvent,
    SubscriptionState,
    utcnow,
)
from fhir_gateway.store.prebuilt import Prebuilt, Prefetched

log = structlog.get_logger(__name__)

HANDSHAKE = "subscription_handshake"
NOTIFY = "subscription_notify"
HEARTBEAT = "subscription_heartbeat"
TASK_UPDATE = "task_update_write"
LIVE = ("requested", "active", "error")  # statuses that still collect events
FILTER_PARAMS = frozenset({"status", "requester", "_id"})
MAX_HEADERS, MAX_HEADER_LEN = 10, 4096
FHIR_JSON = "application/fhir+json"
_FOREVER = 1_000_000  # notifications retry until delivered or the subscription is deleted


@dataclass(frozen=True)
class Channel:
    """A validated rest-hook channel: where, how, and what goes in the payload."""

    endpoint: str
    headers: dict[str, str]
    payload: bundles.PayloadContent
    heartbeat_s: int | None
    timeout_s: float | None


def _ext(element: Any, url: str) -> Any:
    for e in (element or {}).get("extension") or [] if isinstance(element, dict) else []:
        if isinstance(e, dict) and e.get("url") == url:
            return e
    return None


def _bad(msg: str, path: str) -> ValidationError:
    return ValidationError(msg, expression=[path])


def validate_subscription(
    body: Any, topic: str, cfg: NotificationSettings
) -> tuple[Resource, Channel, dict[str, list[str]]]:
    """Check a Subscription against what we support; returns it (status `requested`), its
    channel and its filters. Messages name the rule and the element, never the value.

    Raises:
        ValidationError (422 / 400): what is wrong and where.
    """
    if not isinstance(body, dict) or body.get("resourceType") != "Subscription":
        raise ValidationError(
            "body must be a Subscription resource", expression=["Subscription"], status_code=400
        )
    if body.get("status", "requested") != "requested":
        raise _bad("a new Subscription must have status 'requested'", "Subscription.status")
    if body.get("criteria") != topic:
        raise _bad(
            "Subscription.criteria must be the canonical URL of our topic "
            "(see CapabilityStatement: Subscription)",
            "Subscription.criteria",
        )
    filters: dict[str, list[str]] = {}
    crit = _ext(body.get("_criteria"), bundles.FILTER_CRITERIA)
    if crit is not None:
        text = crit.get("valueString")
        if not isinstance(text, str) or not text.startswith("Task?"):
            raise _bad(
                "filter criteria must be a string 'Task?param=value'",
                "Subscription._criteria.extension[backport-filter-criteria]",
            )
        for key, value in parse_qsl(text[len("Task?") :], keep_blank_values=True):
            if key not in FILTER_PARAMS:
                raise _bad(
                    "filter criteria may use only status, requester and _id",
                    "Subscription._criteria.extension[backport-filter-criteria]",
                )
            if not value:
                raise _bad(
                    "a filter parameter needs a value",
                    "Subscription._criteria.extension[backport-filter-criteria]",
                )
            filters.setdefault(key, []).extend(v for v in value.split(",") if v)
    ch = body.get("channel")
    if not isinstance(ch, dict):
        raise _bad("Subscription.channel is required", "Subscription.channel")
    if ch.get("type") != "rest-hook":
        raise _bad("only the rest-hook channel is supported", "Subscription.channel.type")
    endpoint = ch.get("endpoint")
    if not isinstance(endpoint, str) or not _endpoint_ok(endpoint):
        raise _bad(
            "channel.endpoint must be an https URL (http only on loopback)",
            "Subscription.channel.endpoint",
        )
    if ch.get("payload", "application/fhir+json") not in (
        "application/fhir+json",
        "application/json",
    ):
        raise _bad("channel.payload must be application/fhir+json", "Subscription.channel.payload")
    content = _ext(ch.get("_payload"), bundles.PAYLOAD_CONTENT)
    payload = (content or {}).get("valueCode", "id-only")
    if payload not in ("empty", "id-only", "full-resource"):
        raise _bad(
            "payload-content must be empty, id-only or full-resource",
            "Subscription.channel._payload.extension[backport-payload-content]",
        )
    heartbeat = _uint(ch, bundles.HEARTBEAT_PERIOD, "backport-heartbeat-period")
    if heartbeat is not None and heartbeat < cfg.min_heartbeat_s:
        raise _bad(
            f"heartbeat period must be at least {cfg.min_heartbeat_s} s",
            "Subscription.channel.extension[backport-heartbeat-period]",
        )
    timeout = _uint(ch, bundles.TIMEOUT, "backport-timeout")
    headers: dict[str, str] = {}
    raw_headers = ch.get("header") or []
    if not isinstance(raw_headers, list) or len(raw_headers) > MAX_HEADERS:
        raise _bad(f"channel.header: at most {MAX_HEADERS} strings", "Subscription.channel.header")
    for i, h in enumerate(raw_headers):
        name, sep, value = h.partition(":") if isinstance(h, str) else ("", "", "")
        if not sep or not name.strip() or len(h) > MAX_HEADER_LEN or "\n" in h or "\r" in h:
            raise _bad(
                "each channel.header must be one 'Name: value' line",
                f"Subscription.channel.header[{i}]",
            )
        headers[name.strip()] = value.strip()
    out = copy.deepcopy(body)
    out["status"] = "requested"
    out["meta"] = {"profile": [bundles.SUBSCRIPTION_PROFILE]}
    channel = Channel(endpoint, headers, payload, heartbeat, float(timeout) if timeout else None)
    return out, channel, filters


def _uint(channel: Resource, url: str, name: str) -> int | None:
    ext = _ext(channel, url)
    if ext is None:
        return None
    value = ext.get("valueUnsignedInt", ext.get("valuePositiveInt"))
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(f"{name} must be an unsignedInt", f"Subscription.channel.extension[{name}]")
    return value


def _endpoint_ok(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def channel_of(body: Resource) -> Channel:
    """The channel of a stored (already validated) Subscription."""
    ch = body["channel"]
    headers = {}
    for h in ch.get("header") or []:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    content = _ext(ch.get("_payload"), bundles.PAYLOAD_CONTENT)
    hb = _ext(ch, bundles.HEARTBEAT_PERIOD)
    to = _ext(ch, bundles.TIMEOUT)
    return Channel(
        ch["endpoint"],
        headers,
        (content or {}).get("valueCode", "id-only"),
        hb.get("valueUnsignedInt") if hb else None,
        float(to["valueUnsignedInt"]) if to and to.get("valueUnsignedInt") else None,
    )


def filters_of(body: Resource) -> dict[str, list[str]]:
    crit = _ext(body.get("_criteria"), bundles.FILTER_CRITERIA)
    out: dict[str, list[str]] = {}
    if crit is None:
        return out
    for key, value in parse_qsl(str(crit.get("valueString", ""))[len("Task?") :]):
        out.setdefault(key, []).extend(v for v in value.split(",") if v)
    return out


# ------------------------------------------------------------------------------ service


def create(
    session: Session,
    body: Any,
    who: Principal,
    *,
    fhir_base: str,
    cfg: NotificationSettings,
) -> FhirResource:
    """POST /fhir/Subscription by a partner's EHR: stored `requested`, handshake queued.

    Raises:
        ForbiddenError: not a partner's token. ValidationError: see `validate_subscription`.
    """
    if who.role != "ehr" or not who.partner_id:
        raise ForbiddenError("only a partner's EHR may subscribe (its own referrals)")
    resource, _channel, _filters = validate_subscription(body, bundles.topic_url(fhir_base), cfg)
    count = session.scalar(
        select(func.count())
        .select_from(SubscriptionState)
        .where(
            SubscriptionState.partner_id == who.partner_id,
            SubscriptionState.status.in_(LIVE),
        )
    )
    if (count or 0) >= cfg.max_subscriptions_per_partner:
        raise ValidationError(
            f"at most {cfg.max_subscriptions_per_partner} subscriptions per partner",
            expression=["Subscription"],
        )
    row = hosted.create(session, resource, partner_id=who.partner_id)
    session.add(SubscriptionState(id=row.id, partner_id=who.partner_id, status="requested"))
    session.flush()
    jobs.enqueue(
        session,
        HANDSHAKE,
        payload={"subscription": row.id},
        dedup_key=f"handshake:{row.id}",
        max_attempts=_FOREVER,
    )
    audit.record(session, "subscription.create", who.actor, entity=[f"Subscription/{row.id}"])
    log.info("subscription.created", subscription_id=row.id, partner_id=who.partner_id)
    return row


def _own(session: Session, rid: str, who: Principal) -> tuple[FhirResource, SubscriptionState]:
    row = session.get(FhirResource, ("Subscription", rid))
    state = session.get(SubscriptionState, rid)
    if row is None or state is None or state.status == "off":
        raise NotFoundError(f"Subscription/{rid} is not known")
    if who.role != "admin" and not (who.role == "ehr" and who.partner_id == state.partner_id):
        raise ForbiddenError(f"Subscription/{rid} is not yours")
    return row, state


def read(session: Session, rid: str, who: Principal) -> Resource:
    """GET /fhir/Subscription/{id}: the resource with its current status (and error)."""
    row, state = _own(session, rid, who)
    body: Resource = copy.deepcopy(row.body)
    body["status"] = state.status
    if state.last_error and state.status == "error":
        body["error"] = f"last notification failed: {state.last_error}"
    audit.record(session, "subscription.read", who.actor, entity=[f"Subscription/{rid}"])
    return body


def delete(session: Session, rid: str, who: Principal) -> None:
    """DELETE /fhir/Subscription/{id}: no more events; queued ones are not sent."""
    row, state = _own(session, rid, who)
    state.status = "off"
    session.delete(row)
    audit.record(session, "subscription.delete", who.actor, entity=[f"Subscription/{rid}"])
    log.info("subscription.deleted", subscription_id=rid)


def status(session: Session, rid: str, who: Principal, *, fhir_base: str) -> Resource:
    """GET /fhir/Subscription/{id}/$status: a Bundle (searchset) holding the SubscriptionStatus
    (type `query-status`, eventsSinceSubscriptionStart)."""
    _row, state = _own(session, rid, who)
    params = bundles.status_parameters(
        subscription_url=f"{fhir_base}/Subscription/{rid}",
        topic=bundles.topic_url(fhir_base),
        status=state.status,
        kind="query-status",
        events_since_start=state.events_since_start,
        error=state.last_error if state.status == "error" else None,
    )
    audit.record(session, "subscription.status", who.actor, entity=[f"Subscription/{rid}"])
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 1,
        "entry": [{"resource": params, "search": {"mode": "match"}}],
    }


# ------------------------------------------------------------------------------ events


_STATES = SubscriptionState.__table__
_LIVE_SUBSCRIPTIONS = Prebuilt(  # run on the DBAPI cursor (`store.prebuilt`)
    select(_STATES.c.id)
    # OR of equalities, not IN (...): an IN list is re-rendered into the SQL at every execution
    .where(
        _STATES.c.partner_id == bindparam("partner"), or_(*(_STATES.c.status == s for s in LIVE))
    )
    .order_by(_STATES.c.id)
)


def prefetch_live(session: Session, partner_id: str) -> Prefetched:
    """The partner's live subscriptions, for a `task_changed` later in this transaction: on
    PostgreSQL the lookup goes out with the transaction's next round trip instead of one of
    its own (intake reads them with its identifier match)."""
    return _LIVE_SUBSCRIPTIONS.prefetch(session.connection(), {"partner": partner_id})


def task_changed(
    session: Session,
    task_row: FhirResource,
    partner: Partner | None = None,
    live: Prefetched | None = None,
) -> int:
    """A referral Task changed status: queue one numbered event per matching live subscription
    of the Task's partner, and (partner setting `task_updates = "write"`) a write of the change
    to the partner's EHR, in the caller's transaction. Returns the events queued. `live`: the
    Task's partner's live subscriptions, read earlier in this transaction (`prefetch_live`).

    Jobs carry no case id: a cancellation closes the case's jobs, and this is the news of it.
    """
    partner_id = task_row.partner_id
    if partner_id is None:
        return 0
    if partner is not None and partner.id == partner_id and partner.task_updates == "write":
        jobs.enqueue(
            session,
            TASK_UPDATE,
            payload={
                "partner": partner_id,
                "task": task_row.id,
                "version": task_row.version_id,
                "status": task_row.body.get("status"),
            },
            dedup_key=f"task-update:{task_row.id}:{task_row.version_id}",
            max_attempts=_FOREVER,
        )
    # Core, built once: one indexed query per change (most partners have no subscription).
    found = (
        live.rows()
        if live is not None
        else _LIVE_SUBSCRIPTIONS.rows(session.connection(), {"partner": partner_id})
    )
    queued = 0
    for (state_id,) in found:
        sub = session.get(FhirResource, ("Subscription", state_id))
        if sub is None or not matches(filters_of(sub.body), task_row.body):
            continue
        # Atomic increment: concurrent changes get distinct, gap-free numbers (PostgreSQL
        # row lock; SQLite writers are serialised).
        session.execute(
            update(SubscriptionState)
            .where(SubscriptionState.id == state_id)
            .values(events_since_start=SubscriptionState.events_since_start + 1)
            .execution_options(synchronize_session=False)
        )
        number = int(
            session.scalar(
                select(SubscriptionState.events_since_start).where(SubscriptionState.id == state_id)
            )
            or 0
        )
        session.add(
            SubscriptionEvent(
                subscription_id=state_id,
                event_number=number,
                focus=f"Task/{task_row.id}",
                resource=copy.deepcopy(task_row.body),
                occurred_at=utcnow(),
            )
        )
        session.flush()
        jobs.enqueue(
            session,
            NOTIFY,
            payload={"subscription": state_id, "event": number},
            dedup_key=f"notify:{state_id}:{number}",
            max_attempts=_FOREVER,
        )
        queued += 1
    if queued:
        log.info("subscription.events.queued", task_id=task_row.id, events=queued)
    return queued


def matches(filters: dict[str, list[str]], task: Resource) -> bool:
    """Does a Task satisfy the subscription's filters (AND across parameters, OR in one)?"""
    for key, values in filters.items():
        if key == "status" and task.get("status") not in values:
            return False
        if key == "_id" and task.get("id") not in values:
            return False
        if key == "requester":
            req = task.get("requester") or {}
            ref = req.get("reference") or ""
            ident = req.get("identifier") or {}
            tokens = {
                ref,
                ref.rsplit("/", 2)[-2] + "/" + ref.rsplit("/", 1)[-1] if "/" in ref else ref,
            }
            if ident:
                tokens.add(f"{ident.get('system', '')}|{ident.get('value', '')}")
                tokens.add(str(ident.get("value", "")))
            if not tokens & set(values):
                return False
    return True


def task_token(task: Resource) -> str | None:
    ident = next(iter(identifiers_of(task)), None)
    return f"{ident[0]}|{ident[1]}" if ident else None
