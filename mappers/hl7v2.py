"""HL7 v2 ORU^R01 (2.3 - 2.5.1) -> DiagnosticReport + Observations + Specimen + Patient.

Follows the HL7 v2-to-FHIR ORU_R01 message map and the OBR/OBX/SPM/PID segment maps
(STANDARDS.md V2-03..V2-05). Parsing uses the `hl7` package (it reads the delimiters from MSH);
`_Segment` is the one typed wrapper around it. Segments we do not map are reported as issues.
"""

from __future__ import annotations

import base64
import html
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import hl7

from fhir_gateway.errors import ParseError
from fhir_gateway.resources import (
    LOINC,
    SNOMED,
    UCUM,
    Resource,
    codeable_concept,
    coding,
    compact,
    deterministic_id,
    reference,
)
from mappers._common import Issue, MapResult, hl7_ts_to_datetime, issue, source_uri
from mappers.terminology import terminology

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0078 = "http://terminology.hl7.org/CodeSystem/v2-0078"
V2_0487 = "http://terminology.hl7.org/CodeSystem/v2-0487"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")

# V2-04: OBR-25 -> DiagnosticReport.status, OBX-11 -> Observation.status.
OBR_STATUS = {
    "F": "final", "P": "preliminary", "C": "corrected", "A": "partial", "R": "partial",
    "I": "registered", "O": "registered", "S": "registered", "X": "cancelled",
    "Y": "unknown", "Z": "unknown",
}  # fmt: skip
OBX_STATUS = {
    "F": "final", "P": "preliminary", "C": "corrected", "A": "amended", "D": "entered-in-error",
    "W": "entered-in-error", "X": "cancelled", "R": "preliminary", "S": "preliminary",
    "I": "registered", "U": "final",
}  # fmt: skip
GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
# HL7 table 0396 names -> FHIR system (only the ones a result message uses).
V2_SYSTEMS = {"LN": LOINC, "SCT": SNOMED, "SNM": SNOMED}
_MAPPED = {"MSH", "PID", "OBR", "OBX", "NTE", "SPM"}
# Fields of each mapped segment that the mapper reads (set ids and encoding characters count as
# read); any other populated field is reported as an issue with its path (nothing dropped
# silently, DESIGN.md).
MAPPED_FIELDS: dict[str, frozenset[int]] = {
    "MSH": frozenset({1, 2, 9, 10, 12, 18}),
    "PID": frozenset({1, 3, 5, 7, 8, 11, 13, 14, 29, 30}),
    "OBR": frozenset({1, 2, 3, 4, 7, 22, 24, 25}),
    "OBX": frozenset({1, 2, 3, 4, 5, 6, 7, 8, 11, 14}),
    "NTE": frozenset({1, 3}),
    "SPM": frozenset({1, 2, 4, 17, 30}),
}
_OID_RE = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Segment:
    """Typed access to one `hl7` segment: `get(field, component, repetition, subcomponent)`."""

    raw: Any
    index: int  # position of this segment type in the message (1-based), for paths
    escape: str

    @property
    def name(self) -> str:
        return str(self.raw[0])

    @property
    def path(self) -> str:
        return f"{self.name}[{self.index}]"

    def get(self, f: int, comp: int = 1, rep: int = 1, sub: int = 1) -> str:
        if f >= len(self.raw):
            return ""
        value: Any = self.raw[f]
        for index in (rep, comp, sub):
            if isinstance(value, str):
                return value if index == 1 else ""
            if index > len(value):
                return ""
            value = value[index - 1]
        return value if isinstance(value, str) else str(value)

    def repetitions(self, f: int) -> int:
        if f >= len(self.raw) or isinstance(self.raw[f], str):
            return 1
        return len(self.raw[f])

    def text(self, f: int, comp: int = 1, rep: int = 1) -> str:
        """A field as text: FT `\\.br\\` line breaks and the escape sequences decoded."""
        value = self.get(f, comp, rep)
        value = value.replace(f"{self.escape}.br{self.escape}", "\n")
        return _unescape(value, self.escape)


