"""Reviewer's second-opinion draft -> US Core 6.1.0 DiagnosticReport Note (+ Observations, PDF).

STANDARDS.md §2.1 (UC-01..03), §2.6 (UC-50..56) and §3.3 (RF-20..RF-24). Pure: no clock (the
caller passes effective/issued), no random ids (uuid5 over the report's business identifier), no
I/O except fpdf2 reading the font files the caller names (`PdfFonts`).

The delivered form is one DiagnosticReport whose Observations and reviewer Practitioner are
`contained` (a destination EHR needs nothing else to resolve them). `report_transaction()` gives
the same content as separate resources in a FHIR transaction with a Provenance, for partners
configured with `use_transaction`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from fhir_gateway.errors import MappingError, ValidationError, pydantic_message
from fhir_gateway.resources import (
    LOINC,
    SNOMED,
    UCUM,
    Resource,
    codeable_concept,
    coding,
    compact,
    deterministic_id,
)
from mappers.report_pdf import PdfFonts, PdfReport, render_report_pdf

# Profiles and code systems (STANDARDS.md §2.1, §1.3, MC-35).
US_CORE_DR_NOTE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-diagnosticreport-note"
US_CORE_DOCREF = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference"
US_CORE_PROVENANCE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-provenance"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
NCIT = "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
# US Core 6.1.0 has no DiagnosticReport category for consult notes (UC-01 lists radiology,
# cardiology, pathology only); the clinical-note category of US Core DocumentReference is the
# closest coded meaning [U: agree per partner, like the report code].
US_CORE_DOCREF_CATEGORY = (
    "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
)

ReportKind = Literal["pathology", "radiology", "oncology-consultation"]
ReportStatus = Literal["final", "amended", "corrected", "entered-in-error"]
FindingKind = Literal["revised-diagnosis", "histology", "grade", "tnm-stage", "biomarker"]


@dataclass(frozen=True)
class _KindCodes:
    category: dict[str, Any]
    code: str
    code_display: str
    title: str


# UC-02 / RF-22: LOINC note codes 11526-1, 18748-4, 11488-4; categories LP7839-6, LP29684-5.
KIND_CODES: Mapping[str, _KindCodes] = {
    "pathology": _KindCodes(
        codeable_concept(coding(LOINC, "LP7839-6", "Pathology")),
        "11526-1",
        "Pathology study",
        "Second-opinion pathology report",
    ),
    "radiology": _KindCodes(
        codeable_concept(coding(LOINC, "LP29684-5", "Radiology")),
        "18748-4",
        "Diagnostic imaging study",
        "Second-opinion radiology report",
    ),
    "oncology-consultation": _KindCodes(
        codeable_concept(coding(US_CORE_DOCREF_CATEGORY, "clinical-note", "Clinical Note")),
        "11488-4",
        "Consult note",
        "Second-opinion oncology consultation",
    ),
}


@dataclass(frozen=True)
class _FindingCodes:
    label: str
    code: dict[str, Any] | None  # None: the draft must give the code (biomarkers)
    category: str | None  # observation-category; None: by report kind


# mCODE STU4 fixed codes (STANDARDS.md §1.2): histologic behaviour and type LOINC 31206-6,
# histologic grade NCIt C18000, pathologic TNM stage group SNOMED 399588009 (MC-31).
FINDING_CODES: Mapping[str, _FindingCodes] = {
    "revised-diagnosis": _FindingCodes(
        "Revised diagnosis", coding(SNOMED, "439401001", "Diagnosis (observable entity)"), None
    ),
    "histology": _FindingCodes(
        "Histology",
        coding(LOINC, "31206-6", "Histology and Behavior ICD-O-3 Cancer"),
        "laboratory",
    ),
    "grade": _FindingCodes(
        "Histologic grade", coding(NCIT, "C18000", "Histologic Grade"), "laboratory"
    ),
    "tnm-stage": _FindingCodes(
        "TNM stage", coding(SNOMED, "399588009", "Pathologic TNM stage grouping"), None
    ),
    "biomarker": _FindingCodes("Biomarker", None, "laboratory"),
}
_KIND_OBS_CATEGORY = {
    "pathology": "laboratory",
    "radiology": "imaging",
    "oncology-consultation": "exam",
}
AJCC_8TH = coding(
    SNOMED,
    "897275008",
    "American Joint Commission on Cancer, Cancer Staging Manual, 8th edition"
    " neoplasm staging system",
)
_STATUS_BANNER = {
    "amended": "AMENDED: this version replaces the previously delivered report.",
    "corrected": "CORRECTED: this version corrects the previously delivered report.",
    "entered-in-error": "ENTERED IN ERROR: this report was retracted and must not be used.",
}
_SCTID = re.compile(r"^[1-9][0-9]{5,17}$")
_REF = re.compile(r"^(https?://\S+/)?[A-Z][A-Za-z]+/[A-Za-z0-9\-\.]{1,64}$")


# ---------------------------------------------------------------- the draft (API edge model)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class CodingIn(_Model):
    system: str = SNOMED
    code: str = Field(min_length=1, max_length=64)
    display: str | None = Field(default=None, max_length=512)

    def fhir(self) -> dict[str, Any]:
        return coding(self.system, self.code, self.display)

    def text(self) -> str:
        system = {SNOMED: "SNOMED CT", LOINC: "LOINC", NCIT: "NCIt"}.get(self.system, self.system)
        return f"{self.display or ''} ({system} {self.code})".strip()


class QuantityIn(_Model):
    value: float
    unit: str = Field(min_length=1, max_length=32)  # UCUM code


class IdentifierIn(_Model):
    system: str = Field(min_length=1, max_length=512)
    value: str = Field(min_length=1, max_length=256)


class Finding(_Model):
    """One structured finding; becomes one Observation. Exactly one value."""

    kind: FindingKind
    code: CodingIn | None = None  # required for biomarkers (LOINC), optional override otherwise
    value_code: CodingIn | None = None
    value_text: str | None = Field(default=None, max_length=4000)
    value_quantity: QuantityIn | None = None
    method: CodingIn | None = None  # staging system for tnm-stage (default AJCC 8th)
    focus: list[str] = Field(default_factory=list, max_length=20)  # e.g. "Condition/abc"
    derived_from: list[str] = Field(default_factory=list, max_length=50)
    note: str | None = Field(default=None, max_length=4000)

    @model_validator(mode="after")
    def _check(self) -> Finding:
        values = [v for v in (self.value_code, self.value_text, self.value_quantity) if v]
        if len(values) != 1:
            raise ValueError(
                "a finding needs exactly one of value_code, value_text, value_quantity"
            )
        if self.kind == "biomarker" and self.code is None:
            raise ValueError("a biomarker finding needs its LOINC code in `code`")
        for ref in [*self.focus, *self.derived_from]:
            if not _REF.match(ref):
                raise ValueError("not a FHIR reference (Type/id or absolute URL)")
        return self


class Reviewer(_Model):
    family: str = Field(min_length=1, max_length=200)
    given: list[str] = Field(default_factory=list, max_length=5)
    prefix: str | None = Field(default=None, max_length=40)
    role: str | None = Field(default=None, max_length=200)  # e.g. "Pathologist"
    npi: str | None = None
    identifiers: list[IdentifierIn] = Field(default_factory=list, max_length=5)

    @field_validator("npi")
    @classmethod
    def _npi(cls, v: str | None) -> str | None:
        if v is not None and not npi_is_valid(v):
            raise ValueError("not a valid NPI (10 digits, Luhn check digit with prefix 80840)")
        return v

    @model_validator(mode="after")
    def _some_identifier(self) -> Reviewer:
        if not self.npi and not self.identifiers:
            raise ValueError("the reviewer needs an NPI or another identifier")
        return self

    @property
    def display(self) -> str:
        return " ".join(p for p in (self.prefix, *self.given, self.family) if p)

    @property
    def identifier_list(self) -> list[dict[str, str]]:
        out = [{"system": NPI_SYSTEM, "value": self.npi}] if self.npi else []
        return out + [{"system": i.system, "value": i.value} for i in self.identifiers]


class Addendum(_Model):
    """The reviewer's answer to a follow-up question from the treating team, added to the
    delivered report (which then goes out `amended`)."""

    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    question: str = Field(min_length=1, max_length=4000)
    answer: str = Field(min_length=1, max_length=20000)


class ReportDraft(_Model):
    """What a reviewer writes (PUT /cases/{id}/report)."""

    kind: ReportKind
    conclusion: str = Field(min_length=1, max_length=20000)
    conclusion_codes: list[CodingIn] = Field(default_factory=list, max_length=20)
    findings: list[Finding] = Field(default_factory=list, max_length=100)
    recommendations: list[str] = Field(default_factory=list, max_length=50)
    reviewer: Reviewer
    addenda: list[Addendum] = Field(default_factory=list, max_length=50)

    @field_validator("conclusion_codes")
    @classmethod
    def _snomed(cls, v: list[CodingIn]) -> list[CodingIn]:
        for c in v:
            if c.system != SNOMED or not _SCTID.match(c.code):
                raise ValueError("conclusion codes must be SNOMED CT concept ids")
        return v


def parse_draft(data: Any) -> ReportDraft:
    """Validate a draft from JSON.

    Raises:
        ValidationError: 422 with one OperationOutcome issue per problem (expression = JSON path).
    """
    try:
        return ReportDraft.model_validate(data)
    except PydanticValidationError as exc:
        issues = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"])
            issues.append(
                {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": f"{path}: {pydantic_message(err)}",
                    "expression": [path] if path else [],
                }
            )
        first = issues[0]["diagnostics"] if issues else "invalid report draft"
        raise ValidationError(
            f"invalid report draft: {first}",
            expression=[str(i["expression"][0]) for i in issues if i["expression"]],
            issues=issues,
        ) from None


def npi_is_valid(npi: str) -> bool:
    """NPI check digit: Luhn over '80840' + the first 9 digits (CMS NPI check-digit rule)."""
    if not re.fullmatch(r"[0-9]{10}", npi):
        return False
    digits = [int(c) for c in "80840" + npi[:9]]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return (10 - total % 10) % 10 == int(npi[9])


# ---------------------------------------------------------------- the case context


@dataclass(frozen=True)
class ReportSpecimen:
    """A specimen the report is about: a reference the destination can resolve (the URL on the
    EHR it came from) and/or its accession identifier, and a one-line label for the PDF."""

    label: str
    reference: str | None = None
    identifier: tuple[str, str] | None = None  # (system, value): the accession number

    def fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reference:
            out["reference"] = self.reference
        if self.identifier:
            system, value = self.identifier
            out["identifier"] = {"system": system, "value": value} if system else {"value": value}
        out["display"] = self.label
        return out


@dataclass(frozen=True)
class ReportContext:
    """What the mapper needs to know about the case and the destination; values, no clock.

    `patient_reference` (a reference the destination gave us, e.g. its absolute Patient URL) or
    `patient_identifier` (system, value: the patient's identifier from the referral) says who
    the report is about on the destination EHR. `references` maps case-local references in
    findings to references the destination can resolve (absolute URLs on the referring EHR).
    """

    case_id: str
    identifier_system: str
    identifier_value: str
    service_request_url: str
    organization_name: str
    organization_identifier: tuple[str, str]
    effective: datetime
    issued: datetime
    patient_reference: str | None = None
    patient_identifier: tuple[str, str] | None = None
    patient_name: str = ""
    service_request_identifier: tuple[str, str] | None = None  # the placer's order number
    report_code: str | None = None
    report_code_display: str | None = None
    references: Mapping[str, str] = field(default_factory=dict)
    question: str = ""  # the consult question (referral reason and note), shown in the report
    specimens: tuple[ReportSpecimen, ...] = ()  # DiagnosticReport.specimen + the PDF


@dataclass(frozen=True)
class ReportResources:
    """The mapper's output: the delivered DiagnosticReport (Observations and Practitioner
    contained) plus the same content as standalone resources and a Provenance."""

    diagnostic_report: Resource
    observations: list[Resource]
    practitioner: Resource
    provenance: Resource
    pdf: bytes
    text: str

    @property
    def identifier_token(self) -> str:
        ident = self.diagnostic_report["identifier"][0]
        return f"{ident['system']}|{ident['value']}"


def draft_to_report(
    draft: ReportDraft, ctx: ReportContext, *, status: ReportStatus, fonts: PdfFonts
) -> ReportResources:
    """Build the US Core DR Note for `draft` (RF-22) with its PDF and text/plain forms.

    Raises:
        MappingError: the context is unusable (naive datetimes, no patient, unknown reference).
    """
    _check_context(ctx)
    kind = KIND_CODES[draft.kind]
    report_id = deterministic_id("DiagnosticReport", ctx.identifier_system, ctx.identifier_value)
    subject = _subject(ctx)
    practitioner = reviewer_to_practitioner(draft.reviewer)
    org_ref = {
        "identifier": {
            "system": ctx.organization_identifier[0],
            "value": ctx.organization_identifier[1],
        },
        "display": ctx.organization_name,
    }
    observations = [
        finding_to_observation(f, i, draft, ctx, status=status, subject=subject)
        for i, f in enumerate(draft.findings, 1)
    ]
    text = report_text(draft, ctx, status=status)
    pdf = render_report_pdf(_pdf_view(draft, ctx, status=status), fonts)
    code = codeable_concept(
        coding(
            LOINC,
            ctx.report_code or kind.code,
            ctx.report_code_display or (None if ctx.report_code else kind.code_display),
        ),
        text=kind.title,
    )
    reviewer_ref = {"reference": "#reviewer", "display": draft.reviewer.display}
    dr: Resource = compact(
        {
            "resourceType": "DiagnosticReport",
            "id": report_id,
            "meta": {"profile": [US_CORE_DR_NOTE]},
            "text": {"status": "generated", "div": _narrative(draft, ctx, status)},
            "contained": [
                {**practitioner, "id": "reviewer"},
                *[_contained_observation(obs, i) for i, obs in enumerate(observations, 1)],
            ],
            "identifier": [
                {"use": "official", "system": ctx.identifier_system, "value": ctx.identifier_value}
            ],
            "basedOn": [_based_on(ctx)],
            "status": status,
            "category": [kind.category],
            "code": code,
            "subject": subject,
            "effectiveDateTime": ctx.effective.isoformat(),
            "issued": ctx.issued.isoformat(),
            "performer": [reviewer_ref, org_ref],
            "specimen": [s.fhir() for s in ctx.specimens],
            "resultsInterpreter": [reviewer_ref],
            "result": [{"reference": f"#finding-{i}"} for i in range(1, len(observations) + 1)],
            "conclusion": conclusion_text(draft),
            "conclusionCode": [codeable_concept(c.fhir()) for c in draft.conclusion_codes],
            "presentedForm": [
                _attachment("application/pdf", pdf, kind.title, ctx),
                _attachment("text/plain; charset=utf-8", text.encode(), kind.title, ctx),
            ],
        }
    )
    observations, practitioner = split_contained(dr)
    return ReportResources(dr, observations, practitioner, report_provenance(dr), pdf, text)


def reviewer_to_practitioner(reviewer: Reviewer) -> Resource:
    first = reviewer.identifier_list[0]
    out: Resource = compact(
        {
            "resourceType": "Practitioner",
            "id": deterministic_id("Practitioner", first["system"], first["value"]),
            "identifier": reviewer.identifier_list,
            "active": True,
            "name": [
                {
                    "text": reviewer.display,
                    "family": reviewer.family,
                    "given": reviewer.given,
                    "prefix": [reviewer.prefix] if reviewer.prefix else [],
                }
            ],
        }
    )
    return out


def finding_to_observation(
    finding: Finding,
    index: int,
    draft: ReportDraft,
    ctx: ReportContext,
    *,
    status: ReportStatus,
    subject: dict[str, Any],
) -> Resource:
    """One structured finding -> one Observation (mCODE shapes for histology, grade, stage)."""
    spec = FINDING_CODES[finding.kind]
    code = finding.code.fhir() if finding.code else spec.code
    assert code is not None  # the draft model requires a code for biomarkers
    category = spec.category or _KIND_OBS_CATEGORY[draft.kind]
    method = finding.method.fhir() if finding.method else None
    if finding.kind == "tnm-stage" and method is None:
        method = AJCC_8TH  # MC-22: TNM stage group needs `method`
    value: dict[str, Any] = {}
    if finding.value_code:
        value["valueCodeableConcept"] = codeable_concept(finding.value_code.fhir())
    elif finding.value_quantity:
        q = finding.value_quantity
        value["valueQuantity"] = {"value": q.value, "unit": q.unit, "system": UCUM, "code": q.unit}
    else:
        value["valueString"] = finding.value_text
    path = f"findings[{index - 1}]"
    out: Resource = compact(
        {
            "resourceType": "Observation",
            "id": deterministic_id(
                "Observation", ctx.identifier_system, ctx.identifier_value, str(index)
            ),
            "identifier": [
                {
                    "system": ctx.identifier_system,
                    "value": f"{ctx.identifier_value}-finding-{index}",
                }
            ],
            "status": _obs_status(status),
            "category": [codeable_concept(coding(OBSERVATION_CATEGORY, category))],
            "code": codeable_concept(code, text=spec.label),
            "subject": subject,
            "focus": [_case_reference(r, ctx, f"{path}.focus") for r in finding.focus],
            "effectiveDateTime": ctx.effective.isoformat(),
            "issued": ctx.issued.isoformat(),
            "performer": [{"reference": "#reviewer"}],
            "method": codeable_concept(method) if method else None,
            "derivedFrom": [
                _case_reference(r, ctx, f"{path}.derived_from") for r in finding.derived_from
            ],
            "note": [{"text": finding.note}] if finding.note else [],
            **value,
        }
    )
    return out


def split_contained(dr: Resource) -> tuple[list[Resource], Resource]:
    """The contained findings and reviewer of a delivered DR as standalone resources, with the
    ids the mapper gives them (uuid5 over the report identifier / the reviewer's identifier)."""
    ident = dr["identifier"][0]
    contained = {c["id"]: c for c in dr.get("contained") or []}
    observations = [
        {
            **contained[r["reference"].lstrip("#")],
            "id": deterministic_id("Observation", ident["system"], ident["value"], str(i)),
        }
        for i, r in enumerate(dr.get("result") or [], 1)
    ]
    reviewer = contained["reviewer"]
    first = reviewer["identifier"][0]
    practitioner = {
        **reviewer,
        "id": deterministic_id("Practitioner", first["system"], first["value"]),
    }
    return observations, practitioner


def report_provenance(dr: Resource, *, author_by_identifier: bool = False) -> Resource:
    """US Core Provenance (PV-01/02): author = reviewer, transmitter = our Organization.

    `author_by_identifier`: name the reviewer by NPI/identifier instead of `Practitioner/<id>`
    (for a Provenance sent on its own, when the Practitioner is only contained in the report).
    The connector points `target` at the id the destination gave the report.
    """
    ident = dr["identifier"][0]
    _observations, practitioner = split_contained(dr)
    org_ref = dr["performer"][-1]
    author: dict[str, Any] = {"reference": f"Practitioner/{practitioner['id']}"}
    if author_by_identifier:
        author = {
            "identifier": practitioner["identifier"][0],
            "display": practitioner["name"][0]["text"],
        }
    out: Resource = {
        "resourceType": "Provenance",
        "id": deterministic_id("Provenance", ident["system"], ident["value"]),
        "meta": {"profile": [US_CORE_PROVENANCE]},
        "target": [{"reference": f"DiagnosticReport/{dr['id']}"}],
        "recorded": dr["issued"],
        "agent": [
            {
                "type": codeable_concept(coding(PROVENANCE_PARTICIPANT, "author", "Author")),
                "who": author,
                "onBehalfOf": org_ref,
            },
            {
                "type": codeable_concept(
                    coding(PROVENANCE_PARTICIPANT, "transmitter", "Transmitter")
                ),
                "who": org_ref,
            },
        ],
    }
    return out


def report_transaction(dr: Resource) -> Resource:
    """A FHIR transaction (RS-30) with the DiagnosticReport, its Observations, the reviewer and
    a Provenance as separate resources, each a conditional create on its identifier (RS-05)."""
    observations, practitioner = split_contained(dr)
    provenance = report_provenance(dr)
    standalone = {k: v for k, v in dr.items() if k != "contained"}
    urls = {
        "#reviewer": f"urn:uuid:{practitioner['id']}",
        **{f"#finding-{i}": f"urn:uuid:{o['id']}" for i, o in enumerate(observations, 1)},
    }
    dr_url = f"urn:uuid:{dr['id']}"

    def relink(value: Any) -> Any:
        if isinstance(value, dict):
            if isinstance(value.get("reference"), str) and value["reference"] in urls:
                return {**value, "reference": urls[value["reference"]]}
            return {k: relink(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relink(v) for v in value]
        return value

    def entry(resource: Resource, full_url: str, *, conditional: bool = True) -> dict[str, Any]:
        rtype = resource["resourceType"]
        request: dict[str, Any] = {"method": "POST", "url": rtype}
        idents = resource.get("identifier") or []
        if conditional and idents:
            request["ifNoneExist"] = f"identifier={idents[0]['system']}|{idents[0]['value']}"
        return {"fullUrl": full_url, "resource": resource, "request": request}

    provenance["target"] = [{"reference": dr_url}]
    provenance["agent"][0]["who"] = {"reference": urls["#reviewer"]}
    entries = [
        entry(relink(standalone), dr_url),
        *[entry(relink(o), urls[f"#finding-{i}"]) for i, o in enumerate(observations, 1)],
        entry(practitioner, urls["#reviewer"]),
        entry(provenance, f"urn:uuid:{provenance['id']}", conditional=False),
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def report_document_reference(dr: Resource) -> Resource:
    """US Core DocumentReference carrying the same attachments (RF-23, UC-50..55): the fallback
    for EHRs that refuse DiagnosticReport writes."""
    out: Resource = compact(
        {
            "resourceType": "DocumentReference",
            "id": deterministic_id("DocumentReference", dr["id"]),
            "meta": {"profile": [US_CORE_DOCREF]},
            "identifier": dr["identifier"],
            "status": "entered-in-error" if dr["status"] == "entered-in-error" else "current",
            "docStatus": {"final": "final", "entered-in-error": "entered-in-error"}.get(
                dr["status"], "amended"
            ),
            "type": dr["code"],
            "category": [
                codeable_concept(coding(US_CORE_DOCREF_CATEGORY, "clinical-note", "Clinical Note"))
            ],
            "subject": dr["subject"],
            "date": dr["issued"],
            "author": [{"display": dr["performer"][0]["display"]}, dr["performer"][-1]],
            "description": dr["code"].get("text"),
            "content": [{"attachment": a} for a in dr["presentedForm"]],
            "context": {"period": {"start": dr["effectiveDateTime"]}, "related": dr["basedOn"]},
        }
    )
    return out


# ---------------------------------------------------------------- text forms


def report_text(draft: ReportDraft, ctx: ReportContext, *, status: ReportStatus) -> str:
    """The text/plain presentedForm: the same content as the PDF."""
    view = _pdf_view(draft, ctx, status=status)
    lines = [view.title]
    if view.status_banner:
        lines.append(view.status_banner)
    lines += [
        "",
        f"Patient: {view.patient}",
        f"Patient identifier: {view.patient_identifier}",
        f"Referral: {view.referral}",
        f"Report identifier: {view.identifier}",
        f"Issued: {view.issued.isoformat()}",
    ]
    if view.question:
        lines += ["", "Question from the referrer:", view.question]
    if view.specimens:
        lines += ["", "Specimens:"] + [f"- {s}" for s in view.specimens]
    if view.findings:
        lines += ["", "Findings:"] + [f"- {label}: {value}" for label, value in view.findings]
    lines += ["", "Conclusion:", view.conclusion] + [f"- {c}" for c in view.conclusion_codes]
    if view.recommendations:
        lines += ["", "Recommendations:"]
        lines += [f"{i}. {r}" for i, r in enumerate(view.recommendations, 1)]
    if view.addenda:
        lines += ["", "Addenda:", *view.addenda]
    lines += ["", f"Reviewed by: {view.reviewer}", view.organization]
    return "\n".join(lines) + "\n"


def addendum_lines(draft: ReportDraft) -> list[str]:
    """Each addendum as one line: its number, date, the question and the answer."""
    return [
        f"Addendum {i} ({a.date}). Question from the treating team: {a.question} Answer: {a.answer}"
        for i, a in enumerate(draft.addenda, 1)
    ]


def conclusion_text(draft: ReportDraft) -> str:
    """DiagnosticReport.conclusion: the conclusion, then the addenda in order."""
    return "\n\n".join([draft.conclusion, *addendum_lines(draft)])


def _pdf_view(draft: ReportDraft, ctx: ReportContext, *, status: ReportStatus) -> PdfReport:
    reviewer = draft.reviewer
    ids = ", ".join(
        ("NPI " if i["system"] == NPI_SYSTEM else f"{i['system']} ") + i["value"]
        for i in reviewer.identifier_list
    )
    who = ", ".join(p for p in (reviewer.display, reviewer.role) if p)
    patient_ident = (
        f"{ctx.patient_identifier[0]}|{ctx.patient_identifier[1]}"
        if ctx.patient_identifier
        else (ctx.patient_reference or "")
    )
    return PdfReport(
        title=KIND_CODES[draft.kind].title,
        status_banner=_STATUS_BANNER.get(status),
        patient=ctx.patient_name or "-",
        patient_identifier=patient_ident,
        referral=ctx.service_request_url,
        findings=tuple(_finding_line(f) for f in draft.findings),
        conclusion=draft.conclusion,
        conclusion_codes=tuple(c.text() for c in draft.conclusion_codes),
        recommendations=tuple(draft.recommendations),
        reviewer=f"{who} ({ids})",
        organization=ctx.organization_name,
        issued=ctx.issued,
        identifier=f"{ctx.identifier_system}|{ctx.identifier_value}",
        question=ctx.question,
        specimens=tuple(s.label for s in ctx.specimens),
        addenda=tuple(addendum_lines(draft)),
    )


def _finding_line(finding: Finding) -> tuple[str, str]:
    spec = FINDING_CODES[finding.kind]
    label = spec.label
    if finding.kind == "biomarker" and finding.code is not None:
        label = finding.code.display or f"LOINC {finding.code.code}"
    if finding.value_code:
        value = finding.value_code.text()
    elif finding.value_quantity:
        value = f"{finding.value_quantity.value:g} {finding.value_quantity.unit}"
    else:
        value = finding.value_text or ""
    if finding.note:
        value = f"{value}. {finding.note}"
    return label, value


def _narrative(draft: ReportDraft, ctx: ReportContext, status: ReportStatus) -> str:
    view = _pdf_view(draft, ctx, status=status)
    e = html.escape
    parts = [f"<p><b>{e(view.title)}</b></p>"]
    if view.status_banner:
        parts.append(f"<p><b>{e(view.status_banner)}</b></p>")
    if view.question:
        parts.append(f"<p>Question from the referrer: {e(view.question)}</p>")
    if view.specimens:
        items = "".join(f"<li>{e(s)}</li>" for s in view.specimens)
        parts.append(f"<p>Specimens:</p><ul>{items}</ul>")
    if view.findings:
        items = "".join(f"<li>{e(label)}: {e(value)}</li>" for label, value in view.findings)
        parts.append(f"<ul>{items}</ul>")
    parts.append(f"<p>{e(view.conclusion)}</p>")
    if view.recommendations:
        items = "".join(f"<li>{e(r)}</li>" for r in view.recommendations)
        parts.append(f"<p>Recommendations:</p><ol>{items}</ol>")
    if view.addenda:
        items = "".join(f"<li>{e(a)}</li>" for a in view.addenda)
        parts.append(f"<p>Addenda:</p><ol>{items}</ol>")
    parts.append(f"<p>Reviewed by {e(view.reviewer)}, {e(view.organization)}</p>")
    return f'<div xmlns="http://www.w3.org/1999/xhtml">{"".join(parts)}</div>'


# ---------------------------------------------------------------- helpers


def _check_context(ctx: ReportContext) -> None:
    for name in ("effective", "issued"):
        value: datetime = getattr(ctx, name)
        if value.tzinfo is None:
            raise MappingError(f"{name} must carry a time zone", source="report", path=name)
    if not ctx.patient_reference and not ctx.patient_identifier:
        raise MappingError(
            "the report needs the patient's reference or identifier on the destination",
            source="report",
            path="subject",
        )
    if not ctx.service_request_url.startswith(("http://", "https://")):
        # RF-20: the referral lives on the EHR, so basedOn is an absolute URL there.
        raise MappingError(
            "the referral ServiceRequest must be an absolute URL", source="report", path="basedOn"
        )


def _based_on(ctx: ReportContext) -> dict[str, Any]:
    """RF-20: the referral ServiceRequest, absolute; with the placer's identifier when known."""
    out: dict[str, Any] = {"reference": ctx.service_request_url}
    if ctx.service_request_identifier:
        system, value = ctx.service_request_identifier
        out["identifier"] = {"system": system, "value": value}
    return out


def _subject(ctx: ReportContext) -> dict[str, Any]:
    if ctx.patient_reference:
        return {"reference": ctx.patient_reference}
    assert ctx.patient_identifier is not None
    system, value = ctx.patient_identifier
    return {"type": "Patient", "identifier": {"system": system, "value": value}}


def _case_reference(ref: str, ctx: ReportContext, path: str) -> dict[str, str]:
    if ref in ctx.references:
        return {"reference": ctx.references[ref]}
    if ref.startswith(("http://", "https://")):
        return {"reference": ref}
    raise MappingError(
        f"reference {ref!r} is not a resource of this case", source="report", path=path
    )


def _obs_status(status: ReportStatus) -> str:
    return status  # Observation.status shares these four codes with DiagnosticReport.status


def _contained_observation(obs: Resource, index: int) -> Resource:
    return {**obs, "id": f"finding-{index}"}


def _attachment(content_type: str, data: bytes, title: str, ctx: ReportContext) -> dict[str, Any]:
    return {
        "contentType": content_type,
        "language": "en",
        "data": base64.b64encode(data).decode("ascii"),
        "size": len(data),
        # Attachment.hash is the base64 SHA-1 of the data (FHIR R4 datatypes).
        "hash": base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode(),
        "title": title,
        "creation": ctx.issued.isoformat(),
    }


def reply_communication(
    question: Resource,
    *,
    question_url: str,
    answer: str,
    report_reference: str,
    identifier: tuple[str, str],
    organization_name: str,
    organization_identifier: tuple[str, str],
    sent: datetime,
) -> Resource:
    """Our answer to the treating team's question, as a Communication in reply
    (`inResponseTo` the question) about the amended report, linked to the same referral
    (`basedOn` / `partOf` copied from the question) and addressed to its sender."""
    in_response: dict[str, Any] = {"reference": question_url}
    their_ident = next(iter(question.get("identifier") or []), None)
    if isinstance(their_ident, dict) and their_ident.get("value"):
        in_response["identifier"] = {
            k: their_ident[k] for k in ("system", "value") if k in their_ident
        }
    out: Resource = compact(
        {
            "resourceType": "Communication",
            "identifier": [{"system": identifier[0], "value": identifier[1]}],
            "basedOn": question.get("basedOn"),
            "partOf": question.get("partOf"),
            "inResponseTo": [in_response],
            "status": "completed",
            "subject": question.get("subject"),
            "about": [{"reference": report_reference}],
            "sent": sent.isoformat(),
            "recipient": question.get("sender") and [question["sender"]],
            "sender": {
                "identifier": {
                    "system": organization_identifier[0],
                    "value": organization_identifier[1],
                },
                "display": organization_name,
            },
            "payload": [{"contentString": answer}],
        }
    )
    return out
