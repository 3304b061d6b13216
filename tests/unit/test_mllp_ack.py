"""connectors.mllp, the pure part: reading MSH, checking a message, building and reading ACKs
(HL7 v2.5.1 ch. 2 original acknowledgement mode)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.mllp import (
    AckDecision,
    build_ack,
    check_message,
    decode_message,
    parse_ack,
    parse_header,
)
from fhir_gateway.errors import UpstreamRejectedError

HL7V2 = Path(__file__).resolve().parents[2] / "fixtures" / "hl7v2"
NOW = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)
ORU = (
    b"MSH|^~\\&|LABSYS|NORTH HOSP|GATEWAY|SECOND OPINION|20260301120000||ORU^R01^ORU_R01|"
    b"CTRL-0001|P|2.5.1\rPID|1||12345^^^NH^MR||DOE^JANE\rOBR|1||ACC1|11526-1^Path^LN\r"
)


def segments(ack: bytes) -> list[list[str]]:
    return [s.split("|") for s in ack.decode().split("\r") if s]


def test_aa_swaps_sender_and_receiver_and_echoes_control_id():
    header, refusal = check_message(ORU)
    assert refusal is None
    ack = build_ack(header, AckDecision.accept(), now=NOW, ack_control_id="A1")
    msh, msa = segments(ack)
    assert msh[:12] == [
        "MSH",
        "^~\\&",
        "GATEWAY",
        "SECOND OPINION",
        "LABSYS",
        "NORTH HOSP",
        "20260301123005+0000",
        "",
        "ACK^R01^ACK",
        "A1",
        "P",
        "2.5.1",
    ]
    assert msa == ["MSA", "AA", "CTRL-0001"]
    assert ack.endswith(b"\r")


def test_ae_carries_reason_in_msa3_and_err():
    header, _ = check_message(ORU)
    decision = AckDecision.error("unknown patient id | see ^ list", "204")
    _msh, msa, err = segments(build_ack(header, decision, now=NOW))
    assert msa[:3] == ["MSA", "AE", "CTRL-0001"]
    # The reason is escaped (v2.5.1 §2.7) so it cannot break the segment apart.
    assert "|".join(msa[3:]) == "unknown patient id \\F\\ see \\S\\ list"
    assert err[0] == "ERR"
    assert err[3] == "204^Unknown key identifier^HL70357"
    assert err[4] == "E"
    assert err[7] == "unknown patient id \\F\\ see \\S\\ list"


def test_pre_25_messages_get_an_err_1_element():
    old = ORU.replace(b"|2.5.1\r", b"|2.3\r")
    header, _ = check_message(old)
    *_, err = segments(build_ack(header, AckDecision.reject("no"), now=NOW))
    assert err == ["ERR", "^^^207&Application internal error&HL70357"]


@pytest.mark.parametrize(
    ("data", "code", "msa2"),
    [
        (b"", "100", ""),
        (b"hello, this is not HL7", "100", ""),
        (b"PID|1||123\r", "100", ""),
        (b"MSH|^~\\&|A|B|C|D|2026||ORU^R01||P|2.5\r", "101", ""),  # no control id
        (b"MSH|^~\\&|A|B|C|D|2026|||X9|P|2.5\r", "101", "X9"),  # no message type
        (b"MSH|", "100", ""),
    ],
)
def test_unacceptable_messages_are_rejected_with_a_reason(data, code, msa2):
    header, refusal = check_message(data)
    assert refusal is not None
    assert refusal.code == "AR"
    assert refusal.error_code == code
    assert refusal.reason
    ack = build_ack(header, refusal, now=NOW)
    msa = segments(ack)[1]
    assert msa[:3] == ["MSA", "AR", msa2]
    assert msa[3]  # the reason is in MSA-3


def test_custom_delimiters_are_kept_in_the_ack():
    data = (HL7V2 / "segmentfinder_a24_custom_delimiters.hl7").read_bytes()
    header, refusal = check_message(data)
    assert refusal is None
    assert header is not None
    ack = build_ack(header, AckDecision.error("a|b"), now=NOW).decode()
    sep = header.field_sep
    assert ack.startswith(f"MSH{sep}{header.encoding_chars}{sep}")
    msa = ack.split("\r")[1].split(sep)
    assert msa[:3] == ["MSA", "AE", header.control_id]


@pytest.mark.parametrize("path", sorted(HL7V2.glob("*.hl7")), ids=lambda p: p.name)
def test_every_v2_fixture_is_accepted_for_storage(path):
    """LF, CR and CRLF terminators and a UTF-8 BOM all pass (corpus README)."""
    header, refusal = check_message(path.read_bytes())
    assert refusal is None, refusal
    assert header is not None
    assert header.control_id


def test_parse_ack_and_latin1():
    header, _ = check_message(ORU)
    ack = parse_ack(build_ack(header, AckDecision.error("bad"), now=NOW))
    assert (ack.code, ack.control_id, ack.text, ack.accepted) == ("AE", "CTRL-0001", "bad", False)
    assert decode_message("MSH|^~\\&|Ä".encode("latin-1")).endswith("Ä")
    assert parse_header("PID|1") is None
    with pytest.raises(UpstreamRejectedError):
        parse_ack(b"MSH|^~\\&|A|B\r")
