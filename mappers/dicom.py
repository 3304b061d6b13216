"""DICOM instances (pydicom Datasets or DICOM JSON, PS3.18 F) -> FHIR R4 ImagingStudy + Endpoint.

Pure: no I/O, no clock, ids derived from DICOM UIDs. Text values are decoded by pydicom from each
dataset's Specific Character Set (ISO 2022 escapes for Japanese/Korean/Chinese included).
Structure follows the DICOM information model: study -> series -> instance.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import PersonName

from fhir_gateway.errors import MappingError, ParseError
from fhir_gateway.resources import (
    DICOM_UID,
    SNOMED,
    Resource,
    coding,
    compact,
    deterministic_id,
    reference,
)

# FHIR R4 ImagingStudy: modality codes are from DICOM CID 29, system
# http://dicom.nema.org/resources/ontology/DCM; sopClass system is urn:ietf:rfc:3986.
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RFC3986 = "urn:ietf:rfc:3986"
ENDPOINT_CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
# VL Whole Slide Microscopy Image Storage (PS3.4 B.5).
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
WSI_IMAGE_TYPES = ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL")
# Patient ID without a FHIR system: the issuer (0010,0021), percent-encoded, names it.
DICOM_ISSUER_SYSTEM = "urn:fhir-gateway:dicom-issuer"
# Patient's Sex (0010,0040) -> FHIR AdministrativeGender.
_SEX = {"M": "male", "F": "female", "O": "other"}
# Laterality (0020,0060) / Image Laterality (0020,0062) -> SNOMED CT (DICOM CID 244).
LATERALITY = {
    "R": ("24028007", "Right"),
    "L": ("7771000", "Left"),
    "B": ("51440002", "Right and left"),
}
_BODY_PART: dict[str, list[str]] = {
    k: v
    for k, v in json.loads(
        (Path(__file__).parent / "codes" / "dicom-body-part.json").read_text(encoding="utf-8")
    ).items()
    if not k.startswith("_")
}


def parse_part10(data: bytes, *, check_pixels: bool = False) -> Dataset:
    """Parse a DICOM Part 10 file's header (pixels skipped). With `check_pixels`, a file whose
    native Pixel Data is shorter than its image size (a truncated file) is refused too.

    Raises:
        ParseError: not a Part 10 file, or truncated.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not check_pixels)
    except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        raise ParseError(f"not a DICOM Part 10 file: {exc}", source="dicom") from exc
    if check_pixels and "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        with warnings.catch_warnings():  # pydicom warns on an invalid IS; refused below
            warnings.simplefilter("ignore")
            raw_frames = ds.get("NumberOfFrames") or 1
        try:
            frames = int(raw_frames)
        except ValueError as exc:
            raise ParseError("DICOM Number of Frames is not an integer", source="dicom") from exc
        expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8 * frames
        if len(ds.PixelData) < expected:
            raise ParseError(
                "DICOM file is truncated (Pixel Data shorter than the image)", source="dicom"
            )
    return ds


def json_to_dataset(data: Mapping[str, Any]) -> Dataset:
    """A DICOM JSON dataset (QIDO/WADO metadata) as a pydicom Dataset; bulk data left empty.

    Raises:
        ParseError: not a DICOM JSON dataset.
    """
    # pydicom inspects a handler's signature once per element: only pass one when needed.
    handler = _no_bulk if "BulkDataURI" in json.dumps(data) else None
    try:
        return Dataset.from_json(dict(data), bulk_data_uri_handler=handler)
    except (ValueError, KeyError, TypeError) as exc:
        raise ParseError(f"not a DICOM JSON dataset: {exc}", source="dicom") from exc


def _no_bulk(_tag: str, _vr: str, _uri: str) -> bytes:
    return b""


def _as_dataset(item: Dataset | Mapping[str, Any]) -> Dataset:
    return item if isinstance(item, Dataset) else json_to_dataset(item)


def person_name_to_human_names(pn: PersonName | str | None) -> list[dict[str, Any]]:
    """A DICOM PN as FHIR HumanNames, one per non-empty component group (PS3.5 6.2.1).

    The alphabetic group is the `official` name; ideographic and phonetic groups follow as
    further names (`usual`), each with its own text. Values are Unicode as pydicom decoded them.
    """
    if pn is None or str(pn) == "":
        return []
    name = pn if isinstance(pn, PersonName) else PersonName(str(pn))
    out = []
    for use, group in (
        ("official", name.alphabetic),
        ("usual", name.ideographic),
        ("usual", name.phonetic),
    ):
        if not group:
            continue
        parts = group.split("^") + [""] * 5
        family, given, middle, prefix, suffix = parts[:5]
        out.append(
            compact(
                {
                    "use": use,
                    "text": " ".join(p for p in (prefix, given, middle, family, suffix) if p),
                    "family": family,
                    "given": [g for g in (given, middle) if g],
                    "prefix": [prefix] if prefix else [],
                    "suffix": [suffix] if suffix else [],
                }
            )
        )
    return out


