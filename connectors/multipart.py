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
    data: bytes | memoryview


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
    """Feed bytes with `feed()`, then call `close()`; both return the events seen so far.

    Body bytes are handed on as `memoryview` slices of the fed chunk (no copy): a consumer
    must use them before the next `feed()` (writing and hashing them, as the WADO-RS reader
    does). Only a short tail that may start a delimiter is kept between chunks.
    """

    boundary: bytes
    _tail: bytes = b""
    _state: int = _PREAMBLE
    _headers: dict[str, str] = field(default_factory=dict)
    _dropped: bool = False

    def __post_init__(self) -> None:
        if not self.boundary:
            raise ValueError("empty multipart boundary")
        self._delim = b"--" + self.boundary
        self._body_delim = b"\n" + self._delim

    def feed(self, chunk: bytes) -> list[Event]:
        data = self._tail + chunk if self._tail else chunk
        self._tail = b""
        events: list[Event] = []
        pos = 0
        while True:
            new_pos = self._step(data, pos, events)
            if new_pos is None:
                break
            pos = new_pos
        return events

    def close(self) -> list[Event]:
        """End of input: an unfinished part is reported as `PartTruncated`."""
        events: list[Event] = []
        if self._state == _BODY and self._tail:
            events.append(PartData(memoryview(self._tail)))
        if self._state in (_HEADERS, _BODY):
            events.append(PartTruncated())
        elif self._state == _PREAMBLE:
            raise ParseError("multipart body has no delimiter", source="multipart")
        self._state, self._tail = _DONE, b""
        return events

    def _keep(self, data: bytes, pos: int) -> None:
        self._tail = bytes(data[pos:])

    def _step(self, data: bytes, pos: int, events: list[Event]) -> int | None:
        """Advance one state transition from `pos`; None when `data` is used up."""
        if self._state == _PREAMBLE:
            search = pos
            while True:
                idx = data.find(self._delim, search)
                if idx < 0:
                    keep_from = max(pos, len(data) - len(self._delim) - 1)
                    self._dropped = self._dropped or keep_from > 0
                    self._keep(data, keep_from)
                    return None
                at_start = idx == 0 and not self._dropped
                if at_start or (idx > 0 and data[idx - 1] == 0x0A):
                    self._state = _AFTER_DELIM
                    return idx + len(self._delim)
                search = idx + 1
        if self._state == _AFTER_DELIM:
            # After "--boundary": "--" closes; else transport padding, then a line end.
            if len(data) - pos < 2:
                self._keep(data, pos)
                return None
            if data[pos : pos + 2] == b"--":
                self._state = _DONE
                return None
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._keep(data, pos)
                return None
            if data[pos:nl].strip(b" \t\r"):
                raise ParseError("garbage after multipart delimiter", source="multipart")
            self._state, self._headers = _HEADERS, {}
            return nl + 1
        if self._state == _HEADERS:
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._keep(data, pos)
                return None
            line = data[pos:nl].rstrip(b"\r")
            if not line:
                events.append(PartStart(self._headers))
                self._state = _BODY
                return nl + 1
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                self._headers[name.strip().lower()] = value.strip()
            return nl + 1
        if self._state == _BODY:
            idx = data.find(self._body_delim, pos)
            view = memoryview(data)
            if idx < 0:
                # Keep back only what could start a delimiter: from a LF (and its CR) near the end.
                nl = data.rfind(b"\n", max(pos, len(data) - len(self._body_delim) + 1))
                if nl < 0:  # a final CR may be the start of a CRLF delimiter
                    cut = len(data) - 1 if data.endswith(b"\r") else len(data)
                else:
                    cut = nl - 1 if nl > pos and data[nl - 1] == 0x0D else nl
                if cut > pos:
                    events.append(PartData(view[pos:cut]))
                self._keep(data, cut)
                return None
            end = idx - 1 if idx > pos and data[idx - 1] == 0x0D else idx
            if end > pos:
                events.append(PartData(view[pos:end]))
            events.append(PartEnd())
            self._state = _AFTER_DELIM
            return idx + len(self._body_delim)
        return None  # _DONE: an epilogue is ignored


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
