"""HL7 v2 over MLLP into the service (docs/hl7v2.md), with a real MLLP client
(connectors.mllp.MllpClient) and the service's store on SQLite and PostgreSQL:

- a burst of 1,000 ORU^R01 messages: all AA, each stored once with its route job; resends of
  the same control ids (also from two connections at once) are AA again and stored once;
- refusals: unsupported type (AR 200), unsupported version (AR 203), unparseable (AR);
- the `fhir-gateway mllp` process SIGKILLed mid-burst loses no acknowledged message;
- a matching ORU -> in the case bundle; an unmatched one -> held -> assigned -> in the bundle
  (and discarded, via the CLI and the admin API);
- 360X: an OMG^O19 -> a case with a received Task; each Task change -> an OSU^O51 with the
  order status of the profile's table, received by a loopback MLLP listener.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from connectors.mllp import AckDecision, MllpClient, MllpListenerThread, parse_header
from fhir_gateway import job_handlers, jobs
from fhir_gateway.casebundle import held
from fhir_gateway.cli import app as cli_app
from fhir_gateway.errors import ConflictError, UpstreamUnavailableError
from fhir_gateway.intake import v2inbox
from fhir_gateway.intake.referrals import intake_transaction
from fhir_gateway.intake.tasks import transition_task
from fhir_gateway.security.access import Principal
from fhir_gateway.security.audit import Actor
from fhir_gateway.settings import JobSettings, Settings
from fhir_gateway.store import Store, open_store
from fhir_gateway.store.models import (
    AuditRow,
    Case,
    FhirResource,
    HeldItem,
    Job,
    NormalisedResource,
    StoredResource,
    V2Message,
)
from tests.conftest import FIXTURES, _fresh_pg_database

X360 = FIXTURES / "hl7v2" / "360x"
MRN_SYSTEM = "http://north.example/mrn"
ACCESSION_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.77"
PARTNERS = """
[organization]
name = "Second-Opinion Service"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "second-opinion" }}

[[partners]]
id = "north"
name = "North Hospital"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "north" }}
v2_facilities = ["NORTH HOSP"]
v2_authorities = {{ NH = "{mrn}" }}
v2_destination = "127.0.0.1:{port}"
"""


def oru(n: int, *, mrn: str = "", order: str = "", control: str = "") -> bytes:
    return (
        "MSH|^~\\&|LABSYS|NORTH HOSP|GATEWAY|SO|20260301120000||ORU^R01^ORU_R01|"
        f"{control or f'MSG{n:06d}'}|P|2.5.1\r"
        f"PID|1||{mrn or 100000 + n}^^^NH^MR||Doe^Jane||19600101|F\r"
        f"OBR|1|{order or f'PL{n}'}|{order or f'ACC{n}'}|11526-1^Pathology study^LN"
        "|||20260301||||||||||||||20260302120000|||F\r"
        f"OBX|1|TX|22637-3^Final diagnosis^LN||Synthetic diagnosis {n}||||||F\r"
    ).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def v2store(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Store]:
    keys = settings.data_dir / "keys"
    if request.param == "sqlite":
        s = open_store(settings.db_url, key_dir=keys)
    else:
        s = _fresh_pg_database(request.getfixturevalue("pg_url"), request.node.name, keys)
    yield s
    s.dispose()


@pytest.fixture
def v2settings(settings: Settings) -> Settings:
    (settings.data_dir / "partners.toml").write_text(
        PARTNERS.format(mrn=MRN_SYSTEM, port=free_port())
    )
    return settings


def with_destination(settings: Settings, port: int) -> Settings:
    """The settings with the partner's `v2_destination` on `port` (partners file re-read)."""
    (settings.data_dir / "partners.toml").write_text(PARTNERS.format(mrn=MRN_SYSTEM, port=port))
    return settings.model_copy()


def run_jobs(store: Store, settings: Settings, limit: int = 50) -> list[str]:
    job_handlers.register_all()
    worker = jobs.Worker(store, settings)
    ran = 0
    while ran < limit and worker.run_once():
        ran += 1
    with store.session() as s:
        return [f"{j.kind}:{j.state}" for j in s.scalars(select(Job).order_by(Job.created_at))]


