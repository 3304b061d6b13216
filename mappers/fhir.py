"""Inbound FHIR R4 JSON (any vendor) -> normalised, classified, case-local FHIR R4 resources.

Normalising (STANDARDS.md §1.3, MC-23, MC-30..MC-35, MC-40..MC-42):
- ids become `deterministic_id(source, type, source id)`; every reference is rewritten to them;
- code system aliases (LN, urn:oid:2.16.840.1.113883.6.1, ...) get a canonical coding added
  alongside the original one (add, never replace);
- Quantity units are given their UCUM code where the spelling denotes exactly that unit, the
  original spelling stays in `Quantity.unit`;
- each resource is classified by category AND code (mCODE STU4 does not require the categories)
  and tagged `meta.tag = urn:fhir-gateway:class|<class>`;
- `meta.profile` lists only the profiles whose checked constraints the resource meets
  (mappers/profiles.py, over the whole source batch: stage focus, cancer patient, ...).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from typing import Any

from fhir_gateway.errors import ParseError, ValidationError
from fhir_gateway.resources import LOINC, UCUM, Resource, coding, deterministic_id
from mappers._common import Issue, MapResult, issue, source_uri
from mappers.profiles import MCODE, US_CORE, claim_profiles, conforming_profiles
from mappers.terminology import CLASS_SYSTEM, Terminology, terminology

# FHIR R4 resource types (http://hl7.org/fhir/R4/resourcelist.html).
RESOURCE_TYPES = frozenset(
    [
        "Account",
        "ActivityDefinition",
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "AppointmentResponse",
        "AuditEvent",
        "Basic",
        "Binary",
        "BiologicallyDerivedProduct",
        "BodyStructure",
        "Bundle",
        "CapabilityStatement",
        "CarePlan",
        "CareTeam",
        "CatalogEntry",
        "ChargeItem",
        "ChargeItemDefinition",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "CodeSystem",
        "Communication",
        "CommunicationRequest",
        "CompartmentDefinition",
        "Composition",
        "ConceptMap",
        "Condition",
        "Consent",
        "Contract",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "Device",
        "DeviceDefinition",
        "DeviceMetric",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "EffectEvidenceSynthesis",
        "Encounter",
        "Endpoint",
        "EnrollmentRequest",
        "EnrollmentResponse",
        "EpisodeOfCare",
        "EventDefinition",
        "Evidence",
        "EvidenceVariable",
        "ExampleScenario",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "GraphDefinition",
        "Group",
        "GuidanceResponse",
        "HealthcareService",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "ImplementationGuide",
        "InsurancePlan",
        "Invoice",
        "Library",
        "Linkage",
        "List",
        "Location",
        "Measure",
        "MeasureReport",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationKnowledge",
        "MedicationRequest",
        "MedicationStatement",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "MessageDefinition",
        "MessageHeader",
        "MolecularSequence",
        "NamingSystem",
        "NutritionOrder",
        "Observation",
        "ObservationDefinition",
        "OperationDefinition",
        "OperationOutcome",
        "Organization",
        "OrganizationAffiliation",
        "Parameters",
        "Patient",
        "PaymentNotice",
        "PaymentReconciliation",
        "Person",
        "PlanDefinition",
        "Practitioner",
        "PractitionerRole",
        "Procedure",
        "Provenance",
        "Questionnaire",
        "QuestionnaireResponse",
        "RelatedPerson",
        "RequestGroup",
        "ResearchDefinition",
        "ResearchElementDefinition",
        "ResearchStudy",
        "ResearchSubject",
        "RiskAssessment",
        "RiskEvidenceSynthesis",
        "Schedule",
        "SearchParameter",
        "ServiceRequest",
        "Slot",
        "Specimen",
        "SpecimenDefinition",
        "StructureDefinition",
        "StructureMap",
        "Subscription",
        "Substance",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
        "SupplyDelivery",
        "SupplyRequest",
        "Task",
        "TerminologyCapabilities",
        "TestReport",
        "TestScript",
        "ValueSet",
        "VerificationResult",
        "VisionPrescription",
    ]
)

# Required bindings we check on input (FHIR R4 value sets of the same names).
_ENUMS: dict[tuple[str, str], frozenset[str]] = {
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Bundle", "type"): frozenset(
        {"document", "message", "transaction", "transaction-response", "batch"}
        | {"batch-response", "history", "searchset", "collection"}
    ),
    ("Observation", "status"): frozenset(
        {"registered", "preliminary", "final", "amended", "corrected", "cancelled"}
        | {"entered-in-error", "unknown"}
    ),
    ("DiagnosticReport", "status"): frozenset(
        {"registered", "partial", "preliminary", "final", "amended", "corrected", "appended"}
        | {"cancelled", "entered-in-error", "unknown"}
    ),
    ("Procedure", "status"): frozenset(
        {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed"}
        | {"entered-in-error", "unknown"}
    ),
}
# Elements that are primitives (strings) wherever they appear at the top of a resource.
_PRIMITIVES = frozenset(
    {"id", "status", "gender", "birthDate", "date", "issued", "effectiveDateTime", "recordedDate"}
    | {"onsetDateTime", "authoredOn", "performedDateTime", "implicitRules", "language"}
)
# Elements that are complex datatypes (JSON objects) at the top of a resource.
_OBJECTS = frozenset(
    {"text", "meta", "code", "subject", "patient", "encounter", "valueQuantity"}
    | {"valueCodeableConcept", "effectivePeriod"}
)
# FHIR STU3 sent these as codes; R4 made them CodeableConcepts (read tolerantly).
_STU3_CODES = {
    ("Condition", "clinicalStatus"): "http://terminology.hl7.org/CodeSystem/condition-clinical",
    (
        "Condition",
        "verificationStatus",
    ): "http://terminology.hl7.org/CodeSystem/condition-ver-status",
    ("AllergyIntolerance", "clinicalStatus"): (
        "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
    ),
}
# Elements renamed since DSTU2/STU3 that vendors still send (read tolerantly, reported).
_LEGACY_RENAMES = {
    ("Condition", "patient"): "subject",
    ("Condition", "dateRecorded"): "recordedDate",
    ("Condition", "asserter"): "asserter",
}
# Choice elements ([x]) that may hold only one type.
_CHOICES = ("value", "effective", "onset", "abatement", "performed", "deceased", "medication")
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CONTROL_ESCAPE_RE = re.compile(rb"\\u00(?:0[0-8bBcCeEfF]|1[0-9a-fA-F])")
_MAX_DECIMAL_DIGITS = 18  # FHIR decimal: at most 18 significant digits (R4 datatypes, decimal)


@dataclass(frozen=True)
class InboundResource:
    """One resource as found in the source, with its path there and its Bundle fullUrl."""

    resource: Resource
    path: str
    full_url: str | None = None


# --------------------------------------------------------------------------- parsing bytes


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ParseError(f"duplicate JSON property {key!r}", source="fhir")
        out[key] = value
    return out


def _checked_float(text: str) -> float:
    digits = len(text.lstrip("-").split("e")[0].split("E")[0].replace(".", "").lstrip("0"))
    if digits > _MAX_DECIMAL_DIGITS:
        raise ParseError("a decimal has more than 18 significant digits", source="fhir")
    return float(text)


def parse_json(data: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no control characters, FHIR-sized decimals."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if _CONTROL_ESCAPE_RE.search(data):
        raise ParseError("JSON string holds an illegal control character", source="fhir")
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_float=_checked_float)
    except UnicodeDecodeError as exc:
        raise ParseError(f"FHIR JSON is not UTF-8 ({exc.reason})", source="fhir") from exc
    except RecursionError as exc:
        raise ParseError("FHIR JSON is nested too deeply", source="fhir") from exc
    except json.JSONDecodeError as exc:
        raise ParseError(
            f"not well-formed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            source="fhir",
        ) from exc


def parse_ndjson(data: bytes) -> list[InboundResource]:
    out: list[InboundResource] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = parse_json(line)
        except ParseError as exc:
            raise ParseError(f"NDJSON line {number}: {exc.message}", source="fhir") from exc
        out += _inbound(value, f"line[{number}]")
    return out


def parse_fhir(data: bytes) -> list[InboundResource]:
    """Bytes of a FHIR JSON resource, Bundle or NDJSON -> checked inbound resources."""
    stripped = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not stripped.startswith(b"{"):
        raise ParseError("FHIR JSON must be an object", source="fhir")
    try:
        value = parse_json(data)
    except ParseError:
        if b"\n{" in stripped:  # several JSON objects, one per line
            return parse_ndjson(data)
        raise
    return _inbound(value, "")


def _inbound(value: Any, path: str) -> list[InboundResource]:
    if not isinstance(value, dict):
        raise ParseError("FHIR JSON must be an object", source="fhir", path=path or "$")
    check_resource(value, path or value.get("resourceType", "$"))
    if value["resourceType"] != "Bundle":
        return [InboundResource(value, path or value["resourceType"])]
    out: list[InboundResource] = []
    for index, entry in enumerate(value.get("entry") or []):
        where = f"{path or 'Bundle'}.entry[{index}]"
        if not isinstance(entry, dict):
            raise ValidationError("Bundle entry must be an object", expression=[where])
        full_url = entry.get("fullUrl")
        if full_url is not None and (
            not isinstance(full_url, str) or ":" not in full_url or full_url != full_url.strip()
        ):
            raise ValidationError(
                "Bundle entry fullUrl must be an absolute URL", expression=[where + ".fullUrl"]
            )
        resource = entry.get("resource")
        if resource is None:
            continue  # e.g. a DELETE entry of a transaction: nothing to map
        if not isinstance(resource, dict):
            raise ValidationError("Bundle entry resource must be an object", expression=[where])
        if resource.get("resourceType") == "Bundle":
            out += _inbound(resource, where + ".resource")
            continue
        check_resource(resource, where + ".resource")
        out.append(InboundResource(resource, where + ".resource", full_url))
    return out


def check_resource(resource: Resource, path: str) -> None:
    """Top-level structural checks that reject what no FHIR server would accept."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise ValidationError("resource has no resourceType", expression=[path])
    if rtype not in RESOURCE_TYPES:
        raise ValidationError(f"unknown resourceType {rtype[:60]!r}", expression=[path])
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not _ID_RE.fullmatch(rid)):
        raise ValidationError(f"invalid {rtype}.id", expression=[path + ".id"])
    elements = _elements(rtype)
    for key, value in resource.items():
        if elements and key not in elements and (rtype, key) not in _LEGACY_RENAMES:
            raise ValidationError(
                f"{rtype} has no element {key[:40]!r}", expression=[f"{path}.{key[:40]}"]
            )
        if key in _PRIMITIVES and not isinstance(value, str):
            raise ValidationError(f"{rtype}.{key} must be a string", expression=[f"{path}.{key}"])
        if key in _OBJECTS and not isinstance(value, dict):
            raise ValidationError(f"{rtype}.{key} must be an object", expression=[f"{path}.{key}"])
        if key in _list_elements(rtype) and not isinstance(value, list | dict):
            raise ValidationError(f"{rtype}.{key} must be a list", expression=[f"{path}.{key}"])
        allowed = _ENUMS.get((rtype, key))
        if allowed is not None and (not isinstance(value, str) or value not in allowed):
            raise ValidationError(
                f"{rtype}.{key} {str(value)[:40]!r} is not a valid code",
                expression=[f"{path}.{key}"],
            )


