"""One entry point for every source format: sniff the kind of a document and dispatch.

`map_document(data, filename, source)` -> `MapResult(resources, issues)`; unusable documents
raise an `InputError` (ParseError / ValidationError / MappingError) with a one-line reason.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import structlog

from fhir_gateway.errors import GatewayError, MappingError, ParseError
from mappers import ccda, fhir, hl7v2
from mappers._common import MapResult, issue
from mappers._xml import parse_xml

log = structlog.get_logger(__name__)

FHIR_NS = "{http://hl7.org/fhir}"
CDA_ROOT = "{urn:hl7-org:v3}ClinicalDocument"
V2_XML_NS = "{urn:hl7-org:v2xml}"


def sniff(data: bytes, filename: str = "") -> str:
    """'fhir-json' | 'xml' | 'hl7v2' | 'dicom' | '' (unknown) from the first bytes."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    head = data[:3].removeprefix(b"\xef\xbb\xbf") + data[3:512]
    head = head.lstrip(b" \t\r\n")
    if head.startswith(b"{"):
        return "fhir-json"
    if head.startswith(b"<"):
        return "xml"
    if head.startswith(b"MSH"):
        return "hl7v2"
    if filename.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    return ""


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
        return _map_dicom(data, source)
    raise ParseError(
        "unrecognised format: not FHIR JSON/NDJSON, C-CDA XML, HL7 v2 ER7 or DICOM Part 10",
        source="detect",
    )


def _map_dicom(data: bytes, source: str) -> MapResult:
    """DICOM goes to mappers.dicom (another module) when it exists; otherwise an issue."""
    if importlib.util.find_spec("mappers.dicom") is None:
        return MapResult(
            [],
            [issue("error", "not-supported", "DICOM mapper not installed; file not mapped")],
            "dicom",
        )
    module: Any = importlib.import_module("mappers.dicom")
    parse = getattr(module, "parse_dataset", None) or getattr(module, "parse_dicom", None)
    if parse is None:
        raise MappingError("mappers.dicom has no parse function", source=source, path="$")
    dataset = parse(data)
    mapped = module.dataset_to_imaging_study(dataset, source=source)
    if isinstance(mapped, MapResult):
        return mapped
    if isinstance(mapped, tuple):
        resources, issues = mapped
        return MapResult(list(resources), list(issues), "dicom")
    resources = mapped if isinstance(mapped, list) else [mapped]
    return MapResult(resources, [], "dicom")