def open_referral(store: Store, settings: Settings, mrn: str, accession: str) -> str:
    """A FHIR referral (Patient with an MRN, ServiceRequest with an accession number)."""
    org = {"identifier": {"system": "urn:oid:2.16.840.1.113883.3.9999", "value": "north"}}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:p",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
                    "name": [{"family": "Doe", "given": ["Jane"]}],
                    "birthDate": "1960-01-01",
                    "gender": "female",
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:sr",
                "resource": {
                    "resourceType": "ServiceRequest",
                    "identifier": [{"system": ACCESSION_SYSTEM, "value": accession}],
                    "status": "active",
                    "intent": "order",
                    "code": {"text": "second opinion"},
                    "subject": {"reference": "urn:uuid:p"},
                    "requester": org,
                },
                "request": {"method": "POST", "url": "ServiceRequest"},
            },
            {
                "fullUrl": "urn:uuid:t",
                "resource": {
                    "resourceType": "Task",
                    "status": "requested",
                    "intent": "order",
                    "focus": {"reference": "urn:uuid:sr"},
                    "for": {"reference": "urn:uuid:p"},
                    "requester": org,
                },
                "request": {"method": "POST", "url": "Task"},
            },
        ],
    }
    who = Principal(sub="north-ehr", role="ehr", partner_id="north")
    result = intake_transaction(store, bundle, who, settings.partners)
    assert result.case_id is not None
    return result.case_id


def bundle_texts(store: Store, case_id: str) -> str:
    with store.session() as s:
        return " ".join(
            s.scalars(select(NormalisedResource.body).where(NormalisedResource.case_id == case_id))
        )


def count_rows(store: Store, model: Any) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


# --------------------------------------------------------------------------- the burst


def test_burst_of_1000_stored_once_each_with_its_route_job(v2store, v2settings) -> None:
    inbox = v2inbox.V2Inbox(v2store)
    with (
        MllpListenerThread(inbox) as listener,
        MllpClient("127.0.0.1", listener.port, timeout_s=30) as client,
    ):
        acks = list(client.send_all(oru(n) for n in range(1000)))
        again = list(client.send_all(oru(n) for n in range(0, 1000, 100)))  # resends
    assert [a.code for a in acks] == ["AA"] * 1000
    assert [a.control_id for a in acks] == [f"MSG{n:06d}" for n in range(1000)]
    assert [a.code for a in again] == ["AA"] * 10
    with v2store.session() as s:
        ids = list(s.scalars(select(V2Message.control_id)))
        bodies = {c: b for c, b in s.execute(select(V2Message.control_id, V2Message.body))}
        routes = s.scalar(select(func.count()).select_from(Job).where(Job.kind == v2inbox.KIND))
        received = s.scalar(
            select(func.count()).select_from(AuditRow).where(AuditRow.action == "v2.receive")
        )
    assert len(ids) == len(set(ids)) == 1000
    assert bodies["MSG000042"] == oru(42)  # stored byte for byte
    assert routes == 1000
    assert received == 1000