@functools.cache
def _element_table() -> dict[str, dict[str, list[str]]]:
    """codes/fhir-elements.json: each resource type's top-level elements and list elements, as
    the fhir.resources R4B models declare them (a test keeps it equal to the models); read from
    data so normalising never imports and builds the pydantic models."""
    text = importlib_resources.files("mappers.codes").joinpath("fhir-elements.json").read_text()
    table: dict[str, dict[str, list[str]]] = json.loads(text)["resources"]
    return table


@functools.cache
def _elements(rtype: str) -> frozenset[str]:
    """Top-level element names of a resource type (empty: an R4 type R4B dropped, unchecked)."""
    entry = _element_table().get(rtype)
    if entry is None:
        return frozenset()
    return frozenset([*entry["elements"], "resourceType", "fhir_comments"])


@functools.cache
def _list_elements(rtype: str) -> frozenset[str]:
    """Top-level elements with max cardinality * (read tolerantly when sent as one object)."""
    entry = _element_table().get(rtype)
    return frozenset(entry["lists"]) if entry is not None else frozenset()


@functools.lru_cache(maxsize=4096)  # bounded: keys come from what partners send
def _choice_of(key: str) -> str | None:
    """The choice element ([x]) that `key` is one type of (`valueQuantity` -> `value`)."""
    return next((c for c in _CHOICES if key.startswith(c) and key[len(c) :][:1].isupper()), None)


