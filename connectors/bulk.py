"""FHIR Bulk Data `$export` client (Bulk Data Access 2.0/3.0.0; STANDARDS BD-01..BD-08).

Kick-off (`Patient/$export` or `Group/[id]/$export`, `_type`, `_since`, `Prefer: respond-async`)
-> poll the status URL (honouring `Retry-After`, reporting `X-Progress`) -> stream each NDJSON
file to disk -> read the error files as OperationOutcomes -> `DELETE` the status URL.

Resumable: `ExportState` (status URL, manifest, files done) is handed to the caller's `save`
after every step; running again with the saved state neither kicks off again nor downloads a
finished file again. Retries and error translation live in `_http`; the session and the token
provider are injected, as for `FhirEhrClient`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin

import requests
import structlog

from connectors._http import FHIR_JSON, Http, error_from_response, origin, parse_retry_after
from connectors.fhir_client import TokenProvider
from fhir_gateway.errors import (
    UpstreamError,
    UpstreamNotFoundError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)
from fhir_gateway.resources import Resource

log = structlog.get_logger(__name__)

NDJSON = "application/fhir+ndjson"
# Status-poll answers that mean "not now" rather than "failed" (BD-04, RS-40).
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_ERROR_OUTCOMES = 10_000  # OperationOutcomes kept in memory from the error files

FileKind = Literal["output", "error", "deleted"]


@dataclass
class DoneFile:
    """One manifest file, downloaded completely to `path`."""

    url: str
    kind: FileKind
    type: str
    path: str
    count: int  # non-blank NDJSON lines
    size: int
    sha256: str


@dataclass
class ExportState:
    """Where an export is: save it (`to_json`) after each step, pass it back to resume."""

    status_url: str | None = None
    manifest: Resource | None = None
    done: dict[str, DoneFile] = field(default_factory=dict)  # by file URL
    deleted: bool = False  # the status URL was DELETEd (the export is finished)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ExportState:
        return cls(
            status_url=doc.get("status_url"),
            manifest=doc.get("manifest"),
            done={url: DoneFile(**f) for url, f in (doc.get("done") or {}).items()},
            deleted=bool(doc.get("deleted")),
        )

    def reset(self) -> None:
        self.status_url, self.manifest, self.done, self.deleted = None, None, {}, False


@dataclass(frozen=True)
class ExportProgress:
    """One status poll: HTTP status, the server's `X-Progress` text, the wait before the next."""

    polls: int
    status: int
    progress: str | None
    wait_s: float


@dataclass(frozen=True)
class ExportResult:
    transaction_time: str  # the next incremental export's `_since` (BD-05)
    requires_access_token: bool
    files: list[DoneFile]  # output files
    error_files: list[DoneFile]
    deleted_files: list[DoneFile]
    errors: list[Resource]  # OperationOutcomes read from the error files
    errors_truncated: bool  # more than MAX_ERROR_OUTCOMES were reported

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            out[f.type] = out.get(f.type, 0) + f.count
        return out


def _no_save(state: ExportState) -> None:
    return None


