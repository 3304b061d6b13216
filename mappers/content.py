"""What a document really is, from its bytes (magic numbers and structure), and whether that
agrees with the type it was declared as (an attachment's contentType, an upload's Content-Type).

Kinds: PDF, C-CDA (XML whose root is `ClinicalDocument` in `urn:hl7-org:v3`), other XML, HL7 v2
ER7 (starts with MSH, or a FHS/BHS batch), FHIR JSON, FHIR NDJSON, DICOM Part 10 (`DICM` at
offset 128), plain text, unknown. Pure: no I/O; XML is read with entities, DTDs and network off,
and only up to its root element.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO

from lxml import etree

CDA_NS = "urn:hl7-org:v3"
CDA_ROOT = f"{{{CDA_NS}}}ClinicalDocument"  # HL7 CDA R2 / C-CDA R2.1 document root
FHIR_NS = "http://hl7.org/fhir"
DICOM_MAGIC_OFFSET = 128  # PS3.10 §7.1: 128-byte preamble, then "DICM"
PDF_HEADER_WINDOW = 1024  # readers accept junk before %PDF- within the first 1 KiB
NDJSON_SNIFF_BYTES = 1 << 20  # NDJSON structure is checked over the first 1 MiB
TEXT_SNIFF_BYTES = 8192

_V2_START = re.compile(rb"^(MSH|FHS|BHS)([^A-Za-z0-9\r\n])")  # segment id + field separator
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # allowed: \t \n \f \r


class ContentKind(StrEnum):
    PDF = "pdf"
    CCDA = "ccda"
    XML = "xml"
    HL7V2 = "hl7v2"
    FHIR_JSON = "fhir-json"
    FHIR_NDJSON = "fhir-ndjson"
    DICOM = "dicom"
    TEXT = "text"
    UNKNOWN = "unknown"


# The media type each kind is stored and served as.
MEDIA_TYPES: dict[ContentKind, str] = {
    ContentKind.PDF: "application/pdf",
    ContentKind.CCDA: "application/cda+xml",
    ContentKind.XML: "application/xml",
    ContentKind.HL7V2: "x-application/hl7-v2+er7",
    ContentKind.FHIR_JSON: "application/fhir+json",
    ContentKind.FHIR_NDJSON: "application/fhir+ndjson",
    ContentKind.DICOM: "application/dicom",
    ContentKind.TEXT: "text/plain",
    ContentKind.UNKNOWN: "application/octet-stream",
}

_K = ContentKind
# Declared media type -> the kinds it can honestly carry. Types not listed (octet-stream,
# anything unknown) declare nothing, so they cannot mismatch.
DECLARED_KINDS: dict[str, frozenset[ContentKind]] = {
    "application/pdf": frozenset({_K.PDF}),
    "application/x-pdf": frozenset({_K.PDF}),
    "application/cda+xml": frozenset({_K.CCDA}),
    "application/hl7-cda+xml": frozenset({_K.CCDA}),
    "application/hl7-v3+xml": frozenset({_K.CCDA}),
    "text/xml": frozenset({_K.CCDA, _K.XML}),
    "application/xml": frozenset({_K.CCDA, _K.XML}),
    "application/fhir+json": frozenset({_K.FHIR_JSON}),
    "application/json+fhir": frozenset({_K.FHIR_JSON}),
    "application/json": frozenset({_K.FHIR_JSON, _K.TEXT}),
    "application/fhir+ndjson": frozenset({_K.FHIR_NDJSON}),
    "application/ndjson": frozenset({_K.FHIR_NDJSON}),
    "application/x-ndjson": frozenset({_K.FHIR_NDJSON}),
    "x-application/hl7-v2+er7": frozenset({_K.HL7V2}),
    "application/hl7-v2": frozenset({_K.HL7V2}),
    "application/hl7-v2+er7": frozenset({_K.HL7V2}),
    "application/edi-hl7": frozenset({_K.HL7V2}),
    "application/dicom": frozenset({_K.DICOM}),
    "text/plain": frozenset({_K.TEXT}),
}


@dataclass(frozen=True)
class Identification:
    """The real kind of a document and how it compares with its declared type."""

    kind: ContentKind
    declared_type: str  # normalised (lower case, no parameters); "" when none was given
    mismatch: bool  # the declared type names kinds that this content is not
    detail: str = ""  # e.g. the XML root element, or why JSON is not FHIR

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.kind]


def identify(data: bytes, declared_type: str | None = None) -> Identification:
    """The kind of `data` by content, compared with `declared_type` (a Content-Type value)."""
    kind, detail = content_kind(data)
    declared = normalise_media_type(declared_type)
    allowed = DECLARED_KINDS.get(declared)
    mismatch = allowed is not None and kind not in allowed
    return Identification(kind, declared, mismatch, detail)


def normalise_media_type(value: str | None) -> str:
    """`Application/PDF; name=x.pdf` -> `application/pdf`."""
    return (value or "").split(";")[0].strip().lower()


def content_kind(data: bytes) -> tuple[ContentKind, str]:
    """(kind, detail) from the bytes alone; the declared type is never consulted."""
    if len(data) >= DICOM_MAGIC_OFFSET + 4 and (
        data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"
    ):
        return ContentKind.DICOM, "Part 10 preamble"
    if b"%PDF-" in data[:PDF_HEADER_WINDOW]:
        return ContentKind.PDF, ""
    head = _text_head(data)
    if head is None:
        return ContentKind.UNKNOWN, "binary"
    start = head.lstrip(b" \t\r\n\x0b")  # \x0b: an MLLP start block left on a v2 message
    if _V2_START.match(start):
        return ContentKind.HL7V2, start[:3].decode()
    if start.startswith(b"<"):
        return _xml_kind(data)
    if start.startswith((b"{", b"[")):
        return _json_kind(head)
    if _is_text(head):
        return ContentKind.TEXT, ""
    return ContentKind.UNKNOWN, "binary"


def _text_head(data: bytes) -> bytes | None:
    """The data as UTF-8 (a UTF-8 BOM removed, UTF-16 re-encoded), or None if it is not text."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            return None
    return data