# --------------------------------------------------------------------------- mapping


@dataclass
class _Context:
    source: str
    terms: Terminology
    ids: dict[str, str]  # source reference key -> "Type/newid"
    conditional: dict[tuple[str, str, str], str]  # (type, system, value) -> "Type/newid"
    issues: list[Issue]
    # Each distinct string value once in the output (one object, not one per resource: a pulled
    # source repeats the same systems, codes, units and dates thousands of times).
    strings: dict[str, str] = field(default_factory=dict)


def resources_to_normalised(
    inbound: Iterable[InboundResource], source: str
) -> tuple[list[Resource], list[Issue]]:
    """Normalise inbound FHIR resources of one source document; returns (resources, issues).

    Each inbound resource is let go of once mapped (a caller that streams `inbound` holds
    the source whole only once: as input first, then as output)."""
    items: list[InboundResource | None] = list(inbound)
    ctx = _Context(source, terminology(), {}, {}, [])
    targets: list[str] = []
    for index, item in enumerate(items):
        assert item is not None
        rtype = item.resource["resourceType"]
        src_id = item.resource.get("id") or _uuid_of(item.full_url) or f"entry{index}"
        key = f"{rtype}/{src_id}"
        if key in ctx.ids:
            ctx.issues.append(
                issue(
                    "warning",
                    "duplicate",
                    f"second {rtype} with the same id; given its own id",
                    item.path + ".id",
                )
            )
            src_id = f"{src_id}|{item.path}"
        target = f"{rtype}/{deterministic_id(source, rtype, src_id)}"
        targets.append(target)
        ctx.ids.setdefault(key, target)
        if item.full_url:
            ctx.ids.setdefault(item.full_url, target)
        ctx.ids.setdefault(f"urn:uuid:{src_id}", target)
        ctx.ids.setdefault(f"id:{src_id}", target)
        for ident in _dicts(item.resource.get("identifier")):
            if isinstance(ident, dict) and ident.get("value"):
                ctx.conditional[(rtype, str(ident.get("system", "")), str(ident["value"]))] = target
    out: list[Resource] = []
    inbound_claims: list[list[Any]] = []
    for index, target in enumerate(targets):
        item, items[index] = items[index], None
        assert item is not None
        resource, claimed = _resource_to_normalised(item, target.split("/", 1)[1], ctx)
        inbound_claims.append(claimed)
        out.append(resource)
    ctx.issues += claim_profiles(out, ctx.terms)
    dropped_profiles = sum(
        len([p for p in claimed if p not in (r["meta"].get("profile") or [])])
        for r, claimed in zip(out, inbound_claims, strict=True)
    )
    if dropped_profiles:
        ctx.issues.append(
            issue(
                "information",
                "informational",
                f"{dropped_profiles} inbound meta.profile claims replaced by the profiles "
                "the normalised resource was checked against",
            )
        )
    return out, ctx.issues