def test_same_control_ids_from_two_connections_at_once_are_stored_once(v2store, v2settings) -> None:
    inbox = v2inbox.V2Inbox(v2store)
    codes: list[str] = []
    lock = threading.Lock()

    def send(port: int) -> None:
        with MllpClient("127.0.0.1", port, timeout_s=30) as client:
            got = [a.code for a in client.send_all(oru(n) for n in range(150))]
        with lock:
            codes.extend(got)

    with MllpListenerThread(inbox) as listener:
        threads = [threading.Thread(target=send, args=(listener.port,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert codes == ["AA"] * 450
    assert count_rows(v2store, V2Message) == 150
    with v2store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 150


@pytest.mark.parametrize(
    ("message", "code", "error", "says"),
    [
        (oru(1).replace(b"ORU^R01^ORU_R01", b"ADT^A01^ADT_A01"), "AR", "200", b"unsupported"),
        (oru(2).replace(b"|P|2.5.1", b"|P|2.9"), "AR", "203", b"unsupported HL7 version"),
        (b"MSH|^~\\&|A|B|C|D|2026||ORU^R01|X1|P|2.5.1\rthis is not a segment\r", "AR", "100", b""),
    ],
    ids=["unsupported-type", "unsupported-version", "unparseable"],
)
def test_what_cannot_be_accepted_is_refused_and_not_stored(
    v2store, v2settings, message, code, error, says
) -> None:
    with (
        MllpListenerThread(v2inbox.V2Inbox(v2store)) as listener,
        MllpClient("127.0.0.1", listener.port) as client,
    ):
        ack = client.send(message)
    assert ack.code == code
    assert f"|{error}^".encode() in ack.raw
    assert says in ack.raw
    assert count_rows(v2store, V2Message) == 0


def test_too_large_is_refused(v2store, v2settings) -> None:
    inbox = v2inbox.V2Inbox(v2store, max_bytes=2000)
    with (
        MllpListenerThread(inbox) as listener,
        MllpClient("127.0.0.1", listener.port) as client,
    ):
        big = oru(1).replace(b"Synthetic", b"x" * 3000)
        assert client.send(big).code == "AR"
        assert client.send(oru(2)).code == "AA"
    assert count_rows(v2store, V2Message) == 1


# --------------------------------------------------------------------------- SIGKILL


def send_until_killed(client: MllpClient, pid: int, acked: list[str]) -> None:
    """Send 1,000 messages, SIGKILL the listener after the 301st ACK; raises when it is gone."""
    for n in range(1000):
        ack = client.send(oru(n))
        assert ack.code == "AA"
        acked.append(ack.control_id)
        if n == 300:
            os.kill(pid, signal.SIGKILL)


def test_listener_process_sigkilled_mid_burst_loses_no_acked_message(v2settings, tmp_path) -> None:
    """`fhir-gateway mllp` on the gateway's SQLite database, killed with SIGKILL after 300
    ACKs: every control id ACKed AA before the kill is in the database afterwards."""
    port = free_port()
    env = {**os.environ, "FHIR_GATEWAY_DATA_DIR": str(v2settings.data_dir)}
    cmd = [str(Path(sys.executable).parent / "fhir-gateway"), "mllp", "--port", str(port)]
    log = tmp_path / "mllp.log"
    with log.open("wb") as errors:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "listener did not start"
                time.sleep(0.1)
        acked: list[str] = []
        with (
            MllpClient("127.0.0.1", port, timeout_s=10) as client,
            pytest.raises(UpstreamUnavailableError),
        ):
            send_until_killed(client, proc.pid, acked)
    finally:
        proc.kill()
        proc.wait()
    assert 300 <= len(acked) < 1000
    store = open_store(v2settings.db_url, key_dir=v2settings.data_dir / "keys")
    try:
        with store.session() as s:
            stored = set(s.scalars(select(V2Message.control_id)))
            routed = s.scalar(select(func.count()).select_from(Job))
    finally:
        store.dispose()
    assert set(acked) <= stored
    assert routed == len(stored)  # each stored message has its route job (same transaction)
    print(f"SIGKILL after {len(acked)} ACKs: {len(stored)} stored, none lost")  # noqa: T201


# --------------------------------------------------------------------------- matching


def test_matching_result_enters_the_case_bundle(v2store, v2settings) -> None:
    case_id = open_referral(v2store, v2settings, "MRN123", "ACC77")
    other = open_referral(v2store, v2settings, "MRN999", "ACC88")
    inbox = v2inbox.V2Inbox(v2store)
    with (
        MllpListenerThread(inbox) as listener,
        MllpClient("127.0.0.1", listener.port) as client,
    ):
        assert client.send(oru(7, mrn="MRN123", order="ACC77")).code == "AA"
    states = run_jobs(v2store, v2settings)
    assert "route_v2:done" in states
    assert "normalise_case:done" in states
    with v2store.session() as s:
        row = s.scalars(select(V2Message)).one()
        assert (row.state, row.case_id) == ("matched", case_id)
    assert "Synthetic diagnosis 7" in bundle_texts(v2store, case_id)
    assert "Synthetic diagnosis 7" not in bundle_texts(v2store, other)


@pytest.mark.parametrize(
    ("mrn", "order", "rule"),
    [
        ("MRN404", "ACC77", "no-patient-match"),  # the order number alone is not enough
        ("MRN123", "ACC00", "no-order-match"),  # the patient alone is not enough
    ],
)
def test_unmatched_result_is_held_then_assigned_into_the_bundle(
    v2store, v2settings, mrn, order, rule
) -> None:
    case_id = open_referral(v2store, v2settings, "MRN123", "ACC77")
    inbox = v2inbox.V2Inbox(v2store)
    assert inbox(oru(8, mrn=mrn, order=order)) == AckDecision.accept()
    run_jobs(v2store, v2settings)
    with v2store.session() as s:
        row = s.scalars(select(V2Message)).one()
        assert (row.state, row.reason, row.case_id) == ("held", rule, None)
    assert "Synthetic diagnosis 8" not in bundle_texts(v2store, case_id)
    admin = Actor("ops@example", "admin")
    with v2store.session() as s:
        v2inbox.assign(s, row.id, case_id, admin, v2settings)
    with v2store.session() as s, pytest.raises(ConflictError):
        v2inbox.assign(s, row.id, case_id, admin, v2settings)  # decided already
    run_jobs(v2store, v2settings)
    with v2store.session() as s:
        row = s.get(V2Message, row.id)
        assert row is not None
        assert (row.state, row.decided_by) == ("assigned", "ops@example")
        actions = list(s.scalars(select(AuditRow.action)))
        held_items = list(s.scalars(select(HeldItem)))
    assert {"v2.receive", "v2.hold", "v2.assign"} <= set(actions)
    if rule == "no-patient-match":
        # Another MRN: the identity check holds the message's Patient even once assigned; it
        # enters the bundle when an admin releases it too.
        assert [h.fields["differ"] for h in held_items] == [["identifier"]]
        assert "Synthetic diagnosis 8" not in bundle_texts(v2store, case_id)
        with v2store.session() as s:
            held.decide(s, case_id, held_items[0].id, held.RELEASED, admin)
        run_jobs(v2store, v2settings)
    else:
        assert held_items == []
    assert "Synthetic diagnosis 8" in bundle_texts(v2store, case_id)


def test_order_numbers_of_two_open_cases_are_ambiguous(v2store, v2settings) -> None:
    open_referral(v2store, v2settings, "MRN123", "ACC77")
    open_referral(v2store, v2settings, "MRN123", "ACC78")
    message = oru(9, mrn="MRN123", order="ACC77").replace(b"|ACC77|11526", b"|ACC78|11526")
    v2inbox.V2Inbox(v2store)(message)  # OBR-2 names one case, OBR-3 the other
    run_jobs(v2store, v2settings)
    with v2store.session() as s:
        assert s.scalars(select(V2Message.reason)).one() == "ambiguous"


def test_cli_lists_assigns_and_discards(v2settings) -> None:
    store = open_store(v2settings.db_url, key_dir=v2settings.data_dir / "keys")
    case_id = open_referral(store, v2settings, "MRN123", "ACC77")
    inbox = v2inbox.V2Inbox(store)
    inbox(oru(1, mrn="MRN123", order="ACC00"))
    inbox(oru(2, mrn="MRN404", order="ACC00"))
    run_jobs(store, v2settings)
    with store.session() as s:
        first, second = (r.id for r in v2inbox.list_messages(s))
    store.dispose()
    runner = CliRunner()
    env = {"FHIR_GATEWAY_DATA_DIR": str(v2settings.data_dir), "COLUMNS": "300"}
    listed = runner.invoke(cli_app, ["v2", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert first in listed.output
    assert "no-order-match" in listed.output
    assert "Doe" not in listed.output
    assert "MRN123" not in listed.output
    done = runner.invoke(cli_app, ["v2", "assign", first, case_id], env=env)
    assert done.exit_code == 0, done.output
    assert "assigned" in done.output
    gone = runner.invoke(cli_app, ["v2", "discard", second], env=env)
    assert gone.exit_code == 0
    assert "discarded" in gone.output
    again = runner.invoke(cli_app, ["v2", "discard", second], env=env)
    assert isinstance(again.exception, ConflictError)  # `main` prints it on one line, exit 2
    assert "only a held message" in str(again.exception)


def test_admin_api_lists_assigns_and_discards(v2settings, client, tokens) -> None:
    from tests.api.test_case_bundle import store_of

    settings = v2settings  # the partners file is written before the app starts
    store = store_of(client)
    case_id = open_referral(store, settings, "MRN123", "ACC77")
    inbox = v2inbox.V2Inbox(store)
    inbox(oru(1, mrn="MRN123", order="ACC00"))
    inbox(oru(2, mrn="MRN123", order="ACC01"))
    run_jobs(store, settings)
    admin = tokens.headers("admin")
    listed = client.get("/admin/v2-messages", headers=admin).json()
    assert [m["reason"] for m in listed] == ["no-order-match"] * 2
    assert "Doe" not in json.dumps(listed)
    one, two = (m["id"] for m in listed)
    bad = client.post(f"/admin/v2-messages/{one}/$assign", json={"case": "nope"}, headers=admin)
    assert bad.status_code == 404
    assert bad.json()["resourceType"] == "OperationOutcome"
    ok = client.post(f"/admin/v2-messages/{one}/$assign", json={"case": case_id}, headers=admin)
    assert ok.status_code == 200
    assert ok.json()["state"] == "assigned"
    gone = client.post(f"/admin/v2-messages/{two}/$discard", headers=admin)
    assert gone.status_code == 200
    assert gone.json()["state"] == "discarded"
    assert client.post(f"/admin/v2-messages/{two}/$discard", headers=admin).status_code == 409
    run_jobs(store, settings)
    assert "Synthetic diagnosis 1" in bundle_texts(store, case_id)


# --------------------------------------------------------------------------- 360X


class Received:
    """A loopback MLLP listener standing in for the referral initiator's system."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def __call__(self, message: bytes) -> AckDecision:
        self.messages.append(message)
        return AckDecision.accept()

    def orc(self) -> list[tuple[str, str, str]]:
        out = []
        for m in self.messages:
            seg = next(s for s in m.decode().split("\r") if s.startswith("ORC"))
            f = seg.split("|")
            out.append((f[1], f[5], f[16] if len(f) > 16 else ""))
        return out


def test_360x_order_opens_a_case_and_each_task_change_sends_osu(v2store, v2settings) -> None:
    initiator = Received()
    with MllpListenerThread(initiator) as partner_system:
        settings = with_destination(v2settings, partner_system.port)
        inbox = v2inbox.V2Inbox(v2store)
        data = (X360 / "omg-o19-referral-with-ccda.hl7").read_bytes()
        assert inbox(data) == AckDecision.accept()
        assert inbox(data) == AckDecision.accept()  # resent: stored once
        run_jobs(v2store, settings)
        with v2store.session() as s:
            row = s.scalars(select(V2Message)).one()
            assert row.state == "referral"
            assert row.case_id
            case = s.get(Case, row.case_id)
            assert case is not None
            assert case.status == "received"
            sr = s.get(FhirResource, ("ServiceRequest", case.service_request_id))
            task = s.get(FhirResource, ("Task", case.task_id))
            assert sr is not None
            assert task is not None
            assert sr.body["identifier"][0]["value"] == "889342"  # ORC-2
            assert sr.body["code"]["coding"][0]["code"] == "57133-1"  # OBR-4
            assert "lung adenocarcinoma" in sr.body["reasonCode"][0]["text"]  # OBR-31
            assert "tumour board" in sr.body["note"][0]["text"]  # NTE
            ccda_rows = s.scalar(
                select(func.count())
                .select_from(StoredResource)
                .where(StoredResource.source.like("%:ccda:%"))
            )
            assert ccda_rows
            assert ccda_rows > 10
        for status, reason in (("accepted", None), ("in-progress", None), ("completed", None)):
            with v2store.session() as s:
                task = s.get(FhirResource, ("Task", case.task_id))
                assert task is not None
                transition_task(s, task, status, reason)
            run_jobs(v2store, settings)
        deadline = time.monotonic() + 10
        while len(initiator.messages) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [(c, s) for c, s, _ in initiator.orc()] == [
        ("SC", "SC"),  # received
        ("SC", "IP"),  # accepted
        ("SC", "IP"),  # in-progress
        ("SC", "CM"),  # completed
    ]
    headers = [parse_header(m.decode()) for m in initiator.messages]
    assert all(h is not None and h.message_type == "OSU^O51^OSU_O51" for h in headers)
    assert len({h.control_id for h in headers if h}) == 4
    assert all(b"889342" in m for m in initiator.messages)  # ORC-2 is the referral's id
    with v2store.session() as s:
        sent = s.scalar(
            select(func.count()).select_from(AuditRow).where(AuditRow.action == "v2.status.sent")
        )
    assert sent == 4


def test_360x_declined_referral_sends_ca_and_a_down_partner_is_retried(v2store, v2settings) -> None:
    initiator = Received()
    slow = JobSettings(lease_s=2, poll_s=0.05, backoff_base_s=30, backoff_cap_s=60)
    settings = with_destination(v2settings, free_port()).model_copy(update={"jobs": slow})
    # nobody listens yet: each send fails once and waits for its backoff
    inbox = v2inbox.V2Inbox(v2store)
    inbox((X360 / "omg-o19-referral.hl7").read_bytes())
    run_jobs(v2store, settings)
    with v2store.session() as s:
        row = s.scalars(select(V2Message)).one()
        case = s.get(Case, row.case_id)
        assert case is not None
        task = s.get(FhirResource, ("Task", case.task_id))
        assert task is not None
        transition_task(s, task, "rejected", "outside our scope")
    run_jobs(v2store, settings)
    with v2store.session() as s:
        waiting = list(s.scalars(select(Job).where(Job.kind == "send_v2_status")))
        assert [j.state for j in waiting] == ["queued", "queued"]  # retried later, not lost
        assert all(j.last_error for j in waiting)
        assert [j.attempts for j in waiting] == [1, 1]
    with MllpListenerThread(initiator) as partner_system:
        settings = with_destination(v2settings, partner_system.port)
        with v2store.session() as s:
            for j in s.scalars(select(Job).where(Job.kind == "send_v2_status")):
                j.run_at = j.created_at
        run_jobs(v2store, settings)
    assert sorted(initiator.orc()) == [("SC", "CA", "^DECLINED"), ("SC", "SC", "")]
    with v2store.session() as s:
        assert {j.state for j in s.scalars(select(Job).where(Job.kind == "send_v2_status"))} == {
            "done"
        }
