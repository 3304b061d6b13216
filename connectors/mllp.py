"""HL7 v2 over MLLP (Minimal Lower Layer Protocol): a listener that stores each message before
it acknowledges it, and a client that sends messages over one connection and reads the ACKs.

Framing and the asyncio streams come from python-hl7 (`hl7.mllp`); this module adds the
acknowledgement rules (HL7 v2.5.1 ch. 2, original acknowledgement mode):

- `store(message_bytes) -> AckDecision` is called once per message and returns before the
  ACK is written: an AA is only ever sent for a message the store holds durably.
- AA when stored; AE/AR with the reason in MSA-3 and an ERR segment (HL7 table 0357 code) for
  what cannot be accepted. A message that cannot be parsed, or lacks MSH-9/MSH-10, is answered
  AR and never reaches the store; a store that raises is answered AR 207 (the sender resends).
- The ACK's MSH swaps sender and receiver (MSH-3/4 <-> MSH-5/6), keeps the message's delimiters,
  processing id and version; MSA-2 is the message's MSH-10 control id.

The listener is asyncio (it runs in its own thread or process); the client is synchronous like
every connector, driving the same `hl7.mllp` streams on a private event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal, Self

import structlog
from hl7 import parse as hl7_parse
from hl7.mllp import open_hl7_connection, start_hl7_server
from hl7.mllp.exceptions import InvalidBlockError

from fhir_gateway.errors import ConfigError, UpstreamRejectedError, UpstreamUnavailableError

log = structlog.get_logger(__name__)

SYSTEM = "mllp"
MAX_MESSAGE_BYTES = 16 << 20  # a v2 message with an embedded PDF (OBX-5 ED) stays well below
DEFAULT_VERSION = "2.5.1"
# HL7 table 0357 (message error condition codes) used here.
ERR_SEGMENT_SEQUENCE = "100"
ERR_REQUIRED_FIELD = "101"
ERR_INTERNAL = "207"
ERR_TEXT = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

AckCode = Literal["AA", "AE", "AR"]


@dataclass(frozen=True)
class AckDecision:
    """What the store says about one message: AA (stored), AE or AR with a reason."""

    code: AckCode
    reason: str = ""
    error_code: str = ERR_INTERNAL  # HL7 table 0357, used for AE/AR

    @classmethod
    def accept(cls) -> AckDecision:
        return cls("AA")

    @classmethod
    def error(cls, reason: str, error_code: str = ERR_INTERNAL) -> AckDecision:
        """AE: the message was understood but cannot be processed (content problem)."""
        return cls("AE", reason, error_code)

    @classmethod
    def reject(cls, reason: str, error_code: str = ERR_INTERNAL) -> AckDecision:
        """AR: rejected (bad header, unsupported type/version, or we could not store it)."""
        return cls("AR", reason, error_code)


StoreCallback = Callable[[bytes], AckDecision]


@dataclass(frozen=True)
class MshHeader:
    """The MSH fields an acknowledgement needs (read tolerantly from the first segment)."""

    field_sep: str
    encoding_chars: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_type: str  # MSH-9 as sent, e.g. ORU^R01^ORU_R01
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12

    @property
    def component_sep(self) -> str:
        return self.encoding_chars[:1] or "^"

    @property
    def trigger_event(self) -> str:
        parts = self.message_type.split(self.component_sep)
        return parts[1] if len(parts) > 1 else ""


@dataclass(frozen=True)
class Ack:
    """An acknowledgement as the client read it."""

    code: str  # MSA-1: AA/AE/AR (or CA/CE/CR in enhanced mode)
    control_id: str  # MSA-2: the acknowledged message's MSH-10
    text: str  # MSA-3
    raw: bytes

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


# --- reading and building messages (pure) --------------------------------------------------

_SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")


def decode_message(data: bytes) -> str:
    """Message bytes -> text: UTF-8 when valid, else ISO 8859-1 (which never fails; the MSH
    fields an ACK needs are ASCII either way). A UTF-8 BOM is dropped."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_header(text: str) -> MshHeader | None:
    """The MSH of `text`, or None when the message does not start with an MSH segment."""
    text = text.lstrip("\r\n\t ")
    if not text.startswith("MSH") or len(text) < 8:
        return None
    sep = text[3]
    if sep.isalnum() or sep in "\r\n":
        return None
    first = _SEGMENT_SPLIT.split(text, maxsplit=1)[0]
    fields = first.split(sep)
    # fields[0] = "MSH", fields[1] = MSH-2, so MSH-n is fields[n - 1].
    fields += [""] * (12 - len(fields))
    return MshHeader(
        field_sep=sep,
        encoding_chars=fields[1][:4] or "^~\\&",
        sending_application=fields[2],
        sending_facility=fields[3],
        receiving_application=fields[4],
        receiving_facility=fields[5],
        message_type=fields[8],
        control_id=fields[9],
        processing_id=fields[10],
        version=fields[11],
    )


