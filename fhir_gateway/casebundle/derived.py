"""What the case page and GET /cases/{id}/timeline show of the whole case, derived once from the
normalised bundle and stored beside it (`CaseView`), so a read is one small row, not ~10,000.

`derive()` (pure) makes, from the bundle's resources in bundle order: the timeline events
(`timeline.timeline`), the reference range of each tumour-marker result (for the chart), the
documents (attachment metadata; an inline PDF is named by its bundle position, its bytes stay in
the bundle row) and the imaging studies; `glance()` makes the cases list's line from the bundle
summary (completeness counts, what is missing, the question). `normalise._write` stores them in
the same transaction as the bundle rows and state, keyed by the bundle's ETag. `load()` serves
the view only when its ETag and `VERSION` match the stored bundle's; otherwise (a case
normalised before migration 0017, or a derivation changed since) it derives it again from the
stored rows and stores that, so a reader never gets data of another build."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fhir_gateway.casebundle.consult import question_text
from fhir_gateway.casebundle.timeline import TIMELINE_TYPES, timeline
from fhir_gateway.resources import Resource
from fhir_gateway.store.models import CaseBundleState, CaseView, NormalisedResource, utcnow

log = structlog.get_logger(__name__)

VERSION = 1  # bump when derive() changes: stored views of an older version are derived again
DICOM_UID = "urn:dicom:uid"
PDF = "application/pdf"
MAX_INLINE_PDF = 5 * 1024 * 1024  # base64 characters of an inline attachment shown in place
PAGE_TYPES = TIMELINE_TYPES  # every type derive() reads (documents and studies are among them)


@dataclass(frozen=True)
class Derived:
    """The derived data of one build: the timeline as compact JSON text (served as it is) and
    the rest of what the page shows."""

    etag: str
    timeline_json: str
    page: dict[str, Any]

    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = json.loads(self.timeline_json)
        return events


def _range(resource: Resource) -> list[float | None] | None:
    """[low, high] of the first reference range with a numeric bound."""
    for rng in resource.get("referenceRange") or []:
        if not isinstance(rng, dict):
            continue
        low = (rng.get("low") or {}).get("value")
        high = (rng.get("high") or {}).get("value")
        if isinstance(low, int | float) or isinstance(high, int | float):
            return [
                float(low) if isinstance(low, int | float) else None,
                float(high) if isinstance(high, int | float) else None,
            ]
    return None


def _type_text(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    return concept.get("text") or next(
        (c.get("display") for c in concept.get("coding") or [] if isinstance(c, dict)), None
    )


def _documents(position: int, r: Resource) -> list[dict[str, Any]]:
    """A DocumentReference's attachments as the page lists them; an inline PDF small enough to
    show is marked `inline` with the resource's bundle position (its data is not copied)."""
    out = []
    for n, content in enumerate(r.get("content") or []):
        att = (content.get("attachment") if isinstance(content, dict) else None) or {}
        ctype = str(att.get("contentType") or "").split(";")[0].strip().lower()
        url = att.get("url")
        src = url if isinstance(url, str) and url.startswith(("http://", "https://", "/")) else None
        data = att.get("data")
        inline = (
            src is None and ctype == PDF and isinstance(data, str) and len(data) <= MAX_INLINE_PDF
        )
        out.append(
            {
                "id": r["id"],
                "n": n,
                "position": position,
                "title": att.get("title") or _type_text(r.get("type")) or "Document",
                "date": str(r.get("date") or att.get("creation") or "")[:10],
                "contentType": ctype or "unknown",
                "url": src,
                "inline": inline,
            }
        )
    return out


def _study(r: Resource) -> dict[str, Any]:
    uid = next(
        (
            str(i["value"]).removeprefix("urn:oid:")
            for i in r.get("identifier") or []
            if isinstance(i, dict) and i.get("system") == DICOM_UID and i.get("value")
        ),
        None,
    )
    modalities = sorted(
        {str(m.get("code")) for m in r.get("modality") or [] if m.get("code")}
        | {
            str((s.get("modality") or {}).get("code"))
            for s in r.get("series") or []
            if (s.get("modality") or {}).get("code")
        }
    )
    return {
        "id": r["id"],
        "uid": uid,
        "started": str(r.get("started") or "")[:10],
        "description": r.get("description") or "Imaging study",
        "modalities": ", ".join(modalities),
        "series": r.get("numberOfSeries"),
        "instances": r.get("numberOfInstances"),
    }