def dataset_patient_name(item: Dataset | Mapping[str, Any]) -> str:
    """Patient's Name (0010,0010) decoded to Unicode ('' when absent), groups joined by '='."""
    pn = _as_dataset(item).get("PatientName")
    return "" if pn is None else str(pn)


def dataset_to_patient(item: Dataset | Mapping[str, Any]) -> Resource:
    """The Patient named by an instance's Patient module (PS3.3 C.7.1.1): the Patient ID with
    its issuer, name, birth date and sex. Used where no referral names the patient (offline map).
    """
    ds = _as_dataset(item)
    patient_id, issuer = _text(ds.get("PatientID")), _text(ds.get("IssuerOfPatientID"))
    system = f"{DICOM_ISSUER_SYSTEM}:{quote(issuer, safe='')}" if issuer else DICOM_ISSUER_SYSTEM
    birth = _text(ds.get("PatientBirthDate"))
    patient: Resource = compact(
        {
            "resourceType": "Patient",
            "id": deterministic_id("Patient", "dicom", issuer, patient_id),
            "identifier": [{"system": system, "value": patient_id}] if patient_id else [],
            "name": person_name_to_human_names(ds.get("PatientName")),
            "birthDate": f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}" if len(birth) == 8 else None,
            "gender": _SEX.get(_text(ds.get("PatientSex")).upper()),
        }
    )
    return patient


def endpoint_resource(endpoint_url: str) -> Resource:
    """The Endpoint a reviewer's viewer uses: DICOMweb WADO-RS at `endpoint_url` (FHIR R4)."""
    return {
        "resourceType": "Endpoint",
        "id": deterministic_id("Endpoint", "dicom-wado-rs", endpoint_url),
        "status": "active",
        "connectionType": coding(ENDPOINT_CONNECTION_TYPE, "dicom-wado-rs", "DICOM WADO-RS"),
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": endpoint_url,
    }


# What `datasets_to_imaging_studies` reads of each instance: a caller holding DICOM JSON may
# hand it only these attributes (pydicom's from_json costs per attribute).
IMAGING_STUDY_KEYWORDS = (
    "AccessionNumber",
    "BodyPartExamined",
    "ImageLaterality",
    "ImageType",
    "InstanceNumber",
    "Laterality",
    "Modality",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesDate",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesTime",
    "StudyDate",
    "StudyDescription",
    "StudyInstanceUID",
    "StudyTime",
    "TimezoneOffsetFromUTC",
)


def datasets_to_imaging_studies(
    datasets: Iterable[Dataset | Mapping[str, Any]], subject: dict[str, str], endpoint_url: str
) -> list[Resource]:
    """All studies found in `datasets`: one Endpoint first, then one ImagingStudy per study."""
    by_study: dict[str, list[Dataset]] = {}
    for i, item in enumerate(datasets):
        ds = _as_dataset(item)
        uid = _uid(ds, "StudyInstanceUID", f"dataset[{i}]")
        by_study.setdefault(uid, []).append(ds)
    out = [endpoint_resource(endpoint_url)]
    for group in by_study.values():
        out.append(_study(group, subject, out[0]))
    return out


def datasets_to_imaging_study(
    datasets: Iterable[Dataset | Mapping[str, Any]], subject: dict[str, str], endpoint_url: str
) -> tuple[Resource, Resource]:
    """(ImagingStudy, Endpoint) for the instances of ONE study.

    Raises:
        MappingError: no datasets, several studies, or an instance without its UIDs.
    """
    resources = datasets_to_imaging_studies(datasets, subject, endpoint_url)
    if len(resources) != 2:
        raise MappingError(
            f"expected instances of one study, got {len(resources) - 1}",
            source="dicom",
            path="StudyInstanceUID",
        )
    return resources[1], resources[0]


def dataset_to_imaging_study(
    dataset: Dataset | Mapping[str, Any], subject: dict[str, str], endpoint_url: str
) -> tuple[Resource, Resource]:
    """(ImagingStudy, Endpoint) from a single instance (or a QIDO study-level dataset)."""
    return datasets_to_imaging_study([dataset], subject, endpoint_url)