def _unescape(value: str, esc: str) -> str:
    if esc not in value:
        return value
    table = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
    return re.sub(
        re.escape(esc) + r"([FSTRE])" + re.escape(esc), lambda m: table[m.group(1)], value
    )


@dataclass
class Message:
    segments: list[_Segment]
    version: str
    message_type: str
    control_id: str


def parse_message(data: bytes) -> list[Message]:
    """ER7 bytes (CR, LF or CRLF segment ends; BOM; any delimiters) -> messages."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")  # MSH-18 8859/1 senders
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise ParseError("HL7 v2 message must start with an MSH segment", source="hl7v2")
    separator = lines[0][3]
    if separator.isalnum() or separator.isspace():
        raise ParseError("MSH-1 field separator is not a delimiter", source="hl7v2")
    chunks: list[list[str]] = []
    for number, line in enumerate(lines, start=1):
        if line.startswith("MSH"):
            chunks.append([])
        if len(line) < 3 or not line[:3].isalnum() or (len(line) > 3 and line[3] != separator):
            raise ParseError(
                f"line {number} is not an HL7 v2 segment",
                source="hl7v2",
            )
        chunks[-1].append(line)
    return [_parse_one(chunk) for chunk in chunks]


def _parse_one(lines: list[str]) -> Message:
    try:
        parsed = hl7.parse("\r".join(lines))
    except Exception as exc:  # the hl7 package raises bare exceptions on malformed MSH
        raise ParseError(
            f"HL7 v2 message not parseable: {type(exc).__name__}", source="hl7v2"
        ) from exc
    escape = lines[0][6] if len(lines[0]) > 6 else "\\"
    counts: dict[str, int] = {}
    segments: list[_Segment] = []
    for raw in parsed:
        name = str(raw[0])
        counts[name] = counts.get(name, 0) + 1
        segments.append(_Segment(raw, counts[name], escape))
    msh = segments[0]
    kind = "^".join(p for p in (msh.get(9, 1), msh.get(9, 2)) if p)
    return Message(segments, msh.get(12), kind, msh.get(10))


# --------------------------------------------------------------------------- datatypes


def ts_to_datetime(value: str) -> tuple[str | None, bool]:
    """v2 TS/DTM -> FHIR dateTime; (value, precision_lost)."""
    return hl7_ts_to_datetime(value)


def cwe_to_concept(seg: _Segment, f: int, rep: int = 1) -> dict[str, Any] | None:
    codings = []
    for offset in (0, 3):  # identifier^text^system and alternate identifier^text^system
        code = seg.get(f, 1 + offset, rep)
        system = seg.get(f, 3 + offset, rep)
        if code:
            canonical = V2_SYSTEMS.get(system) or terminology().canonical_system(system)
            sys = canonical or (
                f"http://terminology.hl7.org/CodeSystem/v2-{system[3:]}"
                if system.startswith("HL7") and system[3:].isdigit()
                else _urn("v2-coding-system", system or "local")
            )
            codings.append(coding(sys, code, seg.text(f, 2 + offset, rep) or None))
    text = seg.text(f, 9, rep) or seg.text(f, 2, rep) or None
    if not codings and not text:
        return None
    concept: dict[str, Any] = codeable_concept(*codings, text=text)
    return concept


def _urn(kind: str, name: str) -> str:
    """A valid URI for a v2 name: an OID as `urn:oid:`, else our URN with the name
    percent-encoded (RFC 8141 allows %-escapes; spaces and other delimiters never appear raw)."""
    if _OID_RE.fullmatch(name):
        return f"urn:oid:{name}"
    return f"urn:fhir-gateway:{kind}:{urllib.parse.quote(name, safe='-._~')}"


def _authority_system(namespace: str, universal_id: str, id_type: str) -> str | None:
    """HD assigning authority -> Identifier.system: the universal id (ISO OID or URI) when
    given, else the namespace id as a URN."""
    if universal_id and id_type.upper() == "ISO" and _OID_RE.fullmatch(universal_id):
        return f"urn:oid:{universal_id}"
    if universal_id and id_type.upper() in ("URI", "URL") and " " not in universal_id:
        return universal_id
    name = namespace or universal_id
    return _urn("v2-assigning-authority", name) if name else None


def _identifier(
    value: str, authority: str, type_code: str, universal_id: str = "", id_type: str = ""
) -> dict[str, Any]:
    out: dict[str, Any] = compact(
        {
            "system": _authority_system(authority, universal_id, id_type),
            "value": value,
            "type": codeable_concept(coding(V2_0203, type_code)) if type_code else None,
        }
    )
    return out


# --------------------------------------------------------------------------- mapping


@dataclass
class _Order:
    report: Resource
    narrative: list[str] = field(default_factory=list)
    specimen: Resource | None = None


@dataclass
class _State:
    source: str
    message: Message
    issues: list[Issue]
    resources: list[Resource] = field(default_factory=list)
    patient: Resource | None = None
    order: _Order | None = None
    last: Resource | None = None  # the resource an NTE attaches to
    authorities: dict[str, str] = field(default_factory=dict)  # PID-3.4 namespace -> system


def message_to_resources(
    message: Message, source: str, authorities: dict[str, str] | None = None
) -> tuple[list[Resource], list[Issue]]:
    """One parsed ORU^R01 message -> FHIR resources + issues. `authorities` maps a PID-3.4
    namespace id to the identifier system the sender's organisation uses (partners file)."""
    state = _State(source, message, [], authorities=dict(authorities or {}))
    if message.version not in SUPPORTED_VERSIONS:
        state.issues.append(
            issue(
                "warning",
                "not-supported",
                f"HL7 v2 version {message.version or 'missing'} outside 2.3-2.5.1; mapped as 2.5.1",
                "MSH[1].12",
            )
        )
    if message.message_type != "ORU^R01":
        state.issues.append(
            issue(
                "warning",
                "not-supported",
                f"message type {message.message_type or 'missing'} is not ORU^R01; only "
                "PID/OBR/OBX/SPM/NTE segments are mapped",
                "MSH[1].9",
            )
        )
    for seg in message.segments:
        handler = _HANDLERS.get(seg.name)
        if handler is None:
            state.issues.append(
                issue("information", "not-supported", f"segment {seg.name} not mapped", seg.path)
            )
            continue
        handler(seg, state)
        _report_unmapped_fields(seg, state)
    _finish_order(state)
    for resource in state.resources:
        resource.setdefault("meta", {})["source"] = source_uri(source)
    return state.resources, state.issues