def derive(
    resources: Iterable[tuple[int, Resource]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(timeline events, page data) of a bundle's resources given as (bundle position, resource)
    in bundle order. Page data: `count` (of events), `ranges` (tumour-marker resource ->
    [low, high]), `documents`, `studies`."""
    kept: list[Resource] = []
    documents: list[dict[str, Any]] = []
    studies: list[dict[str, Any]] = []
    for position, r in resources:
        rtype = r.get("resourceType")
        if rtype not in TIMELINE_TYPES:
            continue
        kept.append(r)
        if rtype == "DocumentReference":
            documents += _documents(position, r)
        elif rtype == "ImagingStudy":
            studies.append(_study(r))
    by_ref = {f"{r['resourceType']}/{r['id']}": r for r in kept}
    events = timeline(kept)
    ranges = {}
    for ev in events:
        if ev["kind"] == "tumour-marker":
            found = _range(by_ref[ev["resource"]])
            if found is not None:
                ranges[ev["resource"]] = found
    page = {"count": len(events), "ranges": ranges, "documents": documents, "studies": studies}
    return events, page


def glance(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The case at a glance for the cases list, from the bundle's summary: how many of the
    needs are present, which are missing, the question as one line."""
    checklist = (summary or {}).get("checklist") or []
    return {
        "present": sum(1 for c in checklist if c.get("present")),
        "needs": len(checklist),
        "missing": [c.get("label") or c.get("key") for c in checklist if not c.get("present")],
        "question": question_text((summary or {}).get("question")),
    }


def glances(session: Session, case_ids: list[str]) -> dict[str, dict[str, Any]]:
    """`glance` of each built case of `case_ids` (the caller has checked they are visible): the
    stored views' when of the stored build, else from the bundle summary (not stored: a list
    read does not derive whole views). Two queries however many cases."""
    if not case_ids:
        return {}
    out: dict[str, dict[str, Any]] = {}
    stale: list[str] = []
    for case_id, etag, view_etag, version, stored in session.execute(
        select(
            CaseBundleState.case_id,
            CaseBundleState.etag,
            CaseView.etag,
            CaseView.version,
            CaseView.glance,
        )
        .outerjoin(CaseView, CaseView.case_id == CaseBundleState.case_id)
        .where(CaseBundleState.case_id.in_(case_ids))
    ):
        if view_etag == etag and version == VERSION and stored is not None:
            out[case_id] = stored
        else:
            stale.append(case_id)
    if stale:
        for case_id, summary in session.execute(
            select(CaseBundleState.case_id, CaseBundleState.summary).where(
                CaseBundleState.case_id.in_(stale)
            )
        ):
            out[case_id] = glance(summary)
    return out


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps_list(values: list[Any]) -> str:
    """= `dumps(values)`, made one item at a time: `json.dumps` holds every piece of the text
    as a str of its own until it joins them (~4x the text for a big case's timeline)."""
    return "[" + ",".join(map(_ENCODER.encode, values)) + "]"


def row(
    case_id: str, etag: str, summary: dict[str, Any], resources: Iterable[tuple[int, Resource]]
) -> CaseView:
    """The `CaseView` row of a build (normalise writes it with the bundle)."""
    events, page = derive(resources)
    return CaseView(
        case_id=case_id,
        etag=etag,
        version=VERSION,
        timeline=dumps_list(events),
        page=page,
        glance=glance(summary),
        built_at=utcnow(),
    )


def load(session: Session, state: CaseBundleState) -> Derived:
    """The derived data of the stored bundle `state` (the caller has checked access and audits
    the read). Derived again from the stored rows, and stored, when the stored view is missing,
    of another build (ETag) or of an older `VERSION`."""
    found = session.get(CaseView, state.case_id)
    if found is not None and found.etag == state.etag and found.version == VERSION:
        return Derived(found.etag, found.timeline, found.page)
    rows = session.execute(
        select(NormalisedResource.position, NormalisedResource.body)
        .where(
            NormalisedResource.case_id == state.case_id,
            NormalisedResource.resource_type.in_(sorted(PAGE_TYPES)),
        )
        .order_by(NormalisedResource.position)
    ).all()
    fresh = row(state.case_id, state.etag, state.summary, ((p, json.loads(b)) for p, b in rows))
    log.info(
        "case_view.derived_on_read",
        case_id=state.case_id,
        reason="missing" if found is None else "stale",
        rows=len(rows),
    )
    _store(session, found, fresh)
    return Derived(fresh.etag, fresh.timeline, fresh.page)


def _store(session: Session, found: CaseView | None, fresh: CaseView) -> None:
    """Store a view derived on read. Two readers may derive the same view at once: the second
    insert fails on the primary key and is dropped (the first stored the same content); a view
    this reader replaces is rewritten in place."""
    if found is not None:
        found.etag, found.version = fresh.etag, fresh.version
        found.timeline, found.page, found.glance = fresh.timeline, fresh.page, fresh.glance
        found.built_at = fresh.built_at
        session.flush()
        return
    try:
        with session.begin_nested():
            session.add(fresh)
    except IntegrityError:
        log.info("case_view.derived_concurrently", case_id=fresh.case_id)


def inline_pdfs(
    session: Session, case_id: str, documents: list[dict[str, Any]]
) -> dict[tuple[int, int], str]:
    """The base64 data of each inline PDF of `documents` by (bundle position, content index):
    the few DocumentReference rows read by primary key."""
    wanted = sorted({d["position"] for d in documents if d.get("inline")})
    if not wanted:
        return {}
    out: dict[tuple[int, int], str] = {}
    for position, body in session.execute(
        select(NormalisedResource.position, NormalisedResource.body).where(
            NormalisedResource.case_id == case_id, NormalisedResource.position.in_(wanted)
        )
    ):
        for n, content in enumerate(json.loads(body).get("content") or []):
            att = (content.get("attachment") if isinstance(content, dict) else None) or {}
            if isinstance(att.get("data"), str):
                out[(position, n)] = att["data"]
    return out


__all__ = ["VERSION", "Derived", "derive", "glance", "glances", "inline_pdfs", "load", "row"]
