"""One entry point for every source format: sniff the kind of a document and dispatch.

`map_document(data, filename, source)` -> `MapResult(resources, issues)`; unusable documents
raise an `InputError` (ParseError / ValidationError / MappingError) with a one-line reason.
"""

from __future__ import annotations

import json
import re

import structlog
from pydicom.dataset import Dataset

from fhir_gateway.errors import GatewayError, MappingError, ParseError
from fhir_gateway.resources import reference
from mappers import ccda, dicom, fhir, hl7v2
from mappers._common import MapResult
from mappers._xml import parse_xml
from mappers.content import ContentKind, content_kind

log = structlog.get_logger(__name__)

FHIR_NS = "{http://hl7.org/fhir}"
CDA_ROOT = "{urn:hl7-org:v3}ClinicalDocument"
V2_XML_NS = "{urn:hl7-org:v2xml}"
# DICOM JSON's first key is a tag of 8 hex digits (PS3.18 F.2.1); FHIR JSON's is a name.
DICOM_JSON_HEAD = re.compile(rb'\[?\s*\{\s*"[0-9A-Fa-f]{8}"\s*:')
# Offline there is no DICOMweb service: the Endpoint says where the instances came from.
OFFLINE_ENDPOINT = "urn:fhir-gateway:offline-dicom"


# What each kind found by content (mappers/content.py) is dispatched as.
_DISPATCH_KIND: dict[ContentKind, str] = {
    ContentKind.DICOM: "dicom",
    ContentKind.FHIR_JSON: "fhir-json",
    ContentKind.FHIR_NDJSON: "fhir-json",  # fhir.parse_fhir reads NDJSON too
    ContentKind.CCDA: "xml",
    ContentKind.XML: "xml",
    ContentKind.HL7V2: "hl7v2",
    ContentKind.PDF: "pdf",
    ContentKind.TEXT: "text",
}


def sniff(data: bytes, filename: str = "") -> str:
    """The kind to dispatch on, by content (`mappers.content`): fhir-json, dicom-json, xml,
    hl7v2, dicom, pdf, text or '' (unknown). DICOM JSON (a QIDO answer) is told apart from FHIR
    JSON here; a file name is consulted only for a DICOM file without its Part 10 preamble."""
    head = data[:3].removeprefix(b"\xef\xbb\xbf") + data[3:512]
    if DICOM_JSON_HEAD.match(head.lstrip(b" \t\r\n")):
        return "dicom-json"
    kind, _ = content_kind(data)
    if kind == ContentKind.UNKNOWN and filename.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    if kind == ContentKind.TEXT and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "fhir-json"  # JSON without resourceType: the FHIR parser says what is wrong
    if kind == ContentKind.TEXT and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return "xml"  # not well-formed XML: the XML parser says where
    return _DISPATCH_KIND.get(kind, "")


def map_document(data: bytes, filename: str, source: str) -> MapResult:
    """Map one document of any supported kind; raises InputError when it is unusable."""
    kind = sniff(data, filename)
    try:
        result = _dispatch(kind, data, filename, source)
    except GatewayError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        # A mapper bug or an input shape nobody anticipated: still one clear error, logged.
        log.warning("mappers.map.failed", kind=kind, error=type(exc).__name__)
        raise MappingError(
            f"{kind or 'document'} could not be mapped ({type(exc).__name__})",
            source=source,
            path=filename or "$",
        ) from exc
    log.info(
        "mappers.map.ok",
        kind=result.kind,
        resources=len(result.resources),
        issues=len(result.issues),
    )
    return result


def _dispatch(kind: str, data: bytes, filename: str, source: str) -> MapResult:
    if kind == "fhir-json":
        return fhir.document_to_resources(data, source)
    if kind == "hl7v2":
        result = hl7v2.document_to_resources(data, source)
        result.issues += fhir.annotate(result.resources)
        return result
    if kind == "xml":
        root = parse_xml(data, "xml")
        if isinstance(root.tag, str) and root.tag.startswith(FHIR_NS):
            raise ParseError("FHIR XML not supported (send FHIR JSON)", source="fhir")
        if root.tag == CDA_ROOT:
            resources, issues = ccda.document_to_resources(root, source, data)
            issues += fhir.annotate(resources)
            return MapResult(resources, issues, "ccda")
        if isinstance(root.tag, str) and root.tag.startswith(V2_XML_NS):
            raise ParseError("HL7 v2 XML encoding not supported (send ER7)", source="hl7v2")
        raise ParseError("XML document is neither C-CDA nor FHIR", source="xml")
    if kind == "dicom":
        return _map_dicom([dicom.parse_part10(data, check_pixels=True)], source, kind)
    if kind == "dicom-json":
        return _map_dicom(_dicom_json(data, source), source, kind)
    if kind in ("pdf", "text"):
        raise ParseError(
            f"unrecognised format for records: {'PDF' if kind == 'pdf' else 'plain text'} carries"
            " no structured records (a case keeps it as a document: records/documents.py)",
            source="detect",
        )
    raise ParseError(
        "unrecognised format: not FHIR JSON/NDJSON, C-CDA XML, HL7 v2 ER7 or DICOM Part 10",
        source="detect",
    )


def _map_dicom(datasets: list[Dataset], source: str, kind: str) -> MapResult:
    """DICOM instances -> the Patient of their headers, ImagingStudy per study, and Endpoint."""
    if not datasets:
        raise MappingError("DICOM JSON holds no instances", source=source, path="$")
    patient = dicom.dataset_to_patient(datasets[0])
    studies = dicom.datasets_to_imaging_studies(datasets, reference(patient), OFFLINE_ENDPOINT)
    return MapResult([patient, *studies], [], kind)


def _dicom_json(data: bytes, source: str) -> list[Dataset]:
    """DICOM JSON (PS3.18 F.2): one dataset object, or an array of them as QIDO returns."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ParseError("DICOM JSON is not valid JSON", source=source) from exc
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, dict) for item in items):
        raise ParseError("DICOM JSON must be an object or an array of objects", source=source)
    return [dicom.json_to_dataset(item) for item in items]
