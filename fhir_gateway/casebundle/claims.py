"""mCODE claims that depend on other resources, checked again over the whole case (pure).

The mappers claim profiles per source document (`mappers.profiles.claim_profiles`): a TNM
staging is claimed only when its `focus` is a primary cancer condition of the same source, a
procedure or medication only when its reason is a cancer condition of the same source. Once the
case is assembled (duplicates merged, references pointing at the kept resources), these claims are
decided again with every cancer condition of the case in view:

- a staging whose focus resolves to a primary cancer condition from another source is claimed;
- a staging whose source left `focus` empty gets the case's primary cancer condition when the
  case has exactly one (information issue); otherwise a warning says why it is not claimed;
- cancer-related procedures, medications and radiotherapy courses, the CancerPatient and
  HumanSpecimen claims are checked again the same way.

A resource's per-source warnings about a claim that the case now makes are replaced by one
information issue; a claim is only ever added here, never taken away.
"""

from __future__ import annotations

from typing import Any

from fhir_gateway.resources import Resource
from mappers.profiles import MCODE, ClaimContext, conforming_profiles
from mappers.terminology import CLASS_SYSTEM, terminology

Issue = dict[str, Any]

PRIMARY = MCODE + "mcode-primary-cancer-condition"
SECONDARY = MCODE + "mcode-secondary-cancer-condition"
# Resource types whose mCODE claim depends on other resources of the case.
DEPENDENT_TYPES = frozenset(
    {"Observation", "Procedure", "MedicationRequest", "MedicationAdministration"}
    | {"Specimen", "Patient"}
)


def _profiles(resource: Resource) -> list[str]:
    return list((resource.get("meta") or {}).get("profile") or [])


def _classes(resource: Resource) -> list[str]:
    return [
        str(t["code"])
        for t in (resource.get("meta") or {}).get("tag") or []
        if isinstance(t, dict) and t.get("system") == CLASS_SYSTEM and "code" in t
    ]


def _ref(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _subject(resource: Resource) -> str:
    subject = resource.get("subject")
    ref = subject.get("reference") if isinstance(subject, dict) else None
    return ref if isinstance(ref, str) else ""


def _depends_on_case(resource: Resource, classes: list[str]) -> bool:
    rtype = resource["resourceType"]
    if rtype not in DEPENDENT_TYPES:
        return False
    if rtype == "Observation":
        return any(c.startswith("tnm-") for c in classes)
    return True


def case_context(resources: list[Resource]) -> ClaimContext:
    """The claimed cancer conditions of the whole case, and the patients they are about."""
    ctx = ClaimContext(scope="case")
    for resource in resources:
        ctx.by_ref[_ref(resource)] = resource
        if resource["resourceType"] != "Condition":
            continue
        profiles = _profiles(resource)
        if PRIMARY in profiles:
            ctx.primary.add(_ref(resource))
        if PRIMARY in profiles or SECONDARY in profiles:
            ctx.cancer.add(_ref(resource))
            if _subject(resource):
                ctx.cancer_patients.add(_subject(resource))
    return ctx


def claim_across_case(resources: list[Resource], issues: list[Issue]) -> int:
    """Decide the dependent mCODE claims again over the assembled case (in place).

    `issues` are the case's issues so far (each source's issues, expressions prefixed with
    `<source>#`); stale per-source warnings are replaced and new issues appended. Returns how
    many resources gained an mCODE profile.
    """
    ctx = case_context(resources)
    terms = terminology()
    gained = 0
    for resource in resources:
        classes = _classes(resource)
        if not _depends_on_case(resource, classes):
            continue
        before = _profiles(resource)
        probe = ClaimContext(
            by_ref=ctx.by_ref,
            primary=ctx.primary,
            cancer=ctx.cancer,
            cancer_patients=ctx.cancer_patients,
            scope="case",
        )
        focus_before = resource.get("focus")
        after = conforming_profiles(resource["resourceType"], resource, classes, probe, terms)
        new_mcode = [p for p in after if p.startswith(MCODE) and p not in before]
        if not new_mcode:
            # Nothing gained: keep what the source claimed, and the source's focus.
            if focus_before is None:
                resource.pop("focus", None)
            if any(c.startswith("tnm-") for c in classes) and not _has_mcode(before):
                _replace_claim_issues(issues, resource, probe.issues)
            continue
        gained += 1
        meta = resource.setdefault("meta", {})
        meta["profile"] = list(dict.fromkeys([*before, *after]))
        _replace_claim_issues(
            issues,
            resource,
            [
                *probe.issues,
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"{', '.join(p.removeprefix(MCODE) for p in new_mcode)} "
                    "claimed over the whole case (the cancer condition it depends on came "
                    "from another source)",
                    "expression": [_ref(resource)],
                },
            ],
        )
    if gained:
        issues.append(
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": f"{gained} resources claimed an mCODE profile over the whole case",
            }
        )
    return gained


def _has_mcode(profiles: list[str]) -> bool:
    return any(p.startswith(MCODE) for p in profiles)


def _about(issue: Issue, ref: str) -> bool:
    """An issue about `ref` (expressions `<source>#Type/id...` or `Type/id...`)."""
    for expression in issue.get("expression") or []:
        local = str(expression).rpartition("#")[2]
        if local == ref or local.startswith(ref + "."):
            return True
    return False


def _replace_claim_issues(issues: list[Issue], resource: Resource, new: list[Issue]) -> None:
    """Drop the per-source issues about this resource's mCODE claim; add the case's."""
    ref = _ref(resource)
    keep = [
        i
        for i in issues
        if not (
            _about(i, ref)
            and i.get("severity") in ("warning", "information")
            and (
                "not claimed" in str(i.get("diagnostics", ""))
                or "focus was empty" in str(i.get("diagnostics", ""))
            )
        )
    ]
    issues[:] = keep + new


__all__ = ["DEPENDENT_TYPES", "case_context", "claim_across_case"]