def check_message(data: bytes) -> tuple[MshHeader | None, AckDecision | None]:
    """(header, None) when the message can be accepted for storage, else (header or None,
    the AR to send). Structure is checked with python-hl7's parser."""
    if not data.strip():
        return None, AckDecision.reject("empty message", ERR_SEGMENT_SEQUENCE)
    text = decode_message(data)
    header = parse_header(text)
    if header is None:
        return None, AckDecision.reject(
            "not an HL7 v2 message: it does not start with an MSH segment", ERR_SEGMENT_SEQUENCE
        )
    try:
        hl7_parse(_SEGMENT_SPLIT.sub("\r", text.lstrip("\r\n\t ")).strip("\r"))
    except Exception as exc:  # python-hl7 raises ParseException, IndexError, ValueError...
        return header, AckDecision.reject(
            f"message cannot be parsed ({type(exc).__name__})", ERR_SEGMENT_SEQUENCE
        )
    if not header.control_id:
        return header, AckDecision.reject(
            "MSH-10 (message control id) is empty", ERR_REQUIRED_FIELD
        )
    if not header.message_type:
        return header, AckDecision.reject("MSH-9 (message type) is empty", ERR_REQUIRED_FIELD)
    return header, None


def escape(text: str, header: MshHeader | None) -> str:
    """HL7 escape sequences (v2.5.1 §2.7) for a free-text value, on one line."""
    sep = header.field_sep if header else "|"
    enc = (header.encoding_chars if header else "^~\\&").ljust(4, "\x00")
    component, repetition, esc, sub = enc[0], enc[1], enc[2], enc[3]
    text = " ".join(text.split())
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in ((sep, "F"), (component, "S"), (repetition, "R"), (sub, "T")):
        if char != "\x00":
            out = out.replace(char, f"{esc}{code}{esc}")
    return out


def build_ack(
    header: MshHeader | None,
    decision: AckDecision,
    *,
    now: datetime | None = None,
    ack_control_id: str | None = None,
) -> bytes:
    """The ACK for a message with `header` (None: unreadable, answered with defaults).

    MSH-3/4 are the receiver of the message, MSH-5/6 its sender; MSH-9 `ACK^<trigger>^ACK`;
    MSA-1 the code, MSA-2 the message's MSH-10, MSA-3 the reason; AE/AR add an ERR segment.
    """
    now = now or datetime.now(UTC)
    sep = header.field_sep if header else "|"
    enc = header.encoding_chars if header else "^~\\&"
    comp = enc[:1] or "^"
    version = (header.version if header else "") or DEFAULT_VERSION
    trigger = header.trigger_event if header else ""
    message_type = comp.join(("ACK", trigger, "ACK")) if trigger else "ACK"
    msh = [
        "MSH",
        enc,
        header.receiving_application if header else "",
        header.receiving_facility if header else "",
        header.sending_application if header else "",
        header.sending_facility if header else "",
        now.strftime("%Y%m%d%H%M%S") + now.strftime("%z"),
        "",
        message_type,
        ack_control_id or uuid.uuid4().hex[:20],
        (header.processing_id if header else "") or "P",
        version,
    ]
    reason = escape(decision.reason, header)
    short = escape(decision.reason[:80], header)  # MSA-3 is ST(80) before v2.5
    msa = ["MSA", decision.code, header.control_id if header else "", short]
    segments = [sep.join(msh), sep.join(msa).rstrip(sep)]
    if decision.code != "AA":
        code = decision.error_code
        cwe = comp.join((code, ERR_TEXT.get(code, ""), "HL70357"))
        if _version_tuple(version) >= (2, 5):
            # ERR-2 location, ERR-3 HL7 error code, ERR-4 severity, ERR-7 diagnostic info.
            segments.append(sep.join(["ERR", "", "", cwe, "E", "", "", reason]))
        else:
            sub = enc[3:4] or "&"
            eld = comp.join(("", "", "", sub.join((code, ERR_TEXT.get(code, ""), "HL70357"))))
            segments.append(sep.join(["ERR", eld]))
    return ("\r".join(segments) + "\r").encode("utf-8")