def _uuid_of(full_url: str | None) -> str | None:
    if full_url and full_url.startswith("urn:uuid:"):
        return full_url[9:]
    return None


def _resource_to_normalised(
    item: InboundResource, new_id: str, ctx: _Context
) -> tuple[Resource, list[Any]]:
    src = item.resource
    rtype = src["resourceType"]
    path = item.path
    out: Resource = {}
    choices_seen: dict[str, str] = {}
    for key, value in src.items():
        if key in ("meta", "id", "resourceType", "fhir_comments"):
            continue
        renamed = _LEGACY_RENAMES.get((rtype, key))
        if renamed is not None and renamed != key:
            ctx.issues.append(
                issue(
                    "warning",
                    "structure",
                    f"{rtype}.{key} is a pre-R4 element; read as {rtype}.{renamed}",
                    f"{path}.{key}",
                )
            )
            if renamed in src:
                continue
            key = renamed
        choice = _choice_of(key)
        if choice is not None:
            if choice in choices_seen:
                ctx.issues.append(
                    issue(
                        "error",
                        "structure",
                        f"{rtype}.{choice}[x] given twice; kept "
                        f"{choices_seen[choice]}, dropped {key}",
                        f"{path}.{key}",
                    )
                )
                continue
            choices_seen[choice] = key
        if key in _list_elements(rtype) and isinstance(value, dict):
            ctx.issues.append(
                issue(
                    "warning",
                    "structure",
                    f"{rtype}.{key} given as an object, read as a list",
                    f"{path}.{key}",
                )
            )
            value = [value]
        stu3_system = _STU3_CODES.get((rtype, key))
        if stu3_system and isinstance(value, str):
            ctx.issues.append(
                issue(
                    "warning",
                    "structure",
                    f"{rtype}.{key} given as a code (STU3), read as a CodeableConcept",
                    f"{path}.{key}",
                )
            )
            value = {"coding": [{"system": stu3_system, "code": value}]}
        normalised = _walk(value, ctx, (path, key))
        if normalised is not None:
            out[key] = normalised
    if "text" in out and not out["text"].get("div"):
        ctx.issues.append(
            issue(
                "warning",
                "structure",
                f"{rtype}.text has no div; narrative dropped",
                path + ".text",
            )
        )
        del out["text"]
    classes = classify(rtype, out, ctx.terms)
    if "cancer-disease-status" in classes:
        _add_disease_status_code(out, ctx.terms)
    meta_in: dict[str, Any] = src["meta"] if isinstance(src.get("meta"), dict) else {}
    claimed: list[Any] = meta_in["profile"] if isinstance(meta_in.get("profile"), list) else []
    tags = [t for t in _dicts(meta_in.get("tag")) if t.get("system") != CLASS_SYSTEM]
    tags += [{"system": CLASS_SYSTEM, "code": cls} for cls in classes]
    meta: dict[str, Any] = {"source": source_uri(ctx.source)}
    if tags:
        meta["tag"] = tags
    if _dicts(meta_in.get("security")):
        meta["security"] = _dicts(meta_in["security"])
    for key in ("lastUpdated", "versionId"):
        if isinstance(meta_in.get(key), str) and meta_in[key]:
            meta[key] = ctx.strings.setdefault(meta_in[key], meta_in[key])
    rtype = ctx.strings.setdefault(rtype, rtype)
    return {"resourceType": rtype, "id": new_id, "meta": meta, **out}, claimed


