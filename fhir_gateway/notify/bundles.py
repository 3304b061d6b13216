"""Notification Bundles and SubscriptionStatus Parameters (R4 Subscriptions Backport IG 1.1.0),
and the SubscriptionTopic for referral Task status changes as a Basic resource (pure: no I/O,
no clock; callers pass times and ids)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from fhir_gateway.resources import Resource

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport"
SUBSCRIPTION_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription"
STATUS_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription-status-r4"
NOTIFICATION_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription-notification-r4"
FILTER_CRITERIA = f"{BACKPORT}/StructureDefinition/backport-filter-criteria"
PAYLOAD_CONTENT = f"{BACKPORT}/StructureDefinition/backport-payload-content"
HEARTBEAT_PERIOD = f"{BACKPORT}/StructureDefinition/backport-heartbeat-period"
TIMEOUT = f"{BACKPORT}/StructureDefinition/backport-timeout"
TOPIC_CANONICAL_EXT = (
    f"{BACKPORT}/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"
)
R5_TOPIC = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic"
TOPIC_ID = "referral-task-status"
_NS = uuid.UUID("8f0c7a8e-2d7b-4c1e-9a55-6f2f4b1d9c01")

NotificationType = Literal[
    "handshake", "heartbeat", "event-notification", "query-status", "query-event"
]
PayloadContent = Literal["empty", "id-only", "full-resource"]


def topic_url(fhir_base: str) -> str:
    """The topic's canonical URL, under our own FHIR base."""
    return f"{fhir_base}/SubscriptionTopic/{TOPIC_ID}"


def topic_resource(fhir_base: str) -> Resource:
    """SubscriptionTopic "referral Task status changed", as the R4 Basic the IG describes
    (R5 SubscriptionTopic elements carried in cross-version extensions)."""
    return {
        "resourceType": "Basic",
        "id": TOPIC_ID,
        "extension": [
            {"url": f"{R5_TOPIC}.url", "valueUri": topic_url(fhir_base)},
            {"url": f"{R5_TOPIC}.version", "valueString": "1.0.0"},
            {"url": f"{R5_TOPIC}.name", "valueString": "ReferralTaskStatus"},
            {"url": f"{R5_TOPIC}.title", "valueString": "Referral Task status changed"},
            {"url": f"{R5_TOPIC}.status", "valueCode": "active"},
            {
                "url": f"{R5_TOPIC}.description",
                "valueMarkdown": "A second-opinion referral Task changed its status "
                "(received, accepted, in-progress, on-hold, completed, rejected, cancelled, "
                "failed).",
            },
            {
                "url": f"{R5_TOPIC}.resourceTrigger",
                "extension": [
                    {"url": "description", "valueMarkdown": "Task.status changed"},
                    {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Task"},
                    {"url": "supportedInteraction", "valueCode": "create"},
                    {"url": "supportedInteraction", "valueCode": "update"},
                    {
                        "url": "fhirPathCriteria",
                        "valueString": "%previous.status != %current.status",
                    },
                ],
            },
            {
                "url": f"{R5_TOPIC}.canFilterBy",
                "extension": [
                    {"url": "description", "valueMarkdown": "The Task's new status"},
                    {"url": "resource", "valueUri": "Task"},
                    {"url": "filterParameter", "valueString": "status"},
                ],
            },
            {
                "url": f"{R5_TOPIC}.canFilterBy",
                "extension": [
                    {"url": "description", "valueMarkdown": "The Task's requester (reference)"},
                    {"url": "resource", "valueUri": "Task"},
                    {"url": "filterParameter", "valueString": "requester"},
                ],
            },
            {
                "url": f"{R5_TOPIC}.canFilterBy",
                "extension": [
                    {"url": "description", "valueMarkdown": "One Task by its id"},
                    {"url": "resource", "valueUri": "Task"},
                    {"url": "filterParameter", "valueString": "_id"},
                ],
            },
            {
                "url": f"{R5_TOPIC}.notificationShape",
                "extension": [{"url": "resource", "valueUri": "Task"}],
            },
        ],
        "code": {
            "coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]
        },
    }


@dataclass(frozen=True)
class Event:
    """One numbered event: its number, when it happened (FHIR instant), the focus URL, and the
    focus resource as it was after the change."""

    number: int
    timestamp: str
    focus_url: str
    resource: Resource


def status_parameters(
    *,
    subscription_url: str,
    topic: str,
    status: str,
    kind: NotificationType,
    events_since_start: int,
    events: list[Event] = (),  # type: ignore[assignment]
    payload: PayloadContent = "id-only",
    error: str | None = None,
) -> Resource:
    """SubscriptionStatus as Parameters (profile backport-subscription-status-r4)."""
    params: list[Resource] = [
        {"name": "subscription", "valueReference": {"reference": subscription_url}},
        {"name": "topic", "valueCanonical": topic},
        {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": kind},
        # R4 has no integer64: the IG carries the counter as a string.
        {"name": "events-since-subscription-start", "valueString": str(events_since_start)},
    ]
    for ev in events:
        parts: list[Resource] = [
            {"name": "event-number", "valueString": str(ev.number)},
            {"name": "timestamp", "valueInstant": ev.timestamp},
        ]
        if payload != "empty":
            parts.append({"name": "focus", "valueReference": {"reference": ev.focus_url}})
        params.append({"name": "notification-event", "part": parts})
    if error:
        params.append(
            {
                "name": "error",
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/subscription-error",
                            "code": "no-response",
                        }
                    ],
                    "text": error,
                },
            }
        )
    return {
        "resourceType": "Parameters",
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": params,
    }


def notification_bundle(
    *,
    subscription_id: str,
    status: Resource,
    events: list[Event],
    payload: PayloadContent,
    timestamp: str,
    key: str,
) -> Resource:
    """A notification Bundle (type `history`): the SubscriptionStatus first, then one entry per
    event's focus (`id-only`: its URL; `full-resource`: the resource too; `empty`: none).
    `key` makes the Bundle id deterministic (e.g. `event-7`), so a receiver can drop repeats."""
    entries: list[Resource] = [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid5(_NS, f'{subscription_id}:{key}:status')}",
            "resource": status,
            "request": {"method": "GET", "url": f"Subscription/{subscription_id}/$status"},
            "response": {"status": "200"},
        }
    ]
    if payload != "empty":
        for ev in events:
            entry: Resource = {
                "fullUrl": ev.focus_url,
                "request": {
                    "method": "PUT",
                    "url": ev.focus_url.rsplit("/", 2)[-2] + "/" + ev.focus_url.rsplit("/", 1)[-1],
                },
                "response": {"status": "200"},
            }
            if payload == "full-resource":
                entry["resource"] = ev.resource
            entries.append(entry)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(_NS, f"{subscription_id}:{key}")),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": timestamp,
        "entry": entries,
    }
