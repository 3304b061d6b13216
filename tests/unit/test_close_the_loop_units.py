"""Pure parts of closing the loop: notification Bundles and SubscriptionStatus (R4 Backport IG
1.1.0), filters, the partners file's recipients and task_updates, the report's addenda and the
reply Communication."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from fhir_gateway.errors import ValidationError
from fhir_gateway.notify import bundles
from fhir_gateway.notify.subscriptions import matches, validate_subscription
from fhir_gateway.settings import NotificationSettings, Settings, SmartAuth
from mappers.report import conclusion_text, parse_draft, reply_communication
from tests.notify_helpers import subscription
from tests.report_helpers import draft_data

BASE = "https://gw.example/fhir"
TOPIC = bundles.topic_url(BASE)


def _event(n: int) -> bundles.Event:
    return bundles.Event(n, "2026-01-01T00:00:00Z", f"{BASE}/Task/t-1", {"resourceType": "Task"})


@pytest.mark.parametrize("payload", ["empty", "id-only", "full-resource"])
def test_notification_bundle_shapes(payload) -> None:
    params = bundles.status_parameters(
        subscription_url=f"{BASE}/Subscription/s-1",
        topic=TOPIC,
        status="active",
        kind="event-notification",
        events_since_start=7,
        events=[_event(7)],
        payload=payload,
    )
    bundle = bundles.notification_bundle(
        subscription_id="s-1",
        status=params,
        events=[_event(7)],
        payload=payload,
        timestamp="2026-01-01T00:00:01Z",
        key="event-7",
    )
    assert bundle["type"] == "history"
    assert bundle["entry"][0]["resource"]["meta"]["profile"] == [bundles.STATUS_PROFILE]
    names = [p["name"] for p in params["parameter"]]
    assert names[:5] == [
        "subscription",
        "topic",
        "status",
        "type",
        "events-since-subscription-start",
    ]
    event = params["parameter"][5]["part"]
    assert event[0] == {"name": "event-number", "valueString": "7"}
    assert ("focus" in [p["name"] for p in event]) is (payload != "empty")
    focus_entries = bundle["entry"][1:]
    assert len(focus_entries) == (0 if payload == "empty" else 1)
    if focus_entries:
        assert focus_entries[0]["request"]["url"] == "Task/t-1"
        assert ("resource" in focus_entries[0]) is (payload == "full-resource")
    again = bundles.notification_bundle(
        subscription_id="s-1",
        status=params,
        events=[_event(7)],
        payload=payload,
        timestamp="x",
        key="event-7",
    )
    assert again["id"] == bundle["id"]  # a repeat carries the same id


def test_filters() -> None:
    task = {"id": "t-1", "status": "accepted", "requester": {"reference": "Organization/o-1"}}
    assert matches({}, task)
    assert matches({"status": ["accepted", "completed"]}, task)
    assert not matches({"status": ["completed"]}, task)
    assert matches({"requester": ["Organization/o-1"], "_id": ["t-1"]}, task)
    assert not matches({"requester": ["Organization/o-2"]}, task)


def test_subscription_validation_rules() -> None:
    cfg = NotificationSettings(min_heartbeat_s=60)
    body = subscription("https://ehr.example/hook", heartbeat=3600, content="full-resource")
    body["criteria"] = TOPIC
    out, channel, _ = validate_subscription(body, TOPIC, cfg)
    assert (channel.payload, channel.heartbeat_s) == ("full-resource", 3600)
    assert out["status"] == "requested"
    short = subscription("https://ehr.example/hook", heartbeat=5) | {"criteria": TOPIC}
    with pytest.raises(ValidationError) as err:
        validate_subscription(short, TOPIC, cfg)
    assert err.value.expression == ["Subscription.channel.extension[backport-heartbeat-period]"]
    bad_header = subscription("https://ehr.example/hook") | {"criteria": TOPIC}
    bad_header["channel"]["header"] = ["no colon here"]
    with pytest.raises(ValidationError):
        validate_subscription(bad_header, TOPIC, cfg)


def _partners(tmp_path: Path, extra: str) -> Settings:
    path = tmp_path / "partners.toml"
    path.write_text(
        '[[partners]]\nid = "p1"\nname = "P1"\n'
        'identifier = { system = "urn:x", value = "p1" }\n' + extra
    )
    return Settings(data_dir=tmp_path, partners_file=path)


def test_partner_settings(tmp_path) -> None:
    settings = _partners(
        tmp_path,
        'task_updates = "write"\n[partners.destination]\nbase_url = "https://ehr/fhir"\n'
        '[[partners.recipients]]\nname = "lab"\nbase_url = "https://lab/fhir"\n'
        'auth = { type = "smart", client_id = "c", key_file = "keys/k.pem", kid = "k" }\n',
    )
    partner = settings.partners.by_id("p1")
    assert partner is not None
    lab = partner.recipient("lab")
    assert lab is not None
    assert lab.base_url == "https://lab/fhir"
    assert isinstance(lab.auth, SmartAuth)
    assert lab.auth.key_file == tmp_path / "keys" / "k.pem"  # resolved
    assert partner.recipient("destination") is partner.destination
    for bad in (
        'task_updates = "write"\n',  # no destination
        '[[partners.recipients]]\nname = "a"\nbase_url = "x"\n'
        '[[partners.recipients]]\nname = "a"\nbase_url = "y"\n',
        '[[partners.recipients]]\nname = "destination"\nbase_url = "x"\n',
    ):
        with pytest.raises(Exception, match="partners"):
            _ = _partners(tmp_path, bad).partners


def test_addendum_in_the_conclusion_and_the_reply() -> None:
    draft = parse_draft(
        draft_data(addenda=[{"date": "2026-03-05", "question": "HER2?", "answer": "IHC 1+."}])
    )
    text = conclusion_text(draft)
    assert text.startswith(draft.conclusion)
    assert "Addendum 1 (2026-03-05)" in text
    assert text.endswith("Answer: IHC 1+.")
    question = {
        "resourceType": "Communication",
        "identifier": [{"system": "urn:q", "value": "Q-1"}],
        "basedOn": [{"reference": "ServiceRequest/sr-1"}],
        "sender": {"reference": "Practitioner/p-1"},
    }
    reply = reply_communication(
        question,
        question_url=f"{BASE}/Communication/c-1",
        answer="IHC 1+.",
        report_reference="DiagnosticReport/dr-9",
        identifier=("urn:fhir-gateway:report:question-reply", "r-1"),
        organization_name="Second Opinion",
        organization_identifier=("urn:x", "so"),
        sent=datetime(2026, 3, 5, tzinfo=UTC),
    )
    assert reply["inResponseTo"] == [
        {
            "reference": f"{BASE}/Communication/c-1",
            "identifier": {"system": "urn:q", "value": "Q-1"},
        }
    ]
    assert reply["recipient"] == [{"reference": "Practitioner/p-1"}]
    assert reply["basedOn"] == question["basedOn"]
    assert reply["about"] == [{"reference": "DiagnosticReport/dr-9"}]