# Where a node sits, kept as (parent, step) links and written out only for an issue or an
# error: building the path text of every node of thousands of resources cost more than the
# walk itself.
Path = str | tuple["Path", str | int]


def _path_text(path: Path) -> str:
    steps: list[str] = []
    while isinstance(path, tuple):
        path, step = path
        steps.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return path + "".join(reversed(steps))


def _walk(value: Any, ctx: _Context, path: Path) -> Any:
    """Copy `value` with references rewritten, codings and units normalised, empties dropped."""
    if isinstance(value, str):
        return ctx.strings.setdefault(value, value) if value else None
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                _rewrite_reference(item, value, out, ctx, path)
                continue
            if isinstance(item, str):  # the commonest leaf, without a call
                if item:
                    out[key] = ctx.strings.setdefault(item, item)
                continue
            normalised = _walk(item, ctx, (path, key))
            if normalised is not None:
                out[key] = normalised
        if "system" in out and not isinstance(out["system"], str):
            raise ValidationError(
                "system must be a string", expression=[_path_text(path) + ".system"]
            )
        if "system" in out and "code" in out and not isinstance(out["code"], str):
            raise ValidationError("code must be a string", expression=[_path_text(path) + ".code"])
        if "coding" in out:
            codings = out["coding"]
            if not isinstance(codings, list) or not all(isinstance(c, dict) for c in codings):
                raise ValidationError(
                    "coding must be a list of Codings", expression=[_path_text(path) + ".coding"]
                )
            _add_canonical_codings(codings, ctx.terms)
        elif "value" in out and ("unit" in out or "code" in out):
            _normalise_quantity(out, ctx.terms)
        return out or None
    if isinstance(value, list):
        items = [_walk(v, ctx, (path, i)) for i, v in enumerate(value)]
        kept = [v for v in items if v is not None]
        return kept or None
    return value