def _msh(seg: _Segment, state: _State) -> None:
    return None


def _populated(seg: _Segment, f: int) -> bool:
    if f >= len(seg.raw):
        return False
    return any(ch.isalnum() for ch in str(seg.raw[f]))


def _report_unmapped_fields(seg: _Segment, state: _State) -> None:
    """Every populated field the mapper does not read becomes an issue with its path."""
    mapped = MAPPED_FIELDS.get(seg.name, frozenset())
    for f in range(1, len(seg.raw)):
        if f not in mapped and _populated(seg, f):
            state.issues.append(
                issue(
                    "information",
                    "not-supported",
                    f"{seg.name}-{f} not mapped",
                    f"{seg.path}.{f}",
                )
            )


def pid_to_patient(seg: _Segment, state: _State) -> None:
    ident = seg.get(3)
    authority = seg.get(3, 4, sub=1) or seg.get(3, 4, sub=2)
    if not ident:
        state.issues.append(issue("error", "required", "PID-3 has no patient identifier", seg.path))
    key = f"{authority}|{ident}" if ident else f"{state.message.control_id}|{seg.path}"
    identifiers = [
        _identifier(
            seg.get(3, 1, rep),
            seg.get(3, 4, rep, 1),
            seg.get(3, 5, rep),
            seg.get(3, 4, rep, 2),
            seg.get(3, 4, rep, 3),
        )
        for rep in range(1, seg.repetitions(3) + 1)
        if seg.get(3, 1, rep)
    ]
    for entry, rep in zip(identifiers, range(1, seg.repetitions(3) + 1), strict=False):
        known = state.authorities.get(seg.get(3, 4, rep, 1))
        if known:
            entry["system"] = known
    birth, _ = ts_to_datetime(seg.get(7))
    patient: Resource = compact(
        {
            "resourceType": "Patient",
            "id": deterministic_id(state.source, "Patient", key),
            "identifier": identifiers,
            "name": [
                {
                    "family": seg.text(5, 1),
                    "given": [g for g in (seg.text(5, 2), seg.text(5, 3)) if g],
                }
            ],
            "gender": GENDER.get(seg.get(8)),
            "birthDate": birth[:10] if birth else None,
            "telecom": _telecoms(seg, 13, "home") + _telecoms(seg, 14, "work"),
            "deceasedDateTime": _ts(seg, 29, state),
            "deceasedBoolean": (
                {"Y": True, "N": False}.get(seg.get(30).upper()) if not seg.get(29) else None
            ),
            "address": [
                {
                    "line": [x for x in (seg.text(11, 1), seg.text(11, 2)) if x],
                    "city": seg.text(11, 3),
                    "state": seg.text(11, 4),
                    "postalCode": seg.text(11, 5),
                    "country": seg.text(11, 6),
                }
            ],
        }
    )
    if state.patient is None:
        state.patient = patient
        state.resources.append(patient)
    else:
        state.issues.append(issue("warning", "duplicate", "second PID segment ignored", seg.path))
    state.last = None


