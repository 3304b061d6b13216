"""The US Core 6.1.0 / mCODE STU4 (4.0.0) profiles a normalised resource may claim (meta.profile).

A profile is claimed only when the resource meets the rules of it that a mapper can check
(cardinalities, fixed codes, value types, the IG's own value sets in mappers/codes/
mcode-value-sets.json, and references into the same source batch). When a rule cannot be met the
profile is not claimed, and where the gap is worth a reviewer's attention an OperationOutcome
issue says why. Rules per profile: docs/normalisation.md; sources: HL7/fhir-mCODE-ig @543477b
`input/fsh/SD_*.fsh` (STANDARDS.md §1.2).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from fhir_gateway.resources import LOINC, SNOMED, UCUM, Resource, coding
from mappers._common import Issue, issue
from mappers.terminology import Terminology, terminology
from mappers.units import canonical_marker_quantity

MCODE = "http://hl7.org/fhir/us/mcode/StructureDefinition/"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
US_CORE_CONDITION_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/condition-category"
CONDITION_RELATED = "http://hl7.org/fhir/StructureDefinition/condition-related"
STU1_RELATED_PRIMARY = MCODE + "mcode-related-primary-cancer-condition"
HISTOLOGY_EXT = MCODE + "mcode-histology-morphology-behavior"

# CancerDiseaseStatusEvidenceTypeVS (required binding on Condition.evidence.code; VS_Other.fsh):
# SNOMED is-a roots; without a terminology server only the roots themselves are recognised.
EVIDENCE_TYPES = frozenset(
    {"714797009", "116147009", "108257001", "386344002", "5880005", "363679005", "250724005"}
)
# SD_Radiotherapy.fsh: RadiotherapyCourseSummary.code is fixed to this concept.
RADIOTHERAPY_COURSE = "1217123003"
# SD_Radiotherapy.fsh termination-reason invariants: statusReason codes allowed only when stopped.
TERMINATION_REASONS = frozenset(
    {"182992009", "266721009", "407563006", "160932005", "105480006", "184081006"}
    | {"309846006", "399307001", "419620001", "7058009", "443729008", "77386006"}
)
ECOG, KARNOFSKY = "89247-1", "89243-0"
TUMOR_SIZE, LONGEST, OTHER_DIM = "21889-1", "33728-7", "33729-5"
GENOMIC_VARIANT, REGION_STUDIED = "69548-6", "53041-0"
_CANCER_CONDITIONS = ("primary-cancer-condition", "secondary-cancer-condition")


@dataclass
class ClaimContext:
    """What the resources of one source batch say about each other."""

    by_ref: dict[str, Resource] = field(default_factory=dict)  # "Type/id" -> resource
    primary: set[str] = field(default_factory=set)  # refs of claimed primary cancer conditions
    cancer: set[str] = field(default_factory=set)  # primary + secondary
    cancer_patients: set[str] = field(default_factory=set)
    issues: list[Issue] = field(default_factory=list)
    scope: str = "source"  # what the context spans, for messages: "source" or "case"


# --------------------------------------------------------------------------- small readers


def _codings(concept: Any) -> Iterable[tuple[str, str]]:
    if isinstance(concept, dict):
        for c in concept.get("coding") or []:
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                yield c.get("system") or "", c["code"]


def _dicts(value: Any) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]


def _has_coding(concepts: Any, system: str, codes: Collection[str]) -> bool:
    """Whether a concept (or a list of them) has a coding of `system` with one of `codes`.
    Plain loops: it runs several times per Observation of a case (a 5,000-result case)."""
    for item in concepts if isinstance(concepts, list) else (concepts,):
        if not isinstance(item, dict):
            continue
        for c in item.get("coding") or ():
            if isinstance(c, dict):
                code = c.get("code")
                if isinstance(code, str) and code in codes and (c.get("system") or "") == system:
                    return True
    return False


def _ref(value: Any) -> str:
    ref = value.get("reference") if isinstance(value, dict) else None
    return ref if isinstance(ref, str) else ""


def _subject(resource: Resource, key: str = "subject") -> bool:
    return _ref(resource.get(key)).startswith("Patient/")


def _effective(resource: Resource) -> bool:
    return any(k.startswith("effective") for k in resource)


def _value_keys(resource: Resource) -> list[str]:
    return [k for k in resource if k.startswith("value") and k[5:6].isupper()]


def _value(resource: Resource) -> bool:
    return bool(_value_keys(resource)) or "dataAbsentReason" in resource


def _rid(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource.get('id', '')}"


def _classes(resource: Resource) -> list[str]:
    from mappers.terminology import CLASS_SYSTEM

    tags = resource.get("meta", {}).get("tag") or []
    return [t["code"] for t in _dicts(tags) if t.get("system") == CLASS_SYSTEM and "code" in t]


def _observation_category(resource: Resource, *codes: str) -> bool:
    if codes:
        return _has_coding(resource.get("category"), OBS_CATEGORY, codes)
    return any(s == OBS_CATEGORY for c in _dicts(resource.get("category")) for s, _ in _codings(c))


def _code_in_vs(resource: Resource, cls: str, terms: Terminology) -> bool:
    return any(terms.classify_code(s, c) == cls for s, c in _codings(resource.get("code")))


# --------------------------------------------------------------------------- per profile


def _condition_profiles(r: Resource, terms: Terminology) -> list[str]:
    out: list[str] = []
    category = r.get("category") or []
    problem = _has_coding(category, CONDITION_CATEGORY, {"problem-list-item"}) or _has_coding(
        category, US_CORE_CONDITION_CATEGORY, {"health-concern"}
    )
    encounter_dx = _has_coding(category, CONDITION_CATEGORY, {"encounter-diagnosis"})
    basic = _subject(r) and bool(r.get("code"))
    if basic and encounter_dx:
        out.append(US_CORE + "us-core-condition-encounter-diagnosis")
    if not (basic and problem and r.get("clinicalStatus")):
        return out
    out.append(US_CORE + "us-core-condition-problems-health-concerns")
    evidence_ok = all(
        all(s == SNOMED and c in EVIDENCE_TYPES for s, c in _codings(concept))
        for ev in _dicts(r.get("evidence"))
        for concept in _dicts(ev.get("code"))
    )
    histology_ok = all(
        isinstance(e.get("valueCodeableConcept"), dict)
        for e in _dicts(r.get("extension"))
        if e.get("url") == HISTOLOGY_EXT
    )
    if not (evidence_ok and histology_ok):
        return out
    if _code_in_vs(r, "primary-cancer-condition", terms):
        out.append(MCODE + "mcode-primary-cancer-condition")
    elif _code_in_vs(r, "secondary-cancer-condition", terms) and "stage" not in r:
        out.append(MCODE + "mcode-secondary-cancer-condition")
    return out


def _patient_profiles(r: Resource, ctx: ClaimContext) -> list[str]:
    ids_ok = any(i.get("system") and i.get("value") for i in _dicts(r.get("identifier")))
    name_ok = any(n.get("family") or n.get("given") for n in _dicts(r.get("name")))
    if not (ids_ok and name_ok and r.get("gender")):
        return []
    out = [US_CORE + "us-core-patient"]
    if _rid(r) in ctx.cancer_patients:
        out.append(MCODE + "mcode-cancer-patient")
    return out


def _tnm_profile(r: Resource, cls: str, ctx: ClaimContext, basic: bool) -> list[str]:
    """TNMStageGroup / TNM category: method 1..1, value CodeableConcept, focus -> primary cancer."""
    where = _rid(r)
    focus = [_ref(f) for f in _dicts(r.get("focus"))]
    if not focus:
        if len(ctx.primary) == 1:
            target = next(iter(ctx.primary))
            r["focus"] = [{"reference": target}]
            focus = [target]
            ctx.issues.append(
                issue(
                    "information",
                    "informational",
                    f"{cls}: focus was empty; set to the only primary cancer condition of "
                    f"this {ctx.scope}",
                    where + ".focus",
                )
            )
        else:
            ctx.issues.append(
                issue(
                    "warning",
                    "incomplete",
                    f"{cls}: no focus and {len(ctx.primary)} primary cancer conditions in this "
                    f"{ctx.scope}; mcode-{cls} not claimed",
                    where + ".focus",
                )
            )
            return []
    if not all(f in ctx.primary for f in focus):
        ctx.issues.append(
            issue(
                "warning",
                "business-rule",
                f"{cls}: focus is not a primary cancer condition of this {ctx.scope}; "
                f"mcode-{cls} not claimed",
                where + ".focus",
            )
        )
        return []
    if not r.get("method"):
        ctx.issues.append(
            issue(
                "warning",
                "incomplete",
                f"{cls}: no method (staging system); mcode-{cls} not claimed (MC-22)",
                where + ".method",
            )
        )
        return []
    not_used = {"device", "referenceRange"} & set(r)
    shape_ok = _value_keys(r) == ["valueCodeableConcept"] and not not_used
    if cls == "tnm-stage-group":
        shape_ok = shape_ok and "component" not in r
    else:
        shape_ok = shape_ok and "hasMember" not in r
    if basic and shape_ok and _observation_category(r):
        return [MCODE + "mcode-" + cls]
    return []


def _performance_status(r: Resource, code: str, profile: str) -> list[str]:
    """ECOG / Karnofsky (SD_PerformanceStatus.fsh): fixed LOINC code, valueInteger, patient."""
    if not _has_coding(r.get("code"), LOINC, {code}):
        return []
    not_used = {"bodySite", "specimen", "device", "hasMember", "component"} & set(r)
    effective_ok = not _effective(r) or "effectiveDateTime" in r or "effectivePeriod" in r
    interpretation_ok = all(
        all(s == LOINC and c.startswith("LA") for s, c in _codings(i))
        for i in _dicts(r.get("interpretation"))
    )
    if (
        r.get("status")
        and _subject(r)
        and _value_keys(r) == ["valueInteger"]
        and not not_used
        and effective_ok
        and interpretation_ok
        and _observation_category(r)
    ):
        return [MCODE + profile]
    return []


def _tumor_size(r: Resource, ctx: ClaimContext) -> list[str]:
    """TumorSize (SD_TumorSize.fsh): fixed code, longest dimension 1..1 in mm/cm, and exactly
    one of focus / specimen."""
    if not _has_coding(r.get("code"), LOINC, {TUMOR_SIZE}) or _value_keys(r) or not _subject(r):
        return []
    comps = _dicts(r.get("component"))
    longest = [c for c in comps if _has_coding(c.get("code"), LOINC, {LONGEST})]
    other = [c for c in comps if _has_coding(c.get("code"), LOINC, {OTHER_DIM})]

    def unit_ok(c: dict[str, Any]) -> bool:
        q = c.get("valueQuantity")
        return isinstance(q, dict) and q.get("system") == UCUM and q.get("code") in ("mm", "cm")

    focus = [_ref(f) for f in _dicts(r.get("focus"))]
    specimen = _ref(r.get("specimen"))
    site_ok = (len(focus) == 1 and focus[0].startswith("BodyStructure/") and not specimen) or (
        not focus and specimen.startswith("Specimen/")
    )
    if not site_ok:
        ctx.issues.append(
            issue(
                "warning",
                "invariant",
                "tumor size needs exactly one of focus (Tumor) or specimen "
                "(must-have-focus-or-specimen-invariant); mcode-tumor-size not claimed",
                _rid(r),
            )
        )
        return []
    if len(longest) == 1 and len(other) <= 2 and all(unit_ok(c) for c in longest + other):
        return [MCODE + "mcode-tumor-size"]
    return []


def _reason_is_cancer(r: Resource, ctx: ClaimContext, terms: Terminology) -> bool | None:
    """True: a reason points at a cancer condition; False: reasons exist but none is cancer, or
    one points at something not a Condition; None: no reason given."""
    refs = [_ref(x) for x in _dicts(r.get("reasonReference"))]
    codes = [(s, c) for cc in _dicts(r.get("reasonCode")) for s, c in _codings(cc)]
    if not refs and not codes:
        return None
    if any(ref and not ref.startswith("Condition/") for ref in refs):
        return False
    by_code = any(terms.classify_code(s, c) in _CANCER_CONDITIONS for s, c in codes)
    return by_code or any(ref in ctx.cancer for ref in refs)


def _termination_ok(r: Resource) -> bool:
    # CodeableConcept on MedicationRequest and Procedure, a list on MedicationAdministration.
    reasons = [(s, c) for cc in _dicts(r.get("statusReason")) for s, c in _codings(cc)]
    listed = any(s == SNOMED and c in TERMINATION_REASONS for s, c in reasons)
    if listed and r.get("status") != "stopped":
        return False
    return not (r.get("status") == "stopped" and reasons and not listed)


def _cancer_related(
    r: Resource, classes: list[str], ctx: ClaimContext, terms: Terminology, profile: str
) -> bool:
    reason = _reason_is_cancer(r, ctx, terms)
    if reason is False or not _termination_ok(r):
        return False
    if reason is None:
        if "cancer-medication" not in classes and "cancer-surgery" not in classes:
            return False
        ctx.issues.append(
            issue(
                "warning",
                "business-rule",
                f"{profile}: no reasonCode or reasonReference (mcode-reason-required, a warning "
                "in STU4); claimed from the code",
                _rid(r),
            )
        )
    return True


def _medication_profiles(
    r: Resource, classes: list[str], ctx: ClaimContext, terms: Terminology
) -> list[str]:
    rtype = r["resourceType"]
    medication = "medicationCodeableConcept" in r or "medicationReference" in r
    if not (r.get("status") and medication and _subject(r)):
        return []
    out: list[str] = []
    if rtype == "MedicationRequest":
        if not (r.get("intent") and r.get("authoredOn") and r.get("requester")):
            return []
        out.append(US_CORE + "us-core-medicationrequest")
        profile = "mcode-cancer-related-medication-request"
    else:
        if not _effective(r):
            return []
        profile = "mcode-cancer-related-medication-administration"
    if _cancer_related(r, classes, ctx, terms, profile):
        out.append(MCODE + profile)
    return out


def _procedure_profiles(
    r: Resource, classes: list[str], ctx: ClaimContext, terms: Terminology
) -> list[str]:
    performed = any(k.startswith("performed") for k in r)
    if not (r.get("status") and r.get("code") and _subject(r) and performed):
        return []
    out = [US_CORE + "us-core-procedure"]
    if _has_coding(r.get("code"), SNOMED, {RADIOTHERAPY_COURSE}):
        if "performedPeriod" in r and _termination_ok(r):
            if _reason_is_cancer(r, ctx, terms) is None:
                ctx.issues.append(
                    issue(
                        "warning",
                        "business-rule",
                        "radiotherapy course summary without reason (mcode-reason-required)",
                        _rid(r),
                    )
                )
            if _reason_is_cancer(r, ctx, terms) is not False:
                out.append(MCODE + "mcode-radiotherapy-course-summary")
        return out
    if "cancer-surgery" in classes and _reason_is_cancer(r, ctx, terms):
        out.append(MCODE + "mcode-cancer-related-surgical-procedure")
    return out


def _genomics_observation(r: Resource, basic: bool) -> list[str]:
    """GenomicVariant / GenomicRegionStudied: fixed LOINC code, category laboratory, patient."""
    if not (basic and _observation_category(r, "laboratory")):
        return []
    if _has_coding(r.get("code"), LOINC, {GENOMIC_VARIANT}):
        if "hasMember" in r or "referenceRange" in r or not _dicts(r.get("component")):
            return []
        if set(_value_keys(r)) <= {"valueCodeableConcept"}:
            return [MCODE + "mcode-genomic-variant"]
    if _has_coding(r.get("code"), LOINC, {REGION_STUDIED}):
        return [MCODE + "mcode-genomic-region-studied"]
    return []


def _observation_profiles(
    r: Resource, classes: list[str], ctx: ClaimContext, terms: Terminology
) -> list[str]:
    out: list[str] = []
    basic = bool(r.get("status")) and _subject(r) and bool(r.get("code"))
    lab = _observation_category(r, "laboratory")
    tnm = [c for c in classes if c.startswith("tnm-")]
    if tnm:
        out += _tnm_profile(r, tnm[0], ctx, basic)
    if basic and lab and _value(r) and _effective(r):
        out.append(US_CORE + "us-core-observation-lab")
        value_types = set(_value_keys(r))
        if "tumor-marker" in classes:
            effective_ok = "effectiveDateTime" in r or "effectivePeriod" in r
            if (
                len(value_types) == 1
                and value_types <= terms.tumor_marker_value_types
                and effective_ok
            ):
                out.append(MCODE + "mcode-tumor-marker-test")
            else:
                ctx.issues.append(
                    issue(
                        "information",
                        "informational",
                        "tumour marker result has no value of type Quantity, CodeableConcept, "
                        "string or Ratio; mcode-tumor-marker-test not claimed (MC-25)",
                        _rid(r),
                    )
                )
    status_ok = "cancer-disease-status" in classes and "valueCodeableConcept" in r
    if basic and status_ok and r.get("focus") and "effectiveDateTime" in r:
        out.append(MCODE + "mcode-cancer-disease-status")
    out += _performance_status(r, ECOG, "mcode-ecog-performance-status")
    out += _performance_status(r, KARNOFSKY, "mcode-karnofsky-performance-status")
    if "tumor-size" in classes:
        out += _tumor_size(r, ctx)
    out += _genomics_observation(r, basic)
    return out


def _report_profiles(r: Resource, classes: list[str]) -> list[str]:
    out: list[str] = []
    lab = _has_coding(r.get("category"), V2_0074, {"LAB"})
    required = r.get("status") and r.get("code") and r.get("issued")
    if lab and required and _subject(r) and _effective(r):
        out.append(US_CORE + "us-core-diagnosticreport-lab")
    genetics = _has_coding(r.get("category"), V2_0074, {"GE"})
    if "genomics-report" in classes and genetics and r.get("status") and _subject(r):
        out.append(MCODE + "mcode-genomics-report")
    return out


def _specimen_profiles(r: Resource, ctx: ClaimContext) -> list[str]:
    if not (r.get("type") and _subject(r)):
        return []
    out = [US_CORE + "us-core-specimen"]
    if _ref(r.get("subject")) in ctx.cancer_patients:
        out.append(MCODE + "mcode-human-specimen")
    return out


def conforming_profiles(
    rtype: str,
    r: Resource,
    classes: list[str],
    ctx: ClaimContext | None = None,
    terms: Terminology | None = None,
) -> list[str]:
    """Profiles whose checked constraints `r` meets (never a profile it fails)."""
    ctx = ctx if ctx is not None else ClaimContext()
    terms = terms or terminology()
    if rtype == "Patient":
        return _patient_profiles(r, ctx)
    if rtype == "Condition":
        return _condition_profiles(r, terms)
    if rtype == "Observation":
        return _observation_profiles(r, classes, ctx, terms)
    if rtype == "DiagnosticReport":
        return _report_profiles(r, classes)
    if rtype == "Procedure":
        return _procedure_profiles(r, classes, ctx, terms)
    if rtype in ("MedicationRequest", "MedicationAdministration"):
        return _medication_profiles(r, classes, ctx, terms)
    if rtype == "Specimen":
        return _specimen_profiles(r, ctx)
    return []


# --------------------------------------------------------------------------- the batch pass


def _normalise_condition(r: Resource, terms: Terminology, issues: list[Issue]) -> None:
    """A recognised cancer condition gets the US Core problem-list category its mCODE profile's
    parent (US Core Condition Problems and Health Concerns) requires; STU1's related-primary
    extension becomes the core `condition-related` extension STU4 uses."""
    is_cancer = any(_code_in_vs(r, cls, terms) for cls in _CANCER_CONDITIONS)
    if not is_cancer:
        return
    category = r.get("category") or []
    problem = _has_coding(category, CONDITION_CATEGORY, {"problem-list-item"}) or _has_coding(
        category, US_CORE_CONDITION_CATEGORY, {"health-concern"}
    )
    if not problem:
        r["category"] = [
            *category,
            {"coding": [coding(CONDITION_CATEGORY, "problem-list-item", "Problem List Item")]},
        ]
        issues.append(
            issue(
                "information",
                "informational",
                "cancer condition given category problem-list-item (kept the source's "
                "categories) so it meets US Core Problems, the parent of the mCODE profile",
                _rid(r) + ".category",
            )
        )
    for ext in _dicts(r.get("extension")):
        if ext.get("url") == STU1_RELATED_PRIMARY and "valueReference" in ext:
            ext["url"] = CONDITION_RELATED


def claim_profiles(resources: list[Resource], terms: Terminology | None = None) -> list[Issue]:
    """Set meta.profile on every resource of one source batch; returns the issues found.

    Conditions first (no context needed), then everything whose claim depends on them (stage
    focus, cancer patient, cancer-related treatment). Tumour-marker quantities are converted to
    the marker's canonical unit before the claim is checked.
    """
    terms = terms or terminology()
    ctx = ClaimContext()
    seen: dict[str, str] = {}  # profile URLs, each one str across the batch
    for r in resources:
        ctx.by_ref[_rid(r)] = r
    for r in resources:
        if r["resourceType"] != "Condition":
            continue
        _normalise_condition(r, terms, ctx.issues)
        profiles = _condition_profiles(r, terms)
        _set_profiles(r, profiles, seen)
        if MCODE + "mcode-primary-cancer-condition" in profiles:
            ctx.primary.add(_rid(r))
        if any(p.startswith(MCODE) for p in profiles):
            ctx.cancer.add(_rid(r))
            ctx.cancer_patients.add(_ref(r.get("subject")))
    for r in resources:
        rtype = r["resourceType"]
        if rtype == "Condition":
            continue
        classes = _classes(r)
        if "tumor-marker" in classes and isinstance(r.get("valueQuantity"), dict):
            found = canonical_marker_quantity(r, terms)
            if found is not None:
                ctx.issues.append(found)
        _set_profiles(r, conforming_profiles(rtype, r, classes, ctx, terms), seen)
    return ctx.issues


def _set_profiles(r: Resource, profiles: list[str], seen: dict[str, str]) -> None:
    meta = r.setdefault("meta", {})
    if profiles:
        meta["profile"] = [seen.setdefault(p, p) for p in profiles]  # each URL one str
    else:
        meta.pop("profile", None)


__all__ = ["MCODE", "US_CORE", "ClaimContext", "claim_profiles", "conforming_profiles"]