def _rewrite_reference(
    ref: str, source: dict[str, Any], out: dict[str, Any], ctx: _Context, path: Path
) -> None:
    if ref.startswith("#"):
        out["reference"] = ref
        return
    target = ctx.ids.get(ref)
    if target is None and "/" not in ref and "?" not in ref and ":" not in ref:
        target = ctx.ids.get(f"id:{ref}")  # a bare id: tolerated when it names one resource here
    if target is None and ("/" in ref or "?" in ref) and not ref.startswith(("urn:", "http")):
        rtype = re.split(r"[/?]", ref, maxsplit=1)[0]
        if rtype not in RESOURCE_TYPES:
            raise ValidationError(
                f"reference to unknown resource type {rtype[:40]!r}",
                expression=[_path_text(path) + ".reference"],
            )
    if target is None and "?" in ref:
        rtype, _, query = ref.partition("?")
        if query.startswith("identifier="):
            system, _, value = query[len("identifier=") :].rpartition("|")
            target = ctx.conditional.get((rtype, system, value))
    if target is None and not ref.startswith("urn:") and "?" not in ref:
        parts = ref.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] in RESOURCE_TYPES and _ID_RE.fullmatch(parts[-1]):
            # Relative or absolute `Type/id`: the id it will have when that resource arrives
            # from the same source; the bundle assembler reports it if it never does.
            target = ctx.ids.get(f"{parts[-2]}/{parts[-1]}") or (
                f"{parts[-2]}/{deterministic_id(ctx.source, parts[-2], parts[-1])}"
            )
    if target is not None:
        out["reference"] = target
        return
    ctx.issues.append(
        issue(
            "warning",
            "not-found",
            "reference does not resolve in its source; kept as display",
            _path_text(path) + ".reference",
        )
    )
    if "display" not in source:
        out["display"] = "unresolved reference"


def _add_canonical_codings(codings: list[Any], terms: Terminology) -> None:
    present = {(c.get("system"), c.get("code")) for c in codings if isinstance(c, dict)}
    for c in list(codings):
        if not isinstance(c, dict) or not isinstance(c.get("system"), str) or "code" not in c:
            continue
        canonical = terms.canonical_system(c["system"])
        if canonical and (canonical, c["code"]) not in present:
            codings.append(coding(canonical, c["code"], c.get("display")))
            present.add((canonical, c["code"]))


def _normalise_quantity(quantity: dict[str, Any], terms: Terminology) -> None:
    if not isinstance(quantity.get("value"), int | float) or isinstance(quantity["value"], bool):
        return
    system = quantity.get("system")
    if system is not None and system != UCUM and terms.canonical_system(system) != UCUM:
        return  # another unit system: keep as sent
    spelled = quantity.get("code") or quantity.get("unit")
    if not isinstance(spelled, str):
        return
    ucum = terms.ucum(spelled)
    if ucum is None:
        return
    quantity.setdefault("unit", spelled)
    quantity["system"] = UCUM
    quantity["code"] = ucum


def _add_disease_status_code(resource: Resource, terms: Terminology) -> None:
    system, code, display = terms.disease_status_emit
    codings = resource.get("code", {}).get("coding") or []
    if not any(c.get("system") == system and c.get("code") == code for c in codings):
        codings.append(coding(system, code, display))  # MC-40: accept 88040-1, emit 97509-4


