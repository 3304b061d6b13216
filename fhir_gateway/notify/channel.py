"""The jobs that send subscription notifications over the rest-hook channel (handshake,
event notifications, heartbeats) and write Task status changes to partners' own EHRs.

Order and once-only: one sender per subscription at a time holds its send lease (a
compare-and-set on the `subscriptions` row); the holder sends every unsent event in event-number
order, one notification Bundle each, and marks each sent in its own transaction right after the
subscriber's 2xx. A job whose event was sent by another job's drain ends at once. A failure
leaves the event unsent and the job retried with backoff; later events wait behind it. The only
way one event number is sent twice is a worker dying between the subscriber's 2xx and our
commit (the lease then expires and the next sender repeats it): the Bundle id and event number
are the same, so the receiver can drop it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import requests
import structlog
from sqlalchemy import or_, select, update

from connectors.rest_hook import RestHookChannel
from fhir_gateway import jobs
from fhir_gateway.errors import UpstreamError, UpstreamRejectedError, UpstreamUnavailableError
from fhir_gateway.intake import hosted
from fhir_gateway.notify import bundles
from fhir_gateway.notify.subscriptions import HEARTBEAT, TASK_UPDATE, channel_of, task_token
from fhir_gateway.reports import delivery
from fhir_gateway.security import audit
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import (
    FhirResource,
    Job,
    SubscriptionEvent,
    SubscriptionState,
    utcnow,
)

log = structlog.get_logger(__name__)


class SenderBusyError(UpstreamUnavailableError):
    """Another job holds the subscription's send lease (it sends our event too), or the
    handshake has not succeeded yet: try again shortly."""


def _fhir_base(settings: Settings) -> str:
    return f"{settings.base_url}/fhir"


def _post(
    settings: Settings,
    endpoint: str,
    bundle: dict[str, Any],
    headers: dict[str, str],
    timeout_s: float | None,
) -> None:
    timeout = min(timeout_s or settings.notifications.timeout_s, settings.notifications.timeout_s)
    with requests.Session() as session:
        RestHookChannel(session, timeout_s=timeout).post(endpoint, bundle, headers=headers)


def _acquire(store: Store, sub_id: str, owner: str, hold_s: float) -> bool:
    now = utcnow()
    with store.session() as s:
        result = s.execute(
            update(SubscriptionState)
            .where(
                SubscriptionState.id == sub_id,
                SubscriptionState.status != "off",
                or_(
                    SubscriptionState.sender.is_(None),
                    SubscriptionState.sender == owner,
                    SubscriptionState.sender_until < now,
                ),
            )
            .values(sender=owner, sender_until=now + timedelta(seconds=hold_s))
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))


def _release(store: Store, sub_id: str, owner: str) -> None:
    with store.session() as s:
        s.execute(
            update(SubscriptionState)
            .where(SubscriptionState.id == sub_id, SubscriptionState.sender == owner)
            .values(sender=None, sender_until=None)
            .execution_options(synchronize_session=False)
        )


def _hold_s(settings: Settings) -> float:
    return settings.jobs.lease_s + settings.notifications.timeout_s


def _record_error(store: Store, sub_id: str, exc: UpstreamError, *, handshake: bool) -> None:
    with store.session() as s:
        state = s.get(SubscriptionState, sub_id)
        if state is None or state.status == "off":
            return
        state.last_error = (
            f"{type(exc).__name__} (status {exc.status})" if exc.status else (type(exc).__name__)
        )
        if not handshake:
            state.status = "error"
    log.warning(
        "subscription.send.failed",
        subscription_id=sub_id,
        status=exc.status,
        error=type(exc).__name__,
        handshake=handshake,
    )


# ------------------------------------------------------------------------------ handshake


def run_handshake(ctx: jobs.JobContext) -> None:
    """Handshake (IG 1.1.0): a `handshake` notification; a 2xx makes the subscription active,
    schedules its heartbeats and sends any events that waited for it."""
    sub_id = str(ctx.payload["subscription"])
    with ctx.store.session() as s:
        state = s.get(SubscriptionState, sub_id)
        row = s.get(FhirResource, ("Subscription", sub_id))
        if state is None or row is None or state.status != "requested":
            return
        channel = channel_of(row.body)
    if not _acquire(ctx.store, sub_id, ctx.job_id, _hold_s(ctx.settings)):
        raise SenderBusyError("the subscription's sender is busy")
    try:
        base = _fhir_base(ctx.settings)
        params = bundles.status_parameters(
            subscription_url=f"{base}/Subscription/{sub_id}",
            topic=bundles.topic_url(base),
            status="requested",
            kind="handshake",
            events_since_start=0,
        )
        bundle = bundles.notification_bundle(
            subscription_id=sub_id,
            status=params,
            events=[],
            payload=channel.payload,
            timestamp=hosted.fhir_instant(utcnow()),
            key="handshake",
        )
        try:
            _post(ctx.settings, channel.endpoint, bundle, channel.headers, channel.timeout_s)
        except UpstreamError as exc:
            _record_error(ctx.store, sub_id, exc, handshake=True)
            if isinstance(exc, UpstreamRejectedError):
                raise UpstreamUnavailableError(f"handshake refused ({exc.status})") from exc
            raise
        now = utcnow()
        with ctx.store.session() as s:
            state = s.get(SubscriptionState, sub_id)
            if state is None or state.status == "off":
                return
            state.status, state.last_sent_at, state.last_error = "active", now, None
            if channel.heartbeat_s:
                _queue_heartbeat(s, sub_id, 1, now + timedelta(seconds=channel.heartbeat_s))
        log.info("subscription.handshake.done", subscription_id=sub_id)
        _drain(ctx.store, ctx.settings, sub_id, ctx.job_id)
    finally:
        _release(ctx.store, sub_id, ctx.job_id)


def _queue_heartbeat(s: Any, sub_id: str, seq: int, at: datetime) -> None:
    jobs.enqueue(
        s,
        HEARTBEAT,
        payload={"subscription": sub_id, "seq": seq},
        dedup_key=f"heartbeat:{sub_id}:{seq}",
        run_at=at,
        max_attempts=3,
    )


# ------------------------------------------------------------------------------ events


def run_notify(ctx: jobs.JobContext) -> None:
    """Send event `event` of a subscription (and any unsent events before and after it, in
    order). Done at once when another job's drain already sent it."""
    sub_id, number = str(ctx.payload["subscription"]), int(ctx.payload["event"])
    with ctx.store.session() as s:
        ev = s.get(SubscriptionEvent, (sub_id, number))
        state = s.get(SubscriptionState, sub_id)
        if ev is None or ev.sent_at is not None or state is None or state.status == "off":
            return
        if state.status == "requested":
            raise SenderBusyError("the subscription's handshake has not succeeded yet")
    if not _acquire(ctx.store, sub_id, ctx.job_id, _hold_s(ctx.settings)):
        raise SenderBusyError("the subscription's sender is busy")
    try:
        _drain(ctx.store, ctx.settings, sub_id, ctx.job_id)
    finally:
        _release(ctx.store, sub_id, ctx.job_id)