def _telecoms(seg: _Segment, f: int, use: str) -> list[dict[str, Any]]:
    """XTN repetitions -> ContactPoint (XTN-1 legacy number, or XTN-4 email / XTN-6..7 number)."""
    out: list[dict[str, Any]] = []
    for rep in range(1, seg.repetitions(f) + 1):
        email = seg.text(f, 4, rep)
        number = seg.text(f, 1, rep) or "".join(seg.text(f, c, rep) for c in (6, 7))
        if email and seg.get(f, 3, rep).upper() in ("INTERNET", "X.400", ""):
            out.append({"system": "email", "value": email, "use": use})
        elif number:
            kind = "fax" if seg.get(f, 3, rep).upper() == "FX" else "phone"
            out.append({"system": kind, "value": number, "use": use})
    return out


def obr_to_diagnostic_report(seg: _Segment, state: _State) -> None:
    _finish_order(state)
    placer, filler = seg.get(2), seg.get(3)
    key = filler or placer or f"{state.message.control_id}|{seg.path}"
    status = OBR_STATUS.get(seg.get(25))
    if status is None:
        state.issues.append(
            issue(
                "warning",
                "code-invalid",
                f"OBR-25 {seg.get(25) or 'empty'!r} mapped to unknown",
                seg.path + ".25",
            )
        )
    code = cwe_to_concept(seg, 4)
    if code is None:
        state.issues.append(
            issue("error", "required", "OBR-4 has no service code", seg.path + ".4")
        )
        code = {"text": "unknown"}
    effective = _ts(seg, 7, state)
    issued = _ts(seg, 22, state)
    section = seg.get(24)
    report: Resource = compact(
        {
            "resourceType": "DiagnosticReport",
            "id": deterministic_id(state.source, "DiagnosticReport", key),
            "identifier": [
                _identifier(placer, seg.get(2, 2), "PLAC") if placer else None,
                _identifier(filler, seg.get(3, 2), "FILL") if filler else None,
            ],
            "status": status or "unknown",
            "category": [codeable_concept(coding(V2_0074, section))] if section else None,
            "code": code,
            "subject": reference(state.patient) if state.patient else None,
            "effectiveDateTime": effective,
            "issued": issued if issued and "T" in issued else None,
        }
    )
    state.order = _Order(report)
    state.last = report


def _ts(seg: _Segment, f: int, state: _State) -> str | None:
    value, lost = ts_to_datetime(seg.get(f))
    if lost:
        state.issues.append(
            issue(
                "information",
                "value",
                f"{seg.name}-{f} time without zone kept to date precision",
                f"{seg.path}.{f}",
            )
        )
    return value