def parse_ack(data: bytes) -> Ack:
    """MSA-1..3 of an acknowledgement.

    Raises:
        UpstreamRejectedError: the reply has no MSA segment.
    """
    text = decode_message(data)
    header = parse_header(text)
    sep = header.field_sep if header else "|"
    for segment in _SEGMENT_SPLIT.split(text):
        if segment.startswith("MSA"):
            fields = [*segment.split(sep), "", "", ""]
            return Ack(fields[1], fields[2], fields[3], data)
    raise UpstreamRejectedError("MLLP reply has no MSA segment", system=SYSTEM)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version.split("^")[0])
    return tuple(int(p) for p in parts[:2]) or (2, 5)


# --- the listener --------------------------------------------------------------------------


class MllpListener:
    """An asyncio MLLP server: one task per connection, messages answered in order.

    `store` runs in a worker thread (it may block on a database and fsync); it must be safe to
    call from several threads when several connections are open.
    """

    def __init__(
        self,
        store: StoreCallback,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self.host = host
        self.port = port
        self._limit = max_message_bytes
        self._clock = clock
        self._server: asyncio.Server | None = None
        self.messages = 0  # handled (any code), for metrics and tests

    async def start(self) -> None:
        """Bind and listen; `port=0` picks a free port (read `self.port` afterwards)."""
        self._server = await start_hl7_server(self._handle, self.host, self.port, limit=self._limit)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("mllp.listener.started", port=self.port)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts = {"AA": 0, "AE": 0, "AR": 0}
        try:
            while True:
                try:
                    block: bytes = await reader.readblock()  # type: ignore[attr-defined]
                except asyncio.IncompleteReadError:
                    return  # the peer closed the connection
                except InvalidBlockError:
                    log.info("mllp.listener.framing_error", action="close")
                    return  # framing is lost: nothing later on this connection can be trusted
                except ValueError:
                    reason = f"message larger than {self._limit} bytes"
                    ack = build_ack(None, AckDecision.reject(reason), now=self._clock())
                    writer.writeblock(ack)  # type: ignore[attr-defined]
                    await writer.drain()
                    log.info("mllp.listener.too_large", action="close")
                    return
                ack, code = await self._acknowledge(block)
                counts[code] += 1
                self.messages += 1
                writer.writeblock(ack)  # type: ignore[attr-defined]
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            if any(counts[c] for c in ("AE", "AR")):
                log.info("mllp.listener.connection.closed", **counts)

    async def _acknowledge(self, block: bytes) -> tuple[bytes, AckCode]:
        header, refusal = check_message(block)
        if refusal is not None:
            decision = refusal
        else:
            try:
                decision = await asyncio.to_thread(self._store, block)
            except Exception as exc:  # the store failed: nothing was stored, the sender resends
                log.warning("mllp.store.failed", error=type(exc).__name__)
                decision = AckDecision.reject("receiving application could not store the message")
        if decision.code != "AA":
            log.info("mllp.message.refused", code=decision.code, error_code=decision.error_code)
        return build_ack(header, decision, now=self._clock()), decision.code


class MllpListenerThread:
    """An `MllpListener` on its own event loop in a daemon thread (service, tests, demo)."""

    def __init__(self, store: StoreCallback, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.listener = MllpListener(store, host=host, port=port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mllp-listener")
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.listener.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.listener.aclose())
        self._loop.close()

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> Self:
        self._thread.start()
        if not self._started.wait(10) or self._error is not None:
            raise ConfigError(f"MLLP listener did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(store: StoreCallback, host: str, port: int) -> None:
    """Run a listener until the process is stopped (`fhir-gateway mllp` and test processes)."""

    async def main() -> None:
        listener = MllpListener(store, host=host, port=port)
        await listener.serve_forever()

    asyncio.run(main())


# --- the client ----------------------------------------------------------------------------


class MllpClient:
    """Sends HL7 v2 messages over one MLLP connection and reads each ACK (original mode: one
    message in flight). Not thread-safe: one client per sending thread.

    Raises (from `send`):
        UpstreamUnavailableError: cannot connect, the connection dropped, or no ACK in time.
        UpstreamRejectedError: the reply is not an ACK for the message that was sent.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 30.0,
        max_ack_bytes: int = 1 << 20,
    ) -> None:
        self.host, self.port = host, port
        self.url = f"mllp://{host}:{port}"
        self._timeout_s = timeout_s
        self._limit = max_ack_bytes
        self._runner: asyncio.Runner | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def connect(self) -> Self:
        if self._runner is None:
            self._runner = asyncio.Runner()
        try:
            self._reader, self._writer = self._runner.run(
                asyncio.wait_for(
                    open_hl7_connection(self.host, self.port, limit=self._limit), self._timeout_s
                )
            )
        except (OSError, TimeoutError) as exc:
            self.close()
            raise UpstreamUnavailableError(
                f"{SYSTEM}: cannot connect ({type(exc).__name__})", system=SYSTEM, url=self.url
            ) from exc
        return self

    def send(self, message: bytes) -> Ack:
        """Send one message and wait for its ACK; MSA-2 must be the message's MSH-10."""
        if self._runner is None or self._writer is None:
            self.connect()
        assert self._runner is not None
        try:
            reply = self._runner.run(asyncio.wait_for(self._exchange(message), self._timeout_s))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, InvalidBlockError) as exc:
            self.close()
            raise UpstreamUnavailableError(
                f"{SYSTEM}: no acknowledgement ({type(exc).__name__})", system=SYSTEM, url=self.url
            ) from exc
        ack = parse_ack(reply)
        header = parse_header(decode_message(message))
        if header is not None and header.control_id and ack.control_id != header.control_id:
            raise UpstreamRejectedError(
                "MLLP ACK acknowledges another message (MSA-2 differs from MSH-10)",
                system=SYSTEM,
                url=self.url,
            )
        return ack

    def send_all(self, messages: Iterable[bytes]) -> Iterator[Ack]:
        """Send messages one after another over this connection, yielding each ACK."""
        for message in messages:
            yield self.send(message)

    async def _exchange(self, message: bytes) -> bytes:
        assert self._reader is not None
        assert self._writer is not None
        self._writer.writeblock(message)  # type: ignore[attr-defined]
        await self._writer.drain()
        reply: bytes = await self._reader.readblock()  # type: ignore[attr-defined]
        return reply

    def close(self) -> None:
        if self._runner is not None:
            if self._writer is not None:
                writer = self._writer
                self._writer = self._reader = None
                writer.close()
                with contextlib.suppress(OSError, RuntimeError):
                    self._runner.run(writer.wait_closed())
            self._runner.close()
            self._runner = None

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "Ack",
    "AckDecision",
    "MllpClient",
    "MllpListener",
    "MllpListenerThread",
    "MshHeader",
    "StoreCallback",
    "build_ack",
    "check_message",
    "parse_ack",
    "parse_header",
    "serve",
]
