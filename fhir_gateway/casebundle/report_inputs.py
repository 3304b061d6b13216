"""The consult question and the specimens of a built case, as the report needs them.

Read from the stored case bundle (its summary's `question` and `specimens`), so only specimens
that made it into the bundle are named. Each specimen is given a reference the destination EHR
can resolve: its URL on the EHR it was pulled from, or our own URL for one the referral pushed;
and its accession identifier, which works without any reference.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway.casebundle.consult import question_text, specimen_label
from fhir_gateway.casebundle.normalise import referral_source
from fhir_gateway.resources import deterministic_id
from fhir_gateway.store.models import Case, CaseBundleState, FhirResource, StoredResource
from mappers.report import ReportSpecimen


def _source_urls(session: Session, case: Case, public_fhir_base: str) -> dict[str, str]:
    """Normalised `Specimen/<id>` -> the URL of the specimen where it came from."""
    out: dict[str, str] = {}
    pulled = session.scalars(
        select(StoredResource).where(
            StoredResource.case_id == case.id, StoredResource.resource_type == "Specimen"
        )
    )
    for row in pulled:
        src_id = str((row.body or {}).get("id") or row.source_id)
        if row.source.startswith(("http://", "https://")):
            normalised = deterministic_id(row.source, "Specimen", src_id)
            out[f"Specimen/{normalised}"] = f"{row.source.rstrip('/')}/Specimen/{src_id}"
    hosted = session.scalars(
        select(FhirResource).where(
            FhirResource.case_id == case.id, FhirResource.resource_type == "Specimen"
        )
    )
    source = referral_source(case)
    for hosted_row in hosted:
        rid = str(hosted_row.id)
        normalised = deterministic_id(source, "Specimen", rid)
        out[f"Specimen/{normalised}"] = f"{public_fhir_base.rstrip('/')}/Specimen/{rid}"
    return out


def report_question_and_specimens(
    session: Session, case: Case, public_fhir_base: str
) -> tuple[str, tuple[ReportSpecimen, ...]]:
    """(question text, specimens) for the report of `case`; empty before the first build."""
    state = session.get(CaseBundleState, case.id)
    summary: dict[str, Any] = (state.summary or {}) if state is not None else {}
    question = question_text(summary.get("question"))
    found = summary.get("specimens") or []
    if not found:
        return question, ()
    urls = _source_urls(session, case, public_fhir_base)
    specimens = []
    for item in found:
        accession = item.get("accession") or {}
        ident = (
            (str(accession.get("system", "")), str(accession["value"]))
            if accession.get("value")
            else None
        )
        specimens.append(
            ReportSpecimen(
                label=specimen_label(item), reference=urls.get(item["resource"]), identifier=ident
            )
        )
    return question, tuple(specimens)


__all__ = ["report_question_and_specimens"]