# --------------------------------------------------------------------------- classification


def _codings(concept: Any) -> Iterable[tuple[str, str]]:
    if isinstance(concept, dict):
        for c in concept.get("coding") or []:
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                yield c.get("system") or "", c["code"]


def _category_codings(resource: Resource) -> Iterable[tuple[str, str]]:
    for concept in resource.get("category") or []:
        yield from _codings(concept)


_CODE_ELEMENT = {
    "MedicationRequest": "medicationCodeableConcept",
    "MedicationStatement": "medicationCodeableConcept",
    "MedicationAdministration": "medicationCodeableConcept",
    "DocumentReference": "type",
}
_CLASSES_BY_TYPE: dict[str, frozenset[str]] = {
    "Condition": frozenset({"primary-cancer-condition", "secondary-cancer-condition"}),
    "Observation": frozenset(
        {"tnm-stage-group", "tnm-primary-tumor-category", "tnm-regional-nodes-category"}
        | {"tnm-distant-metastases-category", "tumor-marker", "genomic-variant"}
        | {"genomic-region-studied", "cancer-disease-status", "tumor-size", "tumor-morphology"}
        | {"performance-status", "cancer-stage", "lab-result", "imaging-report"}
    ),
    "DiagnosticReport": frozenset(
        {"pathology-report", "genomics-report", "imaging-report", "lab-result"}
    ),
    "DocumentReference": frozenset({"pathology-report", "imaging-report"}),
    "Procedure": frozenset({"cancer-surgery", "radiation-procedure"}),
    "MedicationRequest": frozenset({"cancer-medication"}),
    "MedicationStatement": frozenset({"cancer-medication"}),
    "MedicationAdministration": frozenset({"cancer-medication"}),
}


def classify(rtype: str, resource: Resource, terms: Terminology | None = None) -> list[str]:
    """Classes of a resource, by code first and by category second (MC-30, MC-31)."""
    if rtype == "ImagingStudy":
        return ["imaging-study"]
    allowed = _CLASSES_BY_TYPE.get(rtype)
    if allowed is None:
        return []
    terms = terms or terminology()
    concept = resource.get(_CODE_ELEMENT.get(rtype, "code"))
    by_code = [terms.classify_code(s, c) for s, c in _codings(concept)]
    by_category = [terms.classify_category(s, c) for s, c in _category_codings(resource)]
    if rtype == "DocumentReference":
        by_category = []  # document categories say little; the type code decides
    found: list[str] = []
    for cls in by_code + by_category:
        if cls and cls in allowed and cls not in found:
            found.append(cls)
    # A specific class makes the generic ones redundant.
    specific = [c for c in found if c not in ("lab-result", "cancer-stage")]
    if specific and "cancer-stage" in found and any(c.startswith("tnm-") for c in found):
        found.remove("cancer-stage")
    if specific and "lab-result" in found and rtype == "DiagnosticReport":
        found.remove("lab-result")
    return found


# --------------------------------------------------------------------------- profiles


def _dicts(value: Any) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]


def annotate(resources: list[Resource]) -> list[Issue]:
    """Classify and profile resources built by the other mappers (same rules as inbound FHIR)."""
    terms = terminology()
    for resource in resources:
        classes = classify(resource["resourceType"], resource, terms)
        meta = resource.setdefault("meta", {})
        if classes:
            meta["tag"] = [{"system": CLASS_SYSTEM, "code": cls} for cls in classes]
    return claim_profiles(resources, terms)


def document_to_resources(data: bytes, source: str) -> MapResult:
    """Parse + normalise one FHIR JSON document (resource, Bundle or NDJSON)."""
    resources, issues = resources_to_normalised(parse_fhir(data), source)
    return MapResult(resources, issues, "fhir")


__all__ = [
    "LOINC",
    "MCODE",
    "US_CORE",
    "InboundResource",
    "classify",
    "conforming_profiles",
    "document_to_resources",
    "parse_fhir",
    "parse_json",
    "parse_ndjson",
    "resources_to_normalised",
]