def obx_to_observation(seg: _Segment, state: _State) -> None:
    order = state.order
    value_type = seg.get(2)
    code = cwe_to_concept(seg, 3)
    if value_type == "ED":
        _ed_to_attachment(seg, state)
        return
    if value_type in ("TX", "FT") and order is not None:
        order.narrative.append(
            "\n".join(seg.text(5, rep=r) for r in range(1, seg.repetitions(5) + 1))
        )
        if code is None:
            state.last = None
            return  # report text only: kept in the DiagnosticReport narrative
    if code is None:
        state.issues.append(
            issue("error", "required", "OBX-3 has no observation code; skipped", seg.path + ".3")
        )
        return
    report_key = order.report["id"] if order else state.message.control_id
    obs: Resource = {
        "resourceType": "Observation",
        "id": deterministic_id(
            state.source, "Observation", report_key, seg.get(1) or seg.path, seg.get(3), seg.get(4)
        ),
        "status": OBX_STATUS.get(seg.get(11), "unknown"),
        "category": [codeable_concept(coding(OBS_CATEGORY, _obs_category(order)))],
        "code": code,
    }
    if state.patient:
        obs["subject"] = reference(state.patient)
    effective = _ts(seg, 14, state) or (order.report.get("effectiveDateTime") if order else None)
    if effective:
        obs["effectiveDateTime"] = effective
    _obx_value(seg, value_type, obs, state)
    if seg.get(7):
        obs["referenceRange"] = [{"text": seg.text(7)}]
    interpretation = seg.get(8)
    if interpretation:
        obs["interpretation"] = [codeable_concept(coding(V2_0078, interpretation))]
    if order is not None:
        if order.specimen is not None:
            obs["specimen"] = reference(order.specimen)
        order.report.setdefault("result", []).append(reference(obs))
    else:
        state.issues.append(issue("warning", "structure", "OBX before any OBR", seg.path))
    state.resources.append(compact(obs))
    state.last = state.resources[-1]


def _obs_category(order: _Order | None) -> str:
    sections = (
        {c["code"] for cat in (order.report.get("category") or []) for c in cat["coding"]}
        if order
        else set()
    )
    if sections & {"RAD", "CT", "NMR", "RUS", "RX", "US", "NMS"}:
        return "imaging"
    return "laboratory"


def _obx_value(seg: _Segment, value_type: str, obs: Resource, state: _State) -> None:
    raw = seg.get(5)
    if seg.repetitions(5) > 1 and value_type not in ("TX", "FT"):
        state.issues.append(
            issue(
                "warning", "multiple-matches", "OBX-5 repeats; first value mapped", seg.path + ".5"
            )
        )
    if not raw and value_type != "SN":
        obs["dataAbsentReason"] = codeable_concept(coding(DATA_ABSENT, "unknown"))
        return
    if value_type == "NM":
        try:
            number = float(raw)
        except ValueError:
            obs["valueString"] = seg.text(5)
            state.issues.append(
                issue("warning", "value", "NM value is not a number; kept as text", seg.path + ".5")
            )
            return
        quantity: dict[str, Any] = {
            "value": int(number) if number.is_integer() and "." not in raw else number
        }
        unit = seg.get(6) or ""
        if unit:
            # OBX-6 is CWE: when its coding system is UCUM the identifier is the UCUM code.
            is_ucum = seg.get(6, 3).upper() in ("UCUM", "ISO+") or seg.get(6, 3) == UCUM
            ucum = unit if seg.get(6, 3).upper() == "UCUM" else terminology().ucum(unit)
            if is_ucum and ucum is None:
                ucum = terminology().ucum(seg.get(6, 2))
            quantity["unit"] = seg.text(6, 2) or unit
            if ucum:
                quantity.update(system=UCUM, code=ucum)
        obs["valueQuantity"] = quantity
    elif value_type in ("CWE", "CE", "CNE", "CF", "IS", "ID"):
        concept = cwe_to_concept(seg, 5)
        if concept:
            obs["valueCodeableConcept"] = concept
    elif value_type in ("DT", "DTM", "TS"):
        value, _ = ts_to_datetime(raw)
        if value:
            obs["valueDateTime"] = value
        else:
            obs["valueString"] = raw
    elif value_type == "SN":
        comparator, figure = seg.get(5, 1), seg.get(5, 2)
        try:
            q: dict[str, Any] = {"value": float(figure)}
        except ValueError:
            obs["valueString"] = "".join(seg.get(5, c) for c in range(1, 5))
            return
        if comparator in ("<", "<=", ">", ">="):
            q["comparator"] = comparator
        obs["valueQuantity"] = q
    elif value_type in ("TX", "FT", "ST"):
        obs["valueString"] = "\n".join(seg.text(5, rep=r) for r in range(1, seg.repetitions(5) + 1))
    else:
        obs["valueString"] = seg.text(5)
        state.issues.append(
            issue(
                "information",
                "not-supported",
                f"OBX-2 {value_type or 'empty'} kept as text",
                seg.path + ".5",
            )
        )


