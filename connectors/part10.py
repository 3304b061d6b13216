"""Fast structural check of a DICOM Part 10 file as it arrives (the WADO-RS hot path).

Every retrieved part must be a complete Part 10 file before it is kept. pydicom can tell us,
but costs ~0.3 ms per instance (a full `dcmread` plus our end-of-data checks, under a lock for
its warnings): on a 500-instance CT study that was a third of the CPU of the whole pull
(tests/benchmarks/bench_wado.py). This module walks only the element headers of the common
encodings (explicit and implicit VR little endian), reading the few values it needs from the
part's first bytes already in memory, in ~20 µs.

It answers only when it is sure: anything unusual (big endian, deflate, an unknown VR, a
layout it cannot follow, any sign of truncation) returns None, and the caller asks pydicom
(`connectors.dicomweb.verify_part10`), which stays the reference. tests/unit/imaging/
test_part10_scan.py checks that both agree on every fixture and on cuts of them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

ReadAt = Callable[[int, int], bytes]  # (offset, length) -> bytes (shorter at end of file)

IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
# Transfer syntaxes whose Pixel Data is native (uncompressed), so its length is checkable.
_NATIVE = {IMPLICIT_LE, "1.2.840.10008.1.2.1"}
_UNDEFINED = 0xFFFFFFFF
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TS = 0x00020010
# Top-level values we read (all short): UIDs, and what native Pixel Data length depends on.
_UIDS = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_uid",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
}
_US = {0x00280002: "samples", 0x00280010: "rows", 0x00280011: "cols", 0x00280100: "bits"}
_FRAMES = 0x00280008
_WANTED = {*_UIDS, *_US, _FRAMES, _PIXEL_DATA}
_MAX_DEPTH = 16
_EXPLICIT = struct.Struct("<HH2sH")  # tag, VR, 2-byte length (or reserved)
_U32 = struct.Struct("<I")


class _Unsure(Exception):
    """The fast walk cannot decide; pydicom will."""


@dataclass(frozen=True)
class Part10Info:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    # Where the header ends: the offset of top-level Pixel Data (else the file's size); the bytes
    # before it are all a DICOM JSON of the instance needs (`stop_before_pixels`).
    header_end: int | None = field(default=None, compare=False)


def scan_part10(head: bytes, size: int, read_at: ReadAt) -> Part10Info | None:
    """The identifying UIDs of a complete, well-formed little-endian Part 10 file; else None.

    `head` is the file's first bytes (any length, up to all of it); `read_at` serves the
    rest (rarely needed: most files end with Pixel Data, whose value is skipped).
    None means "ask pydicom", not "bad": it is also the answer for big endian, deflated and
    odd files, which may well be valid.
    """
    try:
        return _Walk(head, size, read_at).run()
    except (_Unsure, struct.error, UnicodeDecodeError, ValueError):
        return None


class _Walk:
    def __init__(self, head: bytes, size: int, read_at: ReadAt) -> None:
        self.head, self.size, self.read_at = head, size, read_at
        self.values: dict[str, str] = {}
        self.numbers: dict[str, int] = {}
        self.pixel_len: int | None = None
        self.pixel_at: int | None = None

    def read(self, pos: int, n: int) -> bytes:
        if pos + n <= len(self.head):
            return self.head[pos : pos + n]
        data = self.read_at(pos, n) if pos + n <= self.size else b""
        if len(data) != n:
            raise _Unsure  # past the end: truncated, or not what we think
        return data

    def run(self) -> Part10Info | None:
        if self.size < 132 or self.read(128, 4) != b"DICM":
            return None
        pos, ts = self.meta(132)
        if ts == _EXPLICIT_BE or ts in _DEFLATED or not ts:
            return None
        explicit = ts != IMPLICIT_LE
        if self.dataset(pos, explicit) != self.size:
            return None
        v = self.values
        if not all(k in v for k in ("study_uid", "series_uid", "sop_uid", "sop_class_uid")):
            return None
        if ts in _NATIVE and self.pixel_len is not None and self.pixel_shortfall() > 0:
            return None
        header_end = self.size if self.pixel_at is None else self.pixel_at
        return Part10Info(
            v["study_uid"], v["series_uid"], v["sop_uid"], v["sop_class_uid"], ts, header_end
        )

    def meta(self, pos: int) -> tuple[int, str]:
        """The File Meta group (always explicit VR little endian); returns end and TS UID."""
        ts = ""
        while pos + 8 <= self.size:
            head = self.read(pos, 8)
            if struct.unpack_from("<H", head)[0] != 0x0002:
                break
            tag, vpos, length = self.header(pos, head, explicit=True)
            if length == _UNDEFINED:
                raise _Unsure
            if tag == _TS:
                ts = _text(self.read(vpos, length))
            pos = vpos + length
        return pos, ts

    def header(self, pos: int, head: bytes, explicit: bool) -> tuple[int, int, int]:
        """(tag, value offset, value length) of the element at `pos` (`head`: its 8 bytes)."""
        group, elem = struct.unpack_from("<HH", head)
        tag = group << 16 | elem
        if not explicit or group == 0xFFFE:  # items and delimiters have no VR
            return tag, pos + 8, struct.unpack_from("<I", head, 4)[0]
        vr = head[4:6]
        if vr in _LONG_VRS:
            return tag, pos + 12, struct.unpack("<I", self.read(pos + 8, 4))[0]
        if vr in _SHORT_VRS:
            return tag, pos + 8, struct.unpack_from("<H", head, 6)[0]
        raise _Unsure  # unknown VR: pydicom has heuristics for that

    def dataset(self, pos: int, explicit: bool) -> int:
        """Walk the top-level elements from `pos`; returns where the last one ends."""
        head, size = self.head, self.size
        fast_end = len(head) - 12 if explicit else -1
        while pos < size:
            if pos <= fast_end:  # the common case, inlined: ~0.3 µs per element
                group, elem, vr, length = _EXPLICIT.unpack_from(head, pos)
                if vr in _SHORT_VRS:
                    tag, vpos = group << 16 | elem, pos + 8
                elif vr in _LONG_VRS:
                    tag, vpos, length = (
                        group << 16 | elem,
                        pos + 12,
                        _U32.unpack_from(head, pos + 8)[0],
                    )
                else:
                    tag, vpos, length = self.header(pos, head[pos : pos + 8], explicit)
            else:
                tag, vpos, length = self.header(pos, self.read(pos, 8), explicit)
            if tag >> 16 == 0xFFFE:
                raise _Unsure  # an item or delimiter at top level
            if tag in _WANTED:
                if tag == _PIXEL_DATA and self.pixel_at is None:
                    self.pixel_at = pos
                self.collect(tag, vpos, length)
            if length != _UNDEFINED:
                pos = vpos + length
            else:
                pos = self.skip(self.read(pos, 8), vpos, length, explicit, depth=0)
        return pos

    def skip(self, head: bytes, vpos: int, length: int, explicit: bool, depth: int) -> int:
        """Where the value of an element ends."""
        if length != _UNDEFINED:
            return vpos + length
        # UN of undefined length holds implicit VR little endian (PS3.5 6.2.2).
        return self.sequence(vpos, explicit and head[4:6] != b"UN", depth)

    def sequence(self, pos: int, explicit: bool, depth: int) -> int:
        """Items of an undefined-length sequence (or encapsulated Pixel Data) to its delimiter."""
        while True:
            tag, vpos, length = self.header(pos, self.read(pos, 8), explicit=False)
            if tag == _SEQ_END:
                return vpos
            if tag != _ITEM:
                raise _Unsure
            pos = self.item(vpos, explicit, depth + 1) if length == _UNDEFINED else vpos + length
            if pos > self.size:
                raise _Unsure

    def item(self, pos: int, explicit: bool, depth: int) -> int:
        """An undefined-length item: its elements up to the item delimitation item."""
        if depth > _MAX_DEPTH:
            raise _Unsure
        while True:
            head = self.read(pos, 8)
            tag, vpos, length = self.header(pos, head, explicit)
            if tag == _ITEM_END:
                return vpos
            pos = self.skip(head, vpos, length, explicit, depth)
            if pos > self.size:
                raise _Unsure

    def collect(self, tag: int, vpos: int, length: int) -> None:
        if tag in _UIDS and length <= 128:
            self.values[_UIDS[tag]] = _text(self.read(vpos, length))
        elif tag in _US and length == 2:
            self.numbers[_US[tag]] = struct.unpack("<H", self.read(vpos, 2))[0]
        elif tag == _FRAMES and length <= 16:
            text = _text(self.read(vpos, length))
            self.numbers["frames"] = int(text) if text else 1
        elif tag == _PIXEL_DATA and length != _UNDEFINED:
            self.pixel_len = length

    def pixel_shortfall(self) -> int:
        n = self.numbers
        expected = n.get("rows", 0) * n.get("cols", 0) * n.get("samples", 1)
        expected = (expected * (n.get("frames", 1) or 1) * n.get("bits", 0) + 7) // 8
        return max(0, expected - (self.pixel_len or 0))


def _text(value: bytes) -> str:
    return value.decode("ascii").strip("\x00 ")
