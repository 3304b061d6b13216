"""Incremental `multipart/related` reader (RFC 2046 5.1) for streamed WADO-RS responses.

We do not use `requests_toolbelt`'s decoder or `dicomweb-client`'s: both buffer a whole part (or
the whole body) in memory, and memory must stay flat whatever the study size (DESIGN.md). This
reader is fed chunks of any size and emits events; a part's body is handed on as it arrives.

Tolerant reading: a preamble before the first delimiter, CRLF or bare LF line ends, transport
padding after a delimiter, per-part headers (or none), and a delimiter split across chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fhir_gateway.errors import ParseError


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]  # lower-cased names


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


@dataclass(frozen=True)
class PartTruncated:
    """The stream ended inside this part (no closing delimiter): its body is incomplete."""

    reason: str = "stream ended inside a part"


Event = PartStart | PartData | PartEnd | PartTruncated

_PREAMBLE, _AFTER_DELIM, _HEADERS, _BODY, _DONE = range(5)


@dataclass
class MultipartReader:
    """Feed bytes with `feed()`, then call `close()`; both return the events seen so far."""

    boundary: bytes
    _buf: bytearray = field(default_factory=bytearray)
    _state: int = _PREAMBLE
    _headers: dict[str, str] = field(default_factory=dict)
    _dropped: bool = False

    def __post_init__(self) -> None:
        if not self.boundary:
            raise ValueError("empty multipart boundary")
        self._delim = b"--" + self.boundary
        self._body_delim = b"\n" + self._delim
        self._keep = len(self._body_delim) + 1  # tail kept back: a delimiter may be split

    def feed(self, chunk: bytes) -> list[Event]:
        self._buf += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> list[Event]:
        """End of input: an unfinished part is reported as `PartTruncated`."""
        events: list[Event] = []
        while self._step(events):
            pass
        if self._state in (_HEADERS, _BODY):
            events.append(PartTruncated())
        elif self._state == _PREAMBLE:
            raise ParseError("multipart body has no delimiter", source="multipart")
        self._state = _DONE
        return events

    def _step(self, events: list[Event]) -> bool:
        buf = self._buf
        if self._state == _PREAMBLE:
            pos = 0
            while True:
                idx = buf.find(self._delim, pos)
                if idx < 0:
                    # Drop what cannot start a delimiter any more.
                    drop = max(0, len(buf) - len(self._delim) - 1)
                    if drop:
                        del buf[:drop]
                        self._dropped = True
                    return False
                if (idx == 0 and not self._dropped) or (idx > 0 and buf[idx - 1] == 0x0A):
                    del buf[: idx + len(self._delim)]
                    self._state = _AFTER_DELIM
                    return True
                pos = idx + 1
        if self._state == _AFTER_DELIM:
            # After "--boundary": "--" closes; else transport padding, then a line end.
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = _DONE
                buf.clear()
                return False
            nl = buf.find(b"\n")
            if nl < 0:
                return False
            if buf[:nl].strip(b" \t\r"):
                raise ParseError("garbage after multipart delimiter", source="multipart")
            del buf[: nl + 1]
            self._state, self._headers = _HEADERS, {}
            return True
        if self._state == _HEADERS:
            nl = buf.find(b"\n")
            if nl < 0:
                return False
            line = bytes(buf[:nl]).rstrip(b"\r")
            del buf[: nl + 1]
            if not line:
                events.append(PartStart(self._headers))
                self._state = _BODY
                return True
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                self._headers[name.strip().lower()] = value.strip()
            return True
        if self._state == _BODY:
            idx = buf.find(self._body_delim)
            if idx < 0:
                if len(buf) > self._keep:
                    n = len(buf) - self._keep
                    events.append(PartData(bytes(buf[:n])))
                    del buf[:n]
                return False
            end = idx - 1 if idx > 0 and buf[idx - 1] == 0x0D else idx
            if end:
                events.append(PartData(bytes(buf[:end])))
            events.append(PartEnd())
            del buf[: idx + len(self._body_delim)]
            self._state = _AFTER_DELIM
            return True
        buf.clear()  # _DONE: an epilogue is ignored
        return False


def iter_events(chunks: Iterable[bytes], boundary: bytes) -> Iterator[Event]:
    """All events of a multipart body given as chunks."""
    reader = MultipartReader(boundary)
    for chunk in chunks:
        yield from reader.feed(chunk)
    yield from reader.close()


def boundary_of(content_type: str) -> bytes:
    """The `boundary` parameter of a multipart Content-Type.

    Raises:
        ParseError: there is none.
    """
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"').encode("latin-1")
    raise ParseError(f"no boundary in Content-Type {content_type!r}", source="multipart")