def _drain(store: Store, settings: Settings, sub_id: str, owner: str) -> int:
    """Send unsent events in order while holding the send lease; returns how many were sent."""
    base = _fhir_base(settings)
    sent = 0
    while True:
        with store.session() as s:
            state = s.get(SubscriptionState, sub_id)
            row = s.get(FhirResource, ("Subscription", sub_id))
            if state is None or row is None or state.status in ("off", "requested"):
                return sent
            if state.sender != owner:
                return sent  # our lease expired and another sender took over
            ev = s.scalar(
                select(SubscriptionEvent)
                .where(
                    SubscriptionEvent.subscription_id == sub_id,
                    SubscriptionEvent.sent_at.is_(None),
                )
                .order_by(SubscriptionEvent.event_number)
                .limit(1)
            )
            if ev is None:
                return sent
            channel = channel_of(row.body)
            event = bundles.Event(
                number=ev.event_number,
                timestamp=hosted.fhir_instant(ev.occurred_at),
                focus_url=f"{base}/{ev.focus}",
                resource=ev.resource,
            )
            params = bundles.status_parameters(
                subscription_url=f"{base}/Subscription/{sub_id}",
                topic=bundles.topic_url(base),
                status="active",
                kind="event-notification",
                events_since_start=ev.event_number,
                events=[event],
                payload=channel.payload,
            )
            bundle = bundles.notification_bundle(
                subscription_id=sub_id,
                status=params,
                events=[event],
                payload=channel.payload,
                timestamp=hosted.fhir_instant(utcnow()),
                key=f"event-{ev.event_number}",
            )
            number, focus = ev.event_number, ev.focus
        try:
            _post(settings, channel.endpoint, bundle, channel.headers, channel.timeout_s)
        except UpstreamError as exc:
            _record_error(store, sub_id, exc, handshake=False)
            if isinstance(exc, UpstreamRejectedError):
                # The subscriber refused it: keep the order, retry later (it may be fixed).
                raise UpstreamUnavailableError(
                    f"subscriber refused event {number} ({exc.status})"
                ) from exc
            raise
        now = utcnow()
        with store.session() as s:
            s.execute(
                update(SubscriptionEvent)
                .where(
                    SubscriptionEvent.subscription_id == sub_id,
                    SubscriptionEvent.event_number == number,
                    SubscriptionEvent.sent_at.is_(None),
                )
                .values(sent_at=now)
                .execution_options(synchronize_session=False)
            )
            s.execute(
                update(SubscriptionState)
                .where(SubscriptionState.id == sub_id, SubscriptionState.status != "off")
                .values(
                    last_sent_at=now,
                    status="active",
                    last_error=None,
                    sender_until=now + timedelta(seconds=_hold_s(settings)),
                )
                .execution_options(synchronize_session=False)
            )
            audit.record(  # a disclosure of the referral's progress to the partner's EHR
                s,
                "subscription.notify",
                audit.Actor(sub="fhir-gateway", role="system"),
                entity=[f"Subscription/{sub_id}", focus],
            )
        sent += 1
        log.info("subscription.event.sent", subscription_id=sub_id, event_number=number)


