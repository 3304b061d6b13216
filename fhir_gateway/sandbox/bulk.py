"""The sandbox EHR's Bulk Data `$export` (Bulk Data Access 3.0.0, STANDARDS BD-01..BD-08).

Asynchronous as real servers are: the kick-off snapshots what to export and answers 202 with a
status URL; the status URL answers 202 (`X-Progress`, `Retry-After`) until the job's run time
has passed, then 200 with the manifest; NDJSON files are generated from the snapshot as they are
downloaded; `DELETE` ends the job (later requests: 404). The routes live in `app.py`; this module
holds the jobs and their files and knows nothing of HTTP.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fhir_gateway.errors import GatewayError, InputError, NotFoundError, operation_outcome
from fhir_gateway.resources import Resource
from fhir_gateway.sandbox.repository import ResourceStore, now_instant

NDJSON = "application/fhir+ndjson"
NDJSON_FORMATS = frozenset({NDJSON, "application/ndjson", "ndjson"})
# Every other BD-02 parameter (_elements, _typeFilter, includeAssociatedData, organizeOutputBy,
# allowPartialManifests) is an error unless `Prefer: handling=lenient`; `patient` is supported
# in a POST kick-off's Parameters body (the only form it has, BD-01/BD-02).
SUPPORTED_PARAMS = frozenset({"_outputFormat", "_since", "_type"})
REFERENCE_FIELDS = ("subject", "patient", "beneficiary")


@dataclass
class ExportFile:
    type: str  # resource type, or "OperationOutcome" for the error file
    ids: list[tuple[str, str]] = field(default_factory=list)
    outcomes: list[Resource] = field(default_factory=list)  # the error file's lines

    @property
    def count(self) -> int:
        return len(self.ids) or len(self.outcomes)


@dataclass
class ExportJob:
    id: str
    client_id: str | None
    request: str
    transaction_time: str
    started: float
    run_s: float
    outputs: list[ExportFile]
    errors: list[ExportFile]
    status_polls: int = 0

    @property
    def total(self) -> int:
        return sum(f.count for f in self.outputs)


class ExportJobs:
    """All export jobs of one sandbox, and the counters the export faults use."""

    def __init__(self) -> None:
        self.jobs: dict[str, ExportJob] = {}
        self.lock = threading.Lock()
        self.kickoffs = 0
        self.status_polls = 0
        self.deleted: list[str] = []

    def next_kickoff(self) -> int:
        with self.lock:
            self.kickoffs += 1
            return self.kickoffs

    def next_status_poll(self) -> int:
        with self.lock:
            self.status_polls += 1
            return self.status_polls

    def get(self, job_id: str, client_id: str | None) -> ExportJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError("export job is unknown, expired or deleted")
        if client_id is not None and job.client_id not in (None, client_id):
            raise NotFoundError("export job is unknown, expired or deleted")
        return job

    def delete(self, job_id: str, client_id: str | None) -> None:
        self.get(job_id, client_id)
        with self.lock:
            self.jobs.pop(job_id, None)
            self.deleted.append(job_id)


@dataclass(frozen=True)
class ExportRequest:
    types: frozenset[str] | None
    since: datetime | None
    patients: frozenset[str] | None = None  # patient ids (the `patient` parameter)


def parameters_to_params(body: object) -> tuple[list[tuple[str, str]], set[str]]:
    """A POST kick-off's `Parameters` body -> (name, value) pairs, and the `patient` ids.

    Raises:
        InputError: not a Parameters resource, or a parameter without a usable value.
    """
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InputError("a POST $export needs a Parameters body")
    params: list[tuple[str, str]] = []
    patients: set[str] = set()
    for index, parameter in enumerate(body.get("parameter") or []):
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if name == "patient":
            ref = (parameter.get("valueReference") or {}).get("reference")
            if not isinstance(ref, str) or "Patient/" not in ref:
                raise InputError(f"Parameters.parameter[{index}] patient needs a Patient reference")
            patients.add(ref.rsplit("Patient/", 1)[1])
            continue
        value = next((v for k, v in parameter.items() if k.startswith("value")), None)
        if not isinstance(name, str) or not isinstance(value, str):
            raise InputError(f"Parameters.parameter[{index}] needs a name and a string value")
        params.append((name, value))
    return params, patients


def parse_export_params(
    params: list[tuple[str, str]], prefer: str, patients: set[str] | None = None
) -> ExportRequest:
    """BD-02 kick-off parameters (`patients`: the ids of a POST's `patient` parameters).

    Raises:
        InputError: an unsupported parameter (unless lenient), a bad `_since` or `_outputFormat`.
    """
    lenient = "handling=lenient" in prefer.replace(" ", "").lower()
    types: set[str] | None = None
    since: datetime | None = None
    for name, value in params:
        if name == "_outputFormat":
            if value not in NDJSON_FORMATS:
                raise InputError(f"_outputFormat {value!r} is not supported (use {NDJSON})")
        elif name == "_type":
            types = (types or set()) | {t.strip() for t in value.split(",") if t.strip()}
        elif name == "_since":
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise InputError(f"_since is not a FHIR instant: {value!r}") from exc
            since = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        elif name not in SUPPORTED_PARAMS and not lenient:
            raise InputError(f"$export parameter {name!r} is not supported")
    return ExportRequest(
        frozenset(types) if types is not None else None,
        since,
        frozenset(patients) if patients else None,
    )


def start_export(
    store: ResourceStore,
    jobs: ExportJobs,
    request: ExportRequest,
    *,
    group_id: str | None,
    client_id: str | None,
    request_url: str,
    permits: Callable[[str], bool],
    run_s: float,
    file_lines: int,
    error_types: tuple[str, ...] = (),
) -> ExportJob:
    """Snapshot what the export will contain (Patient- or Group-level) and register the job.

    Resources of types the token does not permit, and of `error_types` (a fault), are left out
    and reported in the error file, one OperationOutcome each (BD-05: partial success).
    """
    transaction_time = now_instant()
    patients = _group_patients(store, group_id) if group_id is not None else None
    by_type: dict[str, list[tuple[str, str]]] = {}
    outcomes: list[Resource] = []
    withheld: dict[str, int] = {}
    for resource in store.all():
        rtype = resource["resourceType"]
        if request.types is not None and rtype not in request.types:
            continue
        patient = _patient_of(resource)
        if patient is None or (patients is not None and patient not in patients):
            continue
        if request.patients is not None and patient not in request.patients:
            continue
        if request.since is not None and _last_updated(resource) <= request.since:
            continue
        if rtype in error_types:
            issue = {
                "severity": "error",
                "code": "processing",
                "diagnostics": f"{rtype}/{resource['id']} could not be exported",
            }
            outcomes.append(operation_outcome(issue))
            continue
        if not permits(rtype):
            withheld[rtype] = withheld.get(rtype, 0) + 1
            continue
        by_type.setdefault(rtype, []).append((rtype, resource["id"]))
    for rtype, count in sorted(withheld.items()):
        issue = {
            "severity": "error",
            "code": "forbidden",
            "diagnostics": f"{count} {rtype} resources withheld: not permitted by the token",
        }
        outcomes.append(operation_outcome(issue))
    outputs = [
        ExportFile(rtype, ids[i : i + file_lines])
        for rtype in sorted(by_type)
        for ids in [by_type[rtype]]
        for i in range(0, len(ids), file_lines)
    ]
    errors = [ExportFile("OperationOutcome", outcomes=outcomes)] if outcomes else []
    job = ExportJob(
        id=secrets.token_hex(12),
        client_id=client_id,
        request=request_url,
        transaction_time=transaction_time,
        started=time.monotonic(),
        run_s=run_s,
        outputs=outputs,
        errors=errors,
    )
    with jobs.lock:
        jobs.jobs[job.id] = job
    return job


def progress(job: ExportJob) -> float:
    """0..1: how far the (simulated) export has run."""
    if job.run_s <= 0:
        return 1.0
    return min(1.0, (time.monotonic() - job.started) / job.run_s)


def progress_text(job: ExportJob) -> str:
    """`X-Progress` (BD-04: under 100 characters)."""
    done = progress(job)
    return f"{int(done * 100)}% ({int(done * job.total)} of {job.total} resources)"


def manifest(job: ExportJob, base_url: str, requires_token: bool) -> Resource:
    """The BD-05 completion manifest; file URLs are absolute and under this server."""

    def entry(kind: str, index: int, f: ExportFile) -> Resource:
        url = f"{base_url}/$export-files/{job.id}/{kind}-{index}.ndjson"
        return {"type": f.type, "url": url, "count": f.count}

    return {
        "transactionTime": job.transaction_time,
        "request": job.request,
        "requiresAccessToken": requires_token,
        "output": [entry("output", i, f) for i, f in enumerate(job.outputs)],
        "deleted": [],
        "error": [entry("error", i, f) for i, f in enumerate(job.errors)],
    }


def export_file(job: ExportJob, name: str) -> ExportFile:
    """The file a manifest URL names (`output-3.ndjson`, `error-0.ndjson`).

    Raises:
        NotFoundError: no such file in this job.
    """
    kind, _, rest = name.partition("-")
    index = rest.removesuffix(".ndjson")
    files = {"output": job.outputs, "error": job.errors}.get(kind)
    if files is None or not index.isdigit() or int(index) >= len(files):
        raise NotFoundError(f"export file {name!r} is unknown")
    return files[int(index)]


def iter_ndjson(store: ResourceStore, f: ExportFile, batch: int = 200) -> Iterator[bytes]:
    """The file's lines, generated in batches from the snapshot (a resource deleted since the
    kick-off is skipped)."""
    if f.outcomes:
        yield b"".join(json.dumps(o).encode() + b"\n" for o in f.outcomes)
        return
    for start in range(0, len(f.ids), batch):
        lines = []
        for rtype, rid in f.ids[start : start + batch]:
            try:
                resource = store.get(rtype, rid)
            except GatewayError:
                continue
            lines.append(json.dumps(resource, separators=(",", ":")).encode() + b"\n")
        yield b"".join(lines)


def _group_patients(store: ResourceStore, group_id: str) -> set[str]:
    group = store.get("Group", group_id)
    members = set()
    for member in group.get("member") or []:
        ref = ((member or {}).get("entity") or {}).get("reference") or ""
        if isinstance(ref, str) and "Patient/" in ref:
            members.add(ref.rsplit("Patient/", 1)[1])
    return members


def _patient_of(resource: Resource) -> str | None:
    """The patient whose compartment holds `resource` (by subject/patient), or None."""
    if resource.get("resourceType") == "Patient":
        return str(resource.get("id"))
    for name in REFERENCE_FIELDS:
        value = resource.get(name)
        ref = value.get("reference") if isinstance(value, dict) else None
        if isinstance(ref, str) and "Patient/" in ref:
            return ref.rsplit("Patient/", 1)[1]
    return None


def _last_updated(resource: Resource) -> datetime:
    text = str((resource.get("meta") or {}).get("lastUpdated") or "1970-01-01T00:00:00Z")
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
