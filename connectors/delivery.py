"""Deliver the second-opinion DiagnosticReport to the treating EHR over FHIR R4 REST (R5 role).

STANDARDS.md RF-20..RF-24, RS-01..RS-09, RS-40/41, UC-50..55. Exactly once comes from the
conditional create (`If-None-Exist: identifier=<system>|<value>`, RS-05): a retry after a lost
response or a crash finds the report the EHR already holds (200) instead of making a second one.
Amendments and retractions are version-aware updates of the same resource (`If-Match`, RS-03).

The `requests.Session` is injected (auth adapters, pooling, TLS: the caller's job); a
`TokenProvider` supplies bearer tokens and is asked to renew once on a 401. One attempt per call:
retry scheduling (backoff, Retry-After, the delivery window) belongs to the job queue, which sees
`UpstreamUnavailableError.retry_after`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import requests
import structlog

from connectors import _http
from fhir_gateway.errors import (
    ConflictError,
    UpstreamNotFoundError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)
from fhir_gateway.resources import TASK_STATUS, Resource

log = structlog.get_logger(__name__)

FHIR_JSON = "application/fhir+json"
# RF-21: our Task.output type for the delivered report.
REPORT_OUTPUT_SYSTEM = "urn:fhir-gateway:task-output"
REPORT_OUTPUT_CODE = "second-opinion-report"
# RF-21: CDex partners get HRex's output type instead.
CDEX_OUTPUT_SYSTEM = "http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp"
CDEX_OUTPUT_CODE = "data-value"
_REFUSED_TYPE = (403, 405)  # RF-23: EHR refuses DiagnosticReport writes


class TokenProvider(Protocol):
    """Bearer tokens for one remote system (SMART backend services, static, ...)."""

    def token(self) -> str | None: ...

    def invalidate(self) -> None: ...


class NoToken:
    """No Authorization header (loopback sandboxes, mutual-TLS set up on the session)."""

    def token(self) -> str | None:
        return None

    def invalidate(self) -> None:
        return None


@dataclass(frozen=True)
class DeliveryReceipt:
    """What the destination said about one write."""

    resource_type: str  # DiagnosticReport, or DocumentReference when the fallback was used
    server_id: str
    version: str | None
    location: str | None
    status_code: int
    fallback_used: bool = False
    created: bool = True  # False: the conditional create matched an existing report (200)

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.server_id}"


class FhirReportSink:
    """ReportSink over FHIR R4 REST: conditional create, version-aware update, Task completion."""

    def __init__(
        self,
        session: requests.Session,
        base_url: str,
        *,
        tokens: TokenProvider | None = None,
        timeout_s: float = 30.0,
        system: str = "destination",
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._tokens = tokens or NoToken()
        self._timeout = timeout_s
        self._system = system

    # ------------------------------------------------------------------ create

    def deliver(
        self,
        report: Resource,
        *,
        document_reference: Resource | None = None,
        transaction: Resource | None = None,
        provenance: Resource | None = None,
    ) -> DeliveryReceipt:
        """Create the report once (RF-24): POST with If-None-Exist and return=representation.

        With `transaction` (a Bundle from `mappers.report.report_transaction`), POST that to the
        base instead. With `provenance`, also create it (once, `If-None-Exist: target=...`)
        pointing at the delivered resource. With `document_reference`, fall back to it when
        the EHR answers 403/405 to the DiagnosticReport write (RF-23).

        Raises:
            UpstreamUnavailableError: 429, 5xx, timeout or connection failure (retry later).
            UpstreamRejectedError: any other 4xx (incl. 412: several reports match), with the
                EHR's OperationOutcome message.
        """
        if transaction is not None:
            return self._post_transaction(transaction)
        try:
            receipt = self._create(report)
        except UpstreamRejectedError as exc:
            if exc.status not in _REFUSED_TYPE or document_reference is None:
                raise
            log.info(
                "delivery.create.fallback",
                system=self._system,
                status=exc.status,
                resource_type="DocumentReference",
            )
            receipt = _replace(self._create(document_reference), fallback_used=True)
        if provenance is not None:
            self._post_provenance(provenance, receipt)
        return receipt

    def create(self, resource: Resource) -> DeliveryReceipt:
        """Create any resource once: POST with `If-None-Exist: identifier=...` (its first
        identifier), so a retry after a lost answer finds the first write (RS-05).

        Raises:
            UpstreamUnavailableError / UpstreamRejectedError: as for `deliver`.
        """
        return self._create(resource)

    def set_task_status(self, task_token: str, status: str, reason: str | None) -> DeliveryReceipt:
        """Write a referral Task status change onto the destination's copy of the Task (found by
        `identifier=system|value`); nothing is written when it already has that status.

        Raises:
            UpstreamRejectedError: no Task, or several, carry that identifier; or a 4xx.
        """
        task = self.find_one("Task", task_token)

        def apply(_ours: Resource, current: Resource) -> Resource:
            out = {**current, "status": status}
            if reason:
                out["statusReason"] = {"text": reason}
            else:
                out.pop("statusReason", None)
            return out

        if task.get("status") == status:
            return _receipt("Task", None, task, None, status_code=200)
        return self.update(
            apply(task, task),
            server_id=str(task["id"]),
            version=_version_of(task, None),
            reapply=apply,
        )

    def _post_provenance(self, provenance: Resource, receipt: DeliveryReceipt) -> None:
        """RF-24: a Provenance for the write, once: conditional create on its target.

        The report is delivered by then, so a refusal (4xx) is logged, not fatal; 429/5xx
        still raise so the job runs again (the report then matches, the Provenance is retried).
        """
        target = receipt.reference
        body = {**provenance, "target": [{"reference": target}]}
        body.pop("id", None)
        resp = self._request(
            "POST",
            f"{self._base}/Provenance",
            json_body=body,
            headers={"If-None-Exist": f"target={target}", "Prefer": "return=minimal"},
        )
        if resp.status_code not in (200, 201):
            log.warning(
                "delivery.provenance.rejected", system=self._system, status=resp.status_code
            )
            return
        log.info("delivery.provenance.done", system=self._system, status=resp.status_code)

    def _create(self, resource: Resource) -> DeliveryReceipt:
        rtype = resource["resourceType"]
        ident = _first_identifier(resource)
        headers = {"Prefer": "return=representation"}
        if ident:
            headers["If-None-Exist"] = f"identifier={ident}"  # RS-05 / UC-51
        resp = self._request("POST", f"{self._base}/{rtype}", json_body=resource, headers=headers)
        if resp.status_code == 412:
            raise UpstreamRejectedError(
                f"{rtype} identifier {ident} matches several resources on the destination",
                system=self._system,
                url=resp.url,
                status=412,
                outcome=_outcome(resp),
            )
        if resp.status_code not in (200, 201):
            raise self._rejected(resp, f"{rtype} create")
        body = _json(resp)
        location = resp.headers.get("Location") or resp.headers.get("Content-Location")
        if resp.status_code == 200 and not _is_resource(body, rtype):
            body = self._find_by_identifier(rtype, ident)
        elif resp.status_code == 201 and not _is_resource(body, rtype) and location:
            # RS-08: an empty 201 (return=minimal servers): read what Location names.
            body = self._read_url(self._absolute(location))
        receipt = _receipt(rtype, resp, body, location)
        self._log_written("delivery.create.done", receipt)
        return _replace(receipt, created=resp.status_code == 201)

    def _post_transaction(self, bundle: Resource) -> DeliveryReceipt:
        # A transaction is not a conditional create as a whole (the Provenance has no
        # identifier): look for an earlier delivery first. One job delivers one report at a
        # time (dedup key), so this check-then-write does not race with ourselves.
        report = bundle["entry"][0]["resource"]
        ident = _first_identifier(report)
        if ident:
            found = self._search_identifier("DiagnosticReport", ident)
            if len(found) == 1:
                receipt = _receipt("DiagnosticReport", None, found[0], None, status_code=200)
                return _replace(receipt, created=False)
        resp = self._request(
            "POST", self._base, json_body=bundle, headers={"Prefer": "return=representation"}
        )
        if resp.status_code != 200:
            raise self._rejected(resp, "transaction")
        body = _json(resp) or {}
        entries = body.get("entry") or []
        if not entries:
            raise UpstreamRejectedError(
                "transaction-response without entries",
                system=self._system,
                url=resp.url,
                status=resp.status_code,
            )
        first = entries[0]  # RS-30: same order as the request; the report is entry 0
        response = first.get("response") or {}
        location = response.get("location")
        resource = first.get("resource")
        if not _is_resource(resource, "DiagnosticReport") and location:
            resource = self._read_url(self._absolute(location))
        status = int(str(response.get("status", "201")).split()[0])
        receipt = _receipt("DiagnosticReport", resp, resource, location, etag=response.get("etag"))
        return _replace(receipt, status_code=status, created=status == 201)

    def _search_identifier(self, rtype: str, ident: str) -> list[Resource]:
        resp = self._request("GET", f"{self._base}/{rtype}", params={"identifier": ident})
        if resp.status_code != 200:
            raise self._rejected(resp, f"{rtype} search")
        bundle = _json(resp) or {}
        return [
            e["resource"]
            for e in bundle.get("entry") or []
            if _is_resource(e.get("resource"), rtype)
            and (e.get("search") or {}).get("mode", "match") == "match"
        ]

    def find_one(self, rtype: str, token: str) -> Resource:
        """The one resource of `rtype` with identifier `system|value` on the destination.

        Raises:
            UpstreamNotFoundError: none. UpstreamRejectedError: several.
        """
        matches = self._search_identifier(rtype, token)
        if not matches:
            raise UpstreamNotFoundError(
                f"no {rtype} with identifier {token} on the destination", system=self._system
            )
        if len(matches) > 1:
            raise UpstreamRejectedError(
                f"{len(matches)} {rtype} resources with identifier {token} on the destination",
                system=self._system,
                status=412,
            )
        return matches[0]

    def _find_by_identifier(self, rtype: str, ident: str | None) -> Resource:
        """A 200 without a body on conditional create: search for the one match."""
        matches = self._search_identifier(rtype, ident or "")
        if len(matches) != 1:
            raise UpstreamRejectedError(
                f"{rtype} identifier {ident}: conditional create said 200 but "
                f"{len(matches)} resources match",
                system=self._system,
                url=f"{self._base}/{rtype}",
                status=200,
            )
        return matches[0]

    # ------------------------------------------------------------------ update

    def update(
        self,
        resource: Resource,
        *,
        server_id: str,
        version: str | None,
        reapply: Callable[[Resource, Resource], Resource] | None = None,
    ) -> DeliveryReceipt:
        """Version-aware update of a delivered resource (amend or retract; RS-03, UC-55).

        PUT with `If-Match: W/"<version>"`; on 409/412 re-read the current version, re-apply
        (`reapply(ours, current)`, default: ours replaces it) and retry once.

        Raises:
            ConflictError: the second attempt conflicted too.
            UpstreamNotFoundError: the resource is gone from the destination (404/410).
            UpstreamUnavailableError / UpstreamRejectedError: as for `deliver`.
        """
        rtype = resource["resourceType"]
        url = f"{self._base}/{rtype}/{server_id}"
        body = {**resource, "id": server_id}
        for attempt in (1, 2):
            headers = {"Prefer": "return=representation"}
            if version is not None:
                headers["If-Match"] = f'W/"{version}"'
            resp = self._request("PUT", url, json_body=body, headers=headers)
            if resp.status_code in (200, 201):
                resp_body = _json(resp)
                if not _is_resource(resp_body, rtype):
                    resp_body = self._read_url(url)
                receipt = _receipt(rtype, resp, resp_body, resp.headers.get("Location") or url)
                self._log_written("delivery.update.done", receipt, attempt=attempt)
                return receipt
            if resp.status_code in (409, 412):
                log.info(
                    "delivery.update.conflict",
                    system=self._system,
                    resource_type=rtype,
                    status=resp.status_code,
                    attempt=attempt,
                )
                if attempt == 2:
                    break
                current = self._read_url(url)
                version = _version_of(current, None)
                body = reapply(body, current) if reapply else body
                body = {**body, "id": server_id}
                continue
            raise self._rejected(resp, f"{rtype} update")  # 404/410: UpstreamNotFoundError
        raise ConflictError(
            f"{rtype}/{server_id} changed on the destination twice while we updated it"
        )

    def retract(
        self, resource: Resource, *, server_id: str, version: str | None
    ) -> DeliveryReceipt:
        """Mark the delivered report `entered-in-error` (UC-55) through the same update path."""
        rtype = resource["resourceType"]
        status = "entered-in-error"
        ours = {**resource, "status": status}
        if rtype == "DocumentReference":
            ours["docStatus"] = status

        def reapply(_ours: Resource, current: Resource) -> Resource:
            out = {**current, "status": status}
            if rtype == "DocumentReference":
                out["docStatus"] = status
            return out

        return self.update(ours, server_id=server_id, version=version, reapply=reapply)

    # ------------------------------------------------------------------ referral Task

    def complete_task(
        self, task_url: str, report_reference: str, *, cdex: bool = False
    ) -> DeliveryReceipt:
        """Referral Task -> completed with the report in `output` (RF-21), idempotently.

        `task_url` is the Task on this destination (absolute, or relative to the base).
        """
        url = self._absolute(task_url)
        output_type = {
            "coding": [
                {"system": CDEX_OUTPUT_SYSTEM, "code": CDEX_OUTPUT_CODE}
                if cdex
                else {"system": REPORT_OUTPUT_SYSTEM, "code": REPORT_OUTPUT_CODE}
            ]
        }
        task = self._read_url(url)
        if task_is_completed_with(task, report_reference):
            return _receipt("Task", None, task, url, status_code=200)
        ours = complete_task_resource(task, report_reference, output_type)
        return self.update(
            ours,
            server_id=str(task["id"]),
            version=_version_of(task, None),
            reapply=lambda _ours, current: complete_task_resource(
                current, report_reference, output_type
            ),
        )

    # ------------------------------------------------------------------ HTTP

    def read(self, reference: str) -> Resource:
        """Read a resource on the destination (`Type/id` or absolute URL); meta.versionId is
        filled from the ETag when the body lacks it."""
        return self._read_url(self._absolute(reference))

    def _log_written(self, event: str, receipt: DeliveryReceipt, **extra: Any) -> None:
        log.info(
            event,
            system=self._system,
            resource_type=receipt.resource_type,
            status=receipt.status_code,
            server_id=receipt.server_id,
            version=receipt.version,
            **extra,
        )

    def _read_url(self, url: str) -> Resource:
        resp = self._request("GET", url)
        if resp.status_code != 200:
            raise self._rejected(resp, "read")
        body = _json(resp)
        if not isinstance(body, dict) or "resourceType" not in body:
            raise UpstreamRejectedError(
                "read returned no FHIR resource", system=self._system, url=url, status=200
            )
        etag_version = _etag_version(resp.headers.get("ETag"))
        if etag_version and not (body.get("meta") or {}).get("versionId"):
            body = {**body, "meta": {**(body.get("meta") or {}), "versionId": etag_version}}
        return body

    def _absolute(self, location: str) -> str:
        if location.startswith(("http://", "https://")):
            return location
        return urljoin(self._base + "/", location.lstrip("/"))

    def _request(
        self,
        method: str,
        url: str,
        *,
        json_body: Resource | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """One request with one token renewal on 401; transport failures and 429/5xx become
        UpstreamUnavailableError (RS-40)."""
        data = None
        if json_body is not None:
            data = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode()
        for renewal in (False, True):
            all_headers = {"Accept": FHIR_JSON, **(headers or {})}
            if data is not None:
                all_headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"  # RS-01
            token = self._tokens.token()
            if token:
                all_headers["Authorization"] = f"Bearer {token}"
            started = time.monotonic()
            try:
                resp = self._session.request(
                    method,
                    url,
                    data=data,
                    headers=all_headers,
                    params=params,
                    timeout=self._timeout,
                    allow_redirects=False,
                )
            except requests.Timeout as exc:
                raise UpstreamUnavailableError(
                    f"{method} timed out after {self._timeout}s", system=self._system, url=url
                ) from exc
            except requests.ConnectionError as exc:
                raise UpstreamUnavailableError(
                    f"{method} could not connect", system=self._system, url=url
                ) from exc
            except requests.RequestException as exc:
                raise UpstreamUnavailableError(
                    f"{method} failed: {type(exc).__name__}", system=self._system, url=url
                ) from exc
            log.debug(
                "delivery.http.done",
                system=self._system,
                method=method,
                status=resp.status_code,
                elapsed_ms=round((time.monotonic() - started) * 1000),
            )
            if resp.status_code == 401 and not renewal:
                log.info("delivery.auth.renew", system=self._system)
                self._tokens.invalidate()
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                raise UpstreamUnavailableError(
                    f"{method} answered {resp.status_code}: {_message(resp)}",
                    system=self._system,
                    url=url,
                    status=resp.status_code,
                    outcome=_outcome(resp),
                    retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                )
            return resp
        return resp  # a second 401: the caller turns it into UpstreamRejectedError

    def _rejected(self, resp: requests.Response, what: str) -> UpstreamRejectedError:
        cls = UpstreamNotFoundError if resp.status_code in (404, 410) else UpstreamRejectedError
        return cls(
            f"{what} rejected with {resp.status_code}: {_message(resp)}",
            system=self._system,
            url=resp.url,
            status=resp.status_code,
            outcome=_outcome(resp),
        )


# ---------------------------------------------------------------------- Task helpers (pure)


def task_is_completed_with(task: Resource, report_reference: str) -> bool:
    if task.get("status") != "completed":
        return False
    return any(
        (o.get("valueReference") or {}).get("reference") == report_reference
        for o in task.get("output") or []
    )


def complete_task_resource(
    task: Resource, report_reference: str, output_type: dict[str, Any]
) -> Resource:
    """The Task with status completed and the report in output (RF-21); other outputs kept."""
    outputs = [
        o
        for o in task.get("output") or []
        if (o.get("valueReference") or {}).get("reference") != report_reference
    ]
    outputs.append({"type": output_type, "valueReference": {"reference": report_reference}})
    out = {k: v for k, v in task.items() if k not in ("statusReason",)}
    out["status"] = "completed"
    out["businessStatus"] = {
        "coding": [{"system": TASK_STATUS, "code": "completed"}],
        "text": "Second-opinion report delivered",
    }
    out["output"] = outputs
    return out


# ---------------------------------------------------------------------- response parsing


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds from now (delay-seconds or HTTP-date, RFC 9110 §10.2.3)."""
    return _http.parse_retry_after(value, datetime.now(UTC))