# ------------------------------------------------------------------------------ heartbeat


def run_heartbeat(ctx: jobs.JobContext) -> None:
    """Heartbeat (IG 1.1.0): when nothing was sent for `heartbeatPeriod`, a `heartbeat`
    notification; then the next heartbeat is queued."""
    sub_id, seq = str(ctx.payload["subscription"]), int(ctx.payload["seq"])
    with ctx.store.session() as s:
        state = s.get(SubscriptionState, sub_id)
        row = s.get(FhirResource, ("Subscription", sub_id))
        if state is None or row is None or state.status == "off":
            return
        channel = channel_of(row.body)
        if not channel.heartbeat_s:
            return
        period = timedelta(seconds=channel.heartbeat_s)
        due = (state.last_sent_at or state.created_at) + period
        events = state.events_since_start
        status = state.status
    now = utcnow()
    if now + timedelta(milliseconds=50) < due:
        with ctx.store.session() as s:
            _queue_heartbeat(s, sub_id, seq + 1, due)  # traffic was sent meanwhile
        return
    if status == "active" and _acquire(ctx.store, sub_id, ctx.job_id, _hold_s(ctx.settings)):
        try:
            base = _fhir_base(ctx.settings)
            params = bundles.status_parameters(
                subscription_url=f"{base}/Subscription/{sub_id}",
                topic=bundles.topic_url(base),
                status=status,
                kind="heartbeat",
                events_since_start=events,
            )
            bundle = bundles.notification_bundle(
                subscription_id=sub_id,
                status=params,
                events=[],
                payload=channel.payload,
                timestamp=hosted.fhir_instant(now),
                key=f"heartbeat-{seq}",
            )
            try:
                _post(ctx.settings, channel.endpoint, bundle, channel.headers, channel.timeout_s)
                with ctx.store.session() as s:
                    state = s.get(SubscriptionState, sub_id)
                    if state is not None:
                        state.last_sent_at = utcnow()
            except UpstreamError as exc:
                _record_error(ctx.store, sub_id, exc, handshake=False)
        finally:
            _release(ctx.store, sub_id, ctx.job_id)
    with ctx.store.session() as s:
        _queue_heartbeat(s, sub_id, seq + 1, utcnow() + period)


# ------------------------------------------------------------------------------ Task writes


def run_task_update(ctx: jobs.JobContext) -> None:
    """Partner setting `task_updates = "write"`: put this change's status onto the partner's
    EHR's copy of the referral Task (found by its identifier), once per change and in order:
    a change waits while an earlier change of the same Task is still to be written."""
    partner = ctx.settings.partners.by_id(str(ctx.payload["partner"]))
    if partner is None or partner.destination is None or partner.task_updates != "write":
        return
    task_id, version = str(ctx.payload["task"]), int(ctx.payload["version"])
    status = str(ctx.payload["status"])
    with ctx.store.session() as s:
        earlier = s.scalars(
            select(Job.dedup_key).where(
                Job.kind == TASK_UPDATE,
                Job.dedup_key.like(f"task-update:{task_id}:%"),
                Job.state.in_((jobs.QUEUED, jobs.RUNNING)),
                Job.id != ctx.job_id,
            )
        ).all()
        if any(int(str(k).rsplit(":", 1)[-1]) < version for k in earlier):
            raise SenderBusyError("an earlier change of this Task is still to be written")
        row = s.get(FhirResource, ("Task", task_id))
        if row is None:
            return
        token = task_token(row.body)
        reason = None
        if row.version_id == version:  # the reason is the Task's, when this is still it
            reason = (row.body.get("statusReason") or {}).get("text")
    if token is None:
        raise UpstreamRejectedError("the referral Task has no identifier to find it by")
    sink = delivery.http_sink(partner.destination, ctx.settings)
    sink.set_task_status(token, status, reason)
    log.info("task.update.written", task_id=task_id, version=version, status=status)