def _ed_to_attachment(seg: _Segment, state: _State) -> None:
    """ED OBX (e.g. an embedded PDF report) -> DiagnosticReport.presentedForm."""
    subtype, encoding, data = seg.get(5, 3), seg.get(5, 4), seg.get(5, 5)
    if not data or state.order is None:
        state.issues.append(
            issue("warning", "incomplete", "ED OBX without data or OBR; skipped", seg.path + ".5")
        )
        return
    media = {
        "PDF": "application/pdf",
        "RTF": "application/rtf",
        "HTML": "text/html",
        "XML": "text/xml",
        "JPEG": "image/jpeg",
        "PNG": "image/png",
    }.get(subtype.upper())
    if encoding.upper() == "BASE64":
        try:
            base64.b64decode(data, validate=True)
        except ValueError:
            state.issues.append(
                issue("error", "value", "ED data is not valid Base64", seg.path + ".5")
            )
            return
        payload = data
    else:
        payload = base64.b64encode(data.encode("utf-8")).decode("ascii")
    state.order.report.setdefault("presentedForm", []).append(
        compact(
            {
                "contentType": media or "application/octet-stream",
                "data": payload,
                "title": seg.text(3, 2) or None,
            }
        )
    )
    state.last = None


def nte_to_text(seg: _Segment, state: _State) -> None:
    text = "\n".join(seg.text(3, rep=r) for r in range(1, seg.repetitions(3) + 1)).strip()
    if not text:
        return
    if state.last is not None and state.last["resourceType"] == "Observation":
        state.last.setdefault("note", []).append({"text": text})
    elif state.order is not None:
        state.order.narrative.append(text)
    else:
        state.issues.append(
            issue("information", "not-supported", "NTE outside an order not mapped", seg.path)
        )


def spm_to_specimen(seg: _Segment, state: _State) -> None:
    order = state.order
    if order is None:
        state.issues.append(issue("warning", "structure", "SPM before any OBR; skipped", seg.path))
        return
    ident = seg.get(2, 1, sub=1) or seg.get(2, 2, sub=1)
    specimen: Resource = compact(
        {
            "resourceType": "Specimen",
            "id": deterministic_id(state.source, "Specimen", order.report["id"], ident or seg.path),
            "identifier": [
                _specimen_identifier(seg, 1, "PLAC"),
                _specimen_identifier(seg, 2, "FILL"),
            ],
            "accessionIdentifier": _accession(seg, order.report),
            "type": cwe_to_concept(seg, 4),
            "subject": reference(state.patient) if state.patient else None,
            "collection": {"collectedDateTime": _ts(seg, 17, state)},
        }
    )
    order.specimen = specimen
    order.report.setdefault("specimen", []).append(reference(specimen))
    state.resources.append(specimen)
    state.last = specimen


def _specimen_identifier(seg: _Segment, comp: int, type_code: str) -> dict[str, Any] | None:
    """SPM-2 Specimen ID (EIP): component 1 the placer's, 2 the filler's entity identifier (EI:
    value & namespace & universal id & its type as subcomponents)."""
    value = seg.get(2, comp, sub=1)
    if not value:
        return None
    namespace, universal, kind = (_subcomponent(seg, 2, comp, n) for n in (2, 3, 4))
    return _identifier(value, namespace, type_code, universal, kind)


def _subcomponent(seg: _Segment, f: int, comp: int, sub: int) -> str:
    """A subcomponent; empty when the component has none (`get` gives a plain component's whole
    value for any subcomponent)."""
    value = seg.get(f, comp, sub=sub)
    return value if sub == 1 or value != seg.get(f, comp, sub=1) else ""