def _json(resp: requests.Response) -> Any:
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        return None  # RS-09: generic infrastructure may answer with HTML or text


def _outcome(resp: requests.Response) -> dict[str, Any] | None:
    body = _json(resp)
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def _message(resp: requests.Response) -> str:
    """The EHR's own words: OperationOutcome diagnostics/details, else the HTTP reason."""
    outcome = _outcome(resp)
    if outcome:
        texts = []
        for issue in outcome.get("issue") or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
            if text:
                texts.append(str(text))
        if texts:
            return "; ".join(texts)[:2000]
    return resp.reason or "no reason given"


def _is_resource(body: Any, rtype: str) -> bool:
    return isinstance(body, dict) and body.get("resourceType") == rtype and bool(body.get("id"))


def _first_identifier(resource: Resource) -> str | None:
    for ident in resource.get("identifier") or []:
        if ident.get("system") and ident.get("value"):
            return f"{ident['system']}|{ident['value']}"
    return None


def _etag_version(etag: str | None) -> str | None:
    """RS-02: `W/"23"` -> `23`."""
    if not etag:
        return None
    value = etag.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


def _location_parts(location: str | None) -> tuple[str | None, str | None]:
    """RS-04: `[base]/[type]/[id]/_history/[vid]` -> (id, vid)."""
    if not location:
        return None, None
    parts = urlsplit(location).path.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        return parts[-3], parts[-1]
    return parts[-1] or None, None


def _version_of(resource: Any, fallback: str | None) -> str | None:
    if isinstance(resource, dict):
        vid = (resource.get("meta") or {}).get("versionId")
        if vid:
            return str(vid)
    return fallback


def _receipt(
    rtype: str,
    resp: requests.Response | None,
    body: Any,
    location: str | None,
    *,
    etag: str | None = None,
    status_code: int | None = None,
) -> DeliveryReceipt:
    loc_id, loc_vid = _location_parts(location)
    server_id = body.get("id") if isinstance(body, dict) else None
    server_id = server_id or loc_id
    if not server_id:
        raise UpstreamRejectedError(
            f"{rtype} write gave neither a resource nor a Location", status=status_code
        )
    version = _version_of(
        body, _etag_version(etag or (resp.headers.get("ETag") if resp is not None else None))
    )
    return DeliveryReceipt(
        resource_type=rtype,
        server_id=str(server_id),
        version=version or loc_vid,
        location=location,
        status_code=status_code or (resp.status_code if resp is not None else 200),
    )


def _replace(receipt: DeliveryReceipt, **changes: Any) -> DeliveryReceipt:
    return replace(receipt, **changes)