def _is_text(data: bytes) -> bool:
    sample = data[:TEXT_SNIFF_BYTES]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 3:  # not just a character cut at the sample's end
            try:
                text = sample.decode("cp1252")  # v2 and old text exports are often 8-bit
            except UnicodeDecodeError:
                return False
        else:
            text = sample[: exc.start].decode("utf-8")
    return bool(text.strip()) and not _TEXT_CONTROL.search(text)


def _xml_kind(data: bytes) -> tuple[ContentKind, str]:
    """C-CDA or other XML, from the root element only (iterparse stops at the first start)."""
    events = etree.iterparse(
        BytesIO(data),
        events=("start",),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
    )
    try:
        for _, element in events:
            tag = element.tag
            if tag == CDA_ROOT:
                return ContentKind.CCDA, "ClinicalDocument"
            return ContentKind.XML, str(tag)
    except etree.XMLSyntaxError:
        pass
    return (ContentKind.TEXT if _is_text(data) else ContentKind.UNKNOWN), "not well-formed XML"


def _json_kind(data: bytes) -> tuple[ContentKind, str]:
    """FHIR JSON (one object with resourceType), FHIR NDJSON (one resource per line), or text."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    else:
        if isinstance(doc, dict) and isinstance(doc.get("resourceType"), str):
            return ContentKind.FHIR_JSON, doc["resourceType"]
        if not _is_text(data):
            return ContentKind.UNKNOWN, "binary"
        return ContentKind.TEXT, "JSON without resourceType"
    if _is_ndjson(data):
        return ContentKind.FHIR_NDJSON, ""
    return (ContentKind.TEXT if _is_text(data) else ContentKind.UNKNOWN), "not well-formed JSON"


def _is_ndjson(data: bytes) -> bool:
    """Every complete line in the first MiB is a JSON object with a resourceType (blank lines
    and CRLF allowed), and there is at least one."""
    sample = data[:NDJSON_SNIFF_BYTES]
    lines = sample.split(b"\n")
    if len(data) > NDJSON_SNIFF_BYTES:
        lines = lines[:-1]  # the last line may be cut by the sample
    seen = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            return False
        if not (isinstance(doc, dict) and isinstance(doc.get("resourceType"), str)):
            return False
        seen += 1
    return seen >= 1


__all__ = [
    "CDA_ROOT",
    "DECLARED_KINDS",
    "MEDIA_TYPES",
    "ContentKind",
    "Identification",
    "content_kind",
    "identify",
    "normalise_media_type",
]