def _study(instances: list[Dataset], subject: dict[str, str], endpoint: Resource) -> Resource:
    first = instances[0]
    study_uid = str(first.StudyInstanceUID)
    series: dict[str, list[Dataset]] = {}
    for i, ds in enumerate(instances):
        series.setdefault(_uid(ds, "SeriesInstanceUID", f"instance[{i}]"), []).append(ds)
    series_out = [_series(uid, group) for uid, group in series.items()]
    series_out.sort(key=lambda s: (s.get("number", 0), s["uid"]))
    modalities = {s["modality"]["code"]: s["modality"] for s in series_out if "modality" in s}
    accession = first.get("AccessionNumber")
    study: Resource = {
        "resourceType": "ImagingStudy",
        "id": deterministic_id("ImagingStudy", study_uid),
        "identifier": [
            {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"},
            {
                "type": {"coding": [coding(V2_0203, "ACSN")]},
                "value": str(accession) if accession else None,
            },
        ],
        "status": "available",
        "modality": list(modalities.values()),
        "subject": subject,
        "started": _date_time(first.get("StudyDate"), first.get("StudyTime"), first),
        "numberOfSeries": len(series_out),
        "numberOfInstances": sum(s["numberOfInstances"] for s in series_out),
        "description": _text(first.get("StudyDescription")),
        "endpoint": [reference(endpoint)],
        "series": series_out,
    }
    resource: Resource = compact(study)
    return resource


def _series(series_uid: str, instances: list[Dataset]) -> dict[str, Any]:
    first = instances[0]
    instances_out = [_instance(ds, f"series[{series_uid}]") for ds in instances]
    instances_out.sort(key=lambda i: (i.get("number", 0), i["uid"]))
    modality = _text(first.get("Modality"))
    laterality = _text(first.get("Laterality") or first.get("ImageLaterality")).upper()
    description = _text(first.get("SeriesDescription"))
    if str(first.get("SOPClassUID", "")) == WSI_SOP_CLASS:
        description = _wsi_description(instances, description)
    number = first.get("SeriesNumber")
    return {
        "uid": series_uid,
        "number": int(number) if number not in (None, "") else None,
        "modality": coding(DCM, modality) if modality else None,
        "description": description,
        "numberOfInstances": len(instances_out),
        "bodySite": _body_site(_text(first.get("BodyPartExamined"))),
        "laterality": coding(SNOMED, *LATERALITY[laterality]) if laterality in LATERALITY else None,
        "started": _date_time(first.get("SeriesDate"), first.get("SeriesTime"), first),
        "instance": instances_out,
    }


def _instance(ds: Dataset, path: str) -> dict[str, Any]:
    sop_uid = _uid(ds, "SOPInstanceUID", path)
    sop_class = _uid(ds, "SOPClassUID", f"{path}/instance[{sop_uid}]")
    number = ds.get("InstanceNumber")
    title = None
    if sop_class == WSI_SOP_CLASS:
        title = _wsi_image_type(ds)
    return {
        "uid": sop_uid,
        "sopClass": coding(RFC3986, f"urn:oid:{sop_class}"),
        "number": int(number) if number not in (None, "") else None,
        "title": title,
    }


def _wsi_image_type(ds: Dataset) -> str | None:
    """VOLUME / LABEL / OVERVIEW / THUMBNAIL: Image Type value 3 of a WSI (PS3.3 C.8.12.4.1.1)."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return image_type[2] if len(image_type) > 2 and image_type[2] in WSI_IMAGE_TYPES else None


def _wsi_description(instances: list[Dataset], description: str) -> str:
    counts: dict[str, int] = {}
    for ds in instances:
        kind = _wsi_image_type(ds) or "OTHER"
        counts[kind] = counts.get(kind, 0) + 1
    kinds = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(counts.items()))
    summary = f"Whole slide microscopy: {kinds}"
    return f"{description} ({summary})" if description else summary


def _body_site(term: str) -> dict[str, str] | None:
    if not term:
        return None
    known = _BODY_PART.get(term.upper())
    if known:
        return coding(SNOMED, known[0], known[1])
    return {"display": term}  # a local term without a code: keep it as text


def _uid(ds: Dataset, keyword: str, path: str) -> str:
    value = ds.get(keyword)
    if not value:
        raise MappingError(f"DICOM instance lacks {keyword}", source="dicom", path=path)
    return str(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _date_time(date: Any, time: Any, ds: Dataset) -> str | None:
    """FHIR dateTime from DA + TM. FHIR requires a zone with a time, so without Timezone Offset
    From UTC (0008,0201) only the date is kept rather than guessing the zone."""
    d = _text(date)
    if len(d) != 8 or not d.isdigit():
        return None
    out = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    t = _text(time)
    tz = _text(ds.get("TimezoneOffsetFromUTC"))
    if len(t) >= 4 and t[:4].isdigit() and len(tz) == 5 and tz[0] in "+-":
        seconds = t[4:6] if len(t) >= 6 and t[4:6].isdigit() else "00"
        out += f"T{t[:2]}:{t[2:4]}:{seconds}{tz[:3]}:{tz[3:]}"
    return out