class BulkExportClient:
    """Bulk Data `$export` against one FHIR server; `export()` runs or resumes a whole export."""

    def __init__(
        self,
        http: Http,
        base_url: str,
        *,
        tokens: TokenProvider | None = None,
        poll_min_s: float = 1.0,
        poll_max_s: float = 120.0,
        max_wait_s: float = 6 * 3600.0,
        max_status_errors: int = 5,
    ) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._auth = tokens.auth() if tokens else None
        self._poll_min_s, self._poll_max_s = poll_min_s, poll_max_s
        self._max_wait_s = max_wait_s
        self._max_status_errors = max_status_errors

    # -- the whole export ---------------------------------------------------------------

    def export(
        self,
        dest_dir: Path,
        *,
        group_id: str | None = None,
        types: Sequence[str] = (),
        since: str | None = None,
        patients: Sequence[str] = (),
        state: ExportState | None = None,
        save: Callable[[ExportState], None] = _no_save,
        on_progress: Callable[[ExportProgress], None] | None = None,
        on_file: Callable[[DoneFile], None] | None = None,
    ) -> ExportResult:
        """Kick off (unless `state` has a status URL), wait, download what is not done, DELETE.

        Raises:
            UpstreamUnavailableError: the server stayed unavailable, or the export did not
                finish within `max_wait_s` (state kept: call again to resume).
            UpstreamRejectedError: kick-off refused, or the export failed on the server (the
                state is reset, so the next call kicks off a new export).
            UpstreamNotFoundError: the export expired or was deleted remotely (state reset).
        """
        state = state if state is not None else ExportState()
        dest_dir.mkdir(parents=True, exist_ok=True)
        for stale in dest_dir.glob(".part-*"):
            stale.unlink(missing_ok=True)  # a download cut short by a crash
        try:
            if state.status_url is None:
                state.status_url = self.kick_off(
                    group_id=group_id, types=types, since=since, patients=patients
                )
                save(state)
            if state.manifest is None:
                state.manifest = self.poll(state.status_url, on_progress=on_progress)
                save(state)
            for kind, index, item in _manifest_files(state.manifest):
                if item["url"] in state.done:
                    continue
                done = self.download(item, kind, index, dest_dir, state.manifest)
                state.done[done.url] = done
                save(state)
                if on_file is not None:
                    on_file(done)
        except (UpstreamNotFoundError, ExportFailedError):
            state.reset()
            save(state)
            raise
        if not state.deleted:
            self.delete(state.status_url)
            state.deleted = True
            save(state)
        return self._result(state)

    # -- steps --------------------------------------------------------------------------

    def kick_off(
        self,
        *,
        group_id: str | None = None,
        types: Sequence[str] = (),
        since: str | None = None,
        patients: Sequence[str] = (),
    ) -> str:
        """BD-01..BD-03: the kick-off request; returns the absolute status URL.

        With `patients` (references such as `Patient/123`) the kick-off is a `POST` with a
        `Parameters` body, the only form the `patient` parameter has (BD-01/BD-02); otherwise a
        `GET` with query parameters. A 429 at kick-off (another export running) is retried by
        `_http` after `Retry-After`.
        """
        path = f"Group/{group_id}/$export" if group_id is not None else "Patient/$export"
        params: list[tuple[str, str]] = [("_outputFormat", NDJSON)]
        if types:
            params.append(("_type", ",".join(types)))
        if since:
            params.append(("_since", since))
        headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
        if patients:
            body = {
                "resourceType": "Parameters",
                "parameter": [{"name": n, "valueString": v} for n, v in params]
                + [{"name": "patient", "valueReference": {"reference": p}} for p in patients],
            }
            response = self._send(
                "POST",
                f"{self.base_url}/{path}",
                json=body,
                headers={**headers, "Content-Type": FHIR_JSON},
                idempotent=True,  # a kick-off refused or lost is safe to send again
            )
        else:
            response = self._send("GET", f"{self.base_url}/{path}", params=params, headers=headers)
        location = response.headers.get("Content-Location")
        response.close()
        if response.status_code != 202 or not location:
            raise UpstreamRejectedError(
                f"{self._http.system}: $export kick-off answered {response.status_code} without "
                "a Content-Location (expected 202)",
                system=self._http.system,
                url=response.url,
                status=response.status_code,
            )
        log.info("bulk.export.kicked_off", system=self._http.system, level=path.split("/")[0])
        return urljoin(self.base_url + "/", location)

    def poll(
        self, status_url: str, *, on_progress: Callable[[ExportProgress], None] | None = None
    ) -> Resource:
        """BD-04/BD-05: poll until the manifest is ready; returns it.

        202 -> wait `Retry-After` (else exponential backoff), clamped to [poll_min, poll_max].
        429 and 5xx with a transient (or no) OperationOutcome -> wait and retry, up to
        `max_status_errors` in a row. A 4xx/5xx with another OperationOutcome: the export failed.
        """
        polls = errors = 0
        waited = 0.0
        while True:
            polls += 1
            response = self._send(
                "GET",
                status_url,
                headers={"Accept": "application/json"},
                accept_status=TRANSIENT_STATUSES,
            )
            if response.status_code == 200:
                return self._manifest(response)
            if response.status_code == 202:
                errors = 0
                progress = response.headers.get("X-Progress")
                retry_after = _retry_after(self._http, response)
                wait = retry_after if retry_after is not None else self._backoff(polls)
                response.close()
            elif response.status_code in TRANSIENT_STATUSES:
                error = error_from_response(response, self._http.system, self._http.wall_clock())
                response.close()
                if error.outcome is not None and not _transient(error.outcome):
                    raise ExportFailedError(
                        f"{self._http.system}: $export failed on the server: {error.message}",
                        system=self._http.system,
                        url=status_url,
                        status=error.status,
                        outcome=error.outcome,
                    )
                errors += 1
                if errors > self._max_status_errors:
                    raise error
                progress = None
                wait = error.retry_after if error.retry_after is not None else self._backoff(errors)
            else:
                status = response.status_code
                response.close()
                raise UpstreamRejectedError(
                    f"{self._http.system}: $export status answered {status}",
                    system=self._http.system,
                    url=status_url,
                    status=status,
                )
            wait = min(max(wait, self._poll_min_s), self._poll_max_s)
            if waited + wait > self._max_wait_s:
                raise UpstreamUnavailableError(
                    f"{self._http.system}: $export not complete after {waited:.0f}s",
                    system=self._http.system,
                    url=status_url,
                    retry_after=wait,
                )
            log.info(
                "bulk.export.poll",
                system=self._http.system,
                status=response.status_code,
                polls=polls,
                wait_s=round(wait, 3),
            )
            if on_progress is not None:
                on_progress(ExportProgress(polls, response.status_code, progress, wait))
            self._http.sleep(wait)
            waited += wait

    def download(
        self, item: Resource, kind: FileKind, index: int, dest_dir: Path, manifest: Resource
    ) -> DoneFile:
        """BD-06: stream one file to `dest_dir` (never whole in memory), counting its lines.

        The bearer token is sent iff the manifest says `requiresAccessToken`, and then only to
        the FHIR server's own origin (SM-12).
        """
        url = urljoin(self.base_url + "/", str(item["url"]))
        rtype = str(item.get("type") or "")
        auth = None
        if manifest.get("requiresAccessToken"):
            if origin(url) != origin(self.base_url):
                raise UpstreamRejectedError(
                    "export file needing our token is on another server; not fetched",
                    system=self._http.system,
                    url=url,
                )
            auth = self._auth
        safe_type = "".join(ch for ch in rtype if ch.isalnum()) or "file"
        final = dest_dir / f"{kind}-{index:04d}-{safe_type}.ndjson"
        response = self._send("GET", url, headers={"Accept": NDJSON}, stream=True, auth=auth)
        digest = hashlib.sha256()
        counter = _LineCounter()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    counter.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, final)
            lines = counter.finish()
        except requests.RequestException as exc:
            Path(tmp_name).unlink(missing_ok=True)
            raise UpstreamUnavailableError(
                f"{self._http.system}: export file download broke off ({type(exc).__name__})",
                system=self._http.system,
                url=url,
            ) from exc
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        finally:
            response.close()
        expected = item.get("count")
        if isinstance(expected, int) and expected != lines:
            log.warning("bulk.export.count_mismatch", kind=kind, expected=expected, got=lines)
        log.info("bulk.export.file", kind=kind, type=rtype, lines=lines, bytes=size)
        return DoneFile(str(item["url"]), kind, rtype, str(final), lines, size, digest.hexdigest())

    def delete(self, status_url: str) -> None:
        """BD-07: DELETE the status URL once everything is downloaded (404: already gone)."""
        with contextlib.suppress(UpstreamNotFoundError):
            self._send("DELETE", status_url, headers={"Accept": FHIR_JSON}).close()
        log.info("bulk.export.deleted", system=self._http.system)

    # -- plumbing ----------------------------------------------------------------------

    def _result(self, state: ExportState) -> ExportResult:
        assert state.manifest is not None
        files = [f for f in state.done.values() if f.kind == "output"]
        error_files = [f for f in state.done.values() if f.kind == "error"]
        errors: list[Resource] = []
        truncated = False
        for f in error_files:
            for outcome in read_outcomes(Path(f.path)):
                if len(errors) >= MAX_ERROR_OUTCOMES:
                    truncated = True
                    break
                errors.append(outcome)
        return ExportResult(
            transaction_time=str(state.manifest.get("transactionTime") or ""),
            requires_access_token=bool(state.manifest.get("requiresAccessToken")),
            files=files,
            error_files=error_files,
            deleted_files=[f for f in state.done.values() if f.kind == "deleted"],
            errors=errors,
            errors_truncated=truncated,
        )

    def _manifest(self, response: requests.Response) -> Resource:
        try:
            body = response.json()
        except ValueError as exc:
            raise UpstreamRejectedError(
                f"{self._http.system}: $export manifest is not JSON",
                system=self._http.system,
                url=response.url,
            ) from exc
        if not isinstance(body, dict) or not isinstance(body.get("output"), list):
            raise UpstreamRejectedError(
                f"{self._http.system}: $export manifest has no output array",
                system=self._http.system,
                url=response.url,
            )
        for kind, _, item in _manifest_files(body):
            if not isinstance(item.get("url"), str):
                raise UpstreamRejectedError(
                    f"{self._http.system}: $export manifest {kind} entry has no url",
                    system=self._http.system,
                    url=response.url,
                )
        return body

    def _backoff(self, attempt: int) -> float:
        cap = min(self._poll_max_s, self._poll_min_s * 2.0 ** (attempt - 1))
        return cap / 2 + self._http.rand() * cap / 2

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request; on a 401, renew the token once and retry (SM-10), as FhirEhrClient."""
        kwargs.setdefault("auth", self._auth)
        try:
            return self._http.request(method, url, **kwargs)
        except UpstreamRejectedError as exc:
            if exc.status != 401 or self._tokens is None:
                raise
            log.info("bulk.request.unauthorized", action="renew_token")
            self._tokens.invalidate()
            return self._http.request(method, url, **kwargs)


class ExportFailedError(UpstreamRejectedError):
    """The server reports the export job itself failed (a non-transient OperationOutcome)."""


def read_outcomes(path: Path) -> Iterator[Resource]:
    """The OperationOutcomes of an error file, line by line; a line that is not one becomes an
    OperationOutcome saying so (nothing reported by the server is silently dropped)."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
                yield doc
            else:
                yield {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {
                            "severity": "error",
                            "code": "structure",
                            "diagnostics": f"error file line {number} is not an OperationOutcome",
                        }
                    ],
                }