def _accession(seg: _Segment, report: Resource) -> dict[str, Any] | None:
    """Specimen accession number (STANDARDS UC-23): SPM-30 Accession ID (CX, v2.7+) when sent,
    else the order's filler order number (OBR-3), which anatomic pathology uses as accession."""
    value = seg.get(30)
    if value:
        namespace, universal, kind = (_subcomponent(seg, 30, 4, n) for n in (1, 2, 3))
        return _identifier(value, namespace, "ACSN", universal, kind)
    filler = [
        i
        for i in report.get("identifier") or []
        if any(c.get("code") == "FILL" for c in (i.get("type") or {}).get("coding") or [])
    ]
    if not filler:
        return None
    return {k: v for k, v in filler[0].items() if k in ("system", "value")}


def _finish_order(state: _State) -> None:
    order = state.order
    if order is None:
        return
    if order.narrative:
        body = "".join(f"<p>{html.escape(p)}</p>" for p in order.narrative if p.strip())
        if body:
            order.report["text"] = {
                "status": "generated",
                "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>',
            }
            order.report["presentedForm"] = [
                *order.report.get("presentedForm", []),
                {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode("\n".join(order.narrative).strip().encode()).decode(
                        "ascii"
                    ),
                },
            ]
    state.resources.append(order.report)
    state.order = None


_HANDLERS = {
    "MSH": _msh,
    "PID": pid_to_patient,
    "OBR": obr_to_diagnostic_report,
    "OBX": obx_to_observation,
    "NTE": nte_to_text,
    "SPM": spm_to_specimen,
}


def document_to_resources(
    data: bytes, source: str, authorities: dict[str, str] | None = None
) -> MapResult:
    """Parse + map every message of an ER7 file."""
    result = MapResult(kind="hl7v2")
    for message in parse_message(data):
        resources, issues = message_to_resources(message, source, authorities)
        result.resources += resources
        result.issues += issues
    return result


# --------------------------------------------------------------------------- matching keys


@dataclass(frozen=True)
class MessageKeys:
    """What a message says about whose it is and which order it answers (for matching it to a
    case): PID-3 identifiers as (system, value) with the system derived from the assigning
    authority as `pid_to_patient` does, and the order/accession numbers it carries."""

    patient_identifiers: tuple[tuple[str, str], ...]
    authorities: tuple[str, ...]  # PID-3.4.1 namespace ids, for a partner's authority table
    order_numbers: tuple[str, ...]


def message_keys(message: Message, authorities: dict[str, str] | None = None) -> MessageKeys:
    """PID-3 (every repetition), ORC-2/ORC-3 and OBR-2/OBR-3 (EI.1), SPM-2 (both EIP parts)
    and SPM-30 of one parsed message. `authorities` maps a PID-3.4 namespace id to the FHIR
    identifier system a partner uses for it (the partners file); otherwise the universal id
    (ISO OID as `urn:oid:`) or our URN for the namespace is the system."""
    table = authorities or {}
    patients: list[tuple[str, str]] = []
    names: list[str] = []
    orders: list[str] = []
    for seg in message.segments:
        if seg.name == "PID":
            for rep in range(1, seg.repetitions(3) + 1):
                value = seg.get(3, 1, rep)
                if not value:
                    continue
                namespace = seg.get(3, 4, rep, 1)
                universal, kind = seg.get(3, 4, rep, 2), seg.get(3, 4, rep, 3)
                system = table.get(namespace) or _authority_system(namespace, universal, kind)
                if system:
                    patients.append((system, value))
                if namespace:
                    names.append(namespace)
        elif seg.name in ("ORC", "OBR"):
            orders += [seg.get(f, 1) for f in (2, 3)]
        elif seg.name == "SPM":
            orders += [seg.get(2, 1, sub=1), seg.get(2, 2, sub=1), seg.get(30, 1)]
    return MessageKeys(
        tuple(dict.fromkeys(patients)),
        tuple(dict.fromkeys(names)),
        tuple(dict.fromkeys(o for o in orders if o)),
    )