def iter_resources(path: Path) -> Iterator[Resource]:
    """The resources of a downloaded NDJSON file, one line at a time (blank lines, CRLF ok)."""
    with path.open("rb") as lines:
        for line in lines:
            line = line.strip()
            if line:
                doc = json.loads(line)
                if isinstance(doc, dict):
                    yield doc


# -- helpers -------------------------------------------------------------------------------


class _LineCounter:
    """Counts non-blank lines fed chunk by chunk (a line may span chunks; CRLF is fine)."""

    def __init__(self) -> None:
        self.lines = 0
        self._open = False  # the current line has non-blank content

    def update(self, chunk: bytes) -> None:
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            if part.strip():
                self._open = True
            if i < len(parts) - 1:  # a newline ends this part
                self.lines += self._open
                self._open = False

    def finish(self) -> int:
        return self.lines + self._open


def _manifest_files(manifest: Resource) -> Iterator[tuple[FileKind, int, Resource]]:
    kinds: tuple[FileKind, ...] = ("output", "deleted", "error")
    for kind in kinds:
        for index, item in enumerate(manifest.get(kind) or []):
            if isinstance(item, dict):
                yield kind, index, item


def _transient(outcome: Resource) -> bool:
    """An OperationOutcome whose issues say "try later" (BD-04: transient issue codes)."""
    codes = {i.get("code") for i in outcome.get("issue") or [] if isinstance(i, dict)}
    return bool(codes) and codes <= {"transient", "throttled", "timeout", "lock-error"}


def _retry_after(http: Http, response: requests.Response) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"), http.wall_clock())


__all__ = [
    "BulkExportClient",
    "DoneFile",
    "ExportFailedError",
    "ExportProgress",
    "ExportResult",
    "ExportState",
    "UpstreamError",
    "iter_resources",
    "read_outcomes",
]
