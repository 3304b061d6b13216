"""A minimal FHIR R4 server for delivery tests, served on loopback by pytest-httpserver.

It behaves like real servers on the points delivery depends on: conditional create
(0 matches -> 201 + Location + ETag, 1 -> 200, >1 -> 412; RS-05), `Prefer: return=minimal`
or servers that send an empty 201, version-aware update (`If-Match`, 412 on mismatch; RS-03),
searches by identifier, transactions (RS-30), OperationOutcome errors, and injected faults:
bursts of 503/429 with Retry-After, an expiring bearer token (401), resource types the EHR refuses
to write (403/405), a 422 OperationOutcome, and "accepted but the response was lost" (the write
commits, then the client gets a 502).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

FHIR_JSON = "application/fhir+json"


@dataclass
class Fault:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    commit_first: bool = False  # process the request, then answer with this fault
    methods: tuple[str, ...] = ("GET", "POST", "PUT")


def outcome(text: str, code: str = "processing") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


class LoopbackFhirServer:
    """In-memory FHIR store with fault injection; `base_url` is its FHIR base."""

    def __init__(self, httpserver: HTTPServer) -> None:
        self.httpserver = httpserver
        self.base_url = httpserver.url_for("/fhir").rstrip("/")
        self.resources: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self.faults: list[Fault] = []
        self.refuse_types: dict[str, int] = {}
        self.valid_token: str | None = None
        self.empty_201 = False
        self.empty_200 = False
        self.conflict_status = 412
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        httpserver.expect_request(re.compile(r"^/fhir.*")).respond_with_handler(self._handle)

    # -------------------------------------------------------------- test helpers

    def count(self, rtype: str) -> int:
        return sum(1 for (t, _id) in self.resources if t == rtype)

    def get(self, rtype: str, id_: str) -> dict[str, Any]:
        return self.resources[(rtype, id_)][1]

    def put_resource(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Store a resource directly (e.g. a Task the EHR holds)."""
        with self._lock:
            return self._store(resource["resourceType"], resource.get("id") or _new_id(), resource)

    def bump(self, rtype: str, id_: str) -> None:
        """Someone else edits the resource on the EHR: its version moves on."""
        with self._lock:
            _vid, res = self.resources[(rtype, id_)]
            self._store(rtype, id_, res)

    # -------------------------------------------------------------- request handling

    def _handle(self, request: Request) -> Response:
        with self._lock:
            self.requests.append((request.method, request.path, dict(request.headers)))
            auth = request.headers.get("Authorization")
            if self.valid_token is not None and auth != f"Bearer {self.valid_token}":
                return _resp(401, outcome("token expired or invalid", "login"))
            fault = self._next_fault(request.method)
            if fault and not fault.commit_first:
                return _resp(fault.status, fault.body, fault.headers)
            answer = self._dispatch(request)
            if fault:
                return _resp(fault.status, fault.body, fault.headers)
            return answer

    def _next_fault(self, method: str) -> Fault | None:
        for i, fault in enumerate(self.faults):
            if method in fault.methods:
                return self.faults.pop(i)
        return None

    def _dispatch(self, request: Request) -> Response:
        path = request.path[len("/fhir") :].strip("/")
        parts = path.split("/") if path else []
        if request.method == "POST" and not parts:
            return self._transaction(json.loads(request.get_data()))
        if not parts or not parts[0][:1].isupper():
            return _resp(404, outcome(f"unknown path {request.path}", "not-found"))
        rtype = parts[0]
        if request.method == "POST" and len(parts) == 1:
            if rtype in self.refuse_types:
                status = self.refuse_types[rtype]
                return _resp(status, outcome(f"{rtype} writes are not allowed", "forbidden"))
            body = _parse(request)
            if isinstance(body, Response):
                return body
            try:
                status, resource, _loc = self._create(
                    rtype, body, request.headers.get("If-None-Exist")
                )
            except ValueError as exc:
                return _resp(400, outcome(str(exc), "invalid"))
            if status == 412:
                return _resp(412, outcome("several resources match If-None-Exist", "duplicate"))
            return self._written(status, resource, request.headers.get("Prefer", ""))
        if request.method == "GET" and len(parts) == 1:
            return self._search(rtype, request.args.get("identifier", ""))
        if len(parts) == 2 and request.method == "GET":
            found = self.resources.get((rtype, parts[1]))
            if not found:
                return _resp(404, outcome(f"{rtype}/{parts[1]} not found", "not-found"))
            return _resp(200, found[1], {"ETag": f'W/"{found[0]}"'})
        if len(parts) == 4 and parts[2] == "_history" and request.method == "GET":
            found = self.resources.get((rtype, parts[1]))
            if not found or str(found[0]) != parts[3]:  # history kept for the current version only
                return _resp(404, outcome(f"{rtype}/{parts[1]} version not found", "not-found"))
            return _resp(200, found[1], {"ETag": f'W/"{found[0]}"'})
        if len(parts) == 2 and request.method == "PUT":
            if rtype in self.refuse_types:
                return _resp(self.refuse_types[rtype], outcome("not allowed", "forbidden"))
            body = _parse(request)
            if isinstance(body, Response):
                return body
            current = self.resources.get((rtype, parts[1]))
            if_match = request.headers.get("If-Match")
            # RFC 9110 §13.1.1: If-Match is false when there is no current representation.
            if if_match and (not current or if_match.strip() != f'W/"{current[0]}"'):
                return _resp(
                    self.conflict_status, outcome("version conflict: resource changed", "conflict")
                )
            resource = self._store(rtype, parts[1], body)
            return self._written(
                200 if current else 201, resource, request.headers.get("Prefer", "")
            )
        return _resp(405, outcome(f"{request.method} not supported here", "not-supported"))

    def _create(
        self, rtype: str, body: dict[str, Any], if_none_exist: str | None
    ) -> tuple[int, dict[str, Any], str]:
        if body.get("resourceType") != rtype:
            raise ValueError("resourceType mismatch")
        if if_none_exist:
            param, _, token = if_none_exist.partition("=")
            if param == "target":
                matches = self._targets(rtype, token)
            elif param == "identifier":
                matches = self._matches(rtype, token)
            else:
                raise ValueError(f"unsupported search parameter {param}")
            if len(matches) == 1:
                return 200, matches[0], ""
            if len(matches) > 1:
                return 412, {}, ""
        resource = self._store(rtype, _new_id(), body)
        return 201, resource, ""

    def _matches(self, rtype: str, token: str) -> list[dict[str, Any]]:
        system, _, value = token.rpartition("|")
        out = []
        for (t, _id), (_vid, res) in self.resources.items():
            if t != rtype:
                continue
            for ident in res.get("identifier") or []:
                if ident.get("value") == value and (not system or ident.get("system") == system):
                    out.append(res)
                    break
        return out

    def _targets(self, rtype: str, reference: str) -> list[dict[str, Any]]:
        return [
            res
            for (t, _id), (_vid, res) in self.resources.items()
            if t == rtype and {"reference": reference} in (res.get("target") or [])
        ]

    def _store(self, rtype: str, id_: str, body: dict[str, Any]) -> dict[str, Any]:
        vid = self.resources.get((rtype, id_), (0, {}))[0] + 1
        resource = {**body, "id": id_, "meta": {**(body.get("meta") or {}), "versionId": str(vid)}}
        self.resources[(rtype, id_)] = (vid, resource)
        return resource

    def _written(self, status: int, resource: dict[str, Any], prefer: str) -> Response:
        rtype, id_, vid = resource["resourceType"], resource["id"], resource["meta"]["versionId"]
        headers = {
            "Location": f"{self.base_url}/{rtype}/{id_}/_history/{vid}",
            "ETag": f'W/"{vid}"',
        }
        minimal = "return=minimal" in prefer
        if (status == 201 and (self.empty_201 or minimal)) or (status == 200 and self.empty_200):
            return Response(b"", status=status, headers=headers)
        return _resp(status, resource, headers)

    def _search(self, rtype: str, token: str) -> Response:
        matches = (
            self._matches(rtype, token)
            if token
            else [r for (t, _i), (_v, r) in self.resources.items() if t == rtype]
        )
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {
                    "fullUrl": f"{self.base_url}/{rtype}/{m['id']}",
                    "resource": m,
                    "search": {"mode": "match"},
                }
                for m in matches
            ],
        }
        return _resp(200, bundle)

    def _transaction(self, bundle: dict[str, Any]) -> Response:
        """All-or-nothing (RS-31): conditional creates, urn:uuid references rewritten (RS-30)."""
        snapshot = dict(self.resources)
        ids: dict[str, str] = {}
        planned = []
        for entry in bundle.get("entry") or []:
            req, res = entry["request"], entry["resource"]
            rtype = res["resourceType"]
            if rtype in self.refuse_types:
                self.resources = snapshot
                return _resp(self.refuse_types[rtype], outcome(f"{rtype} not allowed", "forbidden"))
            token = (req.get("ifNoneExist") or "").split("=", 1)[-1]
            matches = self._matches(rtype, token) if req.get("ifNoneExist") else []
            if len(matches) > 1:
                self.resources = snapshot
                return _resp(412, outcome("several resources match", "duplicate"))
            new_id = matches[0]["id"] if matches else _new_id()
            ids[entry["fullUrl"]] = f"{rtype}/{new_id}"
            planned.append((entry, rtype, new_id, bool(matches)))
        out = []
        for entry, rtype, new_id, existed in planned:
            if existed:
                res = self.resources[(rtype, new_id)][1]
                status = "200 OK"
            else:
                body = _rewrite(entry["resource"], ids)
                res = self._store(rtype, new_id, body)
                status = "201 Created"
            vid = res["meta"]["versionId"]
            out.append(
                {
                    "resource": res,
                    "response": {
                        "status": status,
                        "location": f"{rtype}/{new_id}/_history/{vid}",
                        "etag": f'W/"{vid}"',
                    },
                }
            )
        return _resp(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": out})


def _rewrite(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str) and value["reference"] in ids:
            return {**value, "reference": ids[value["reference"]]}
        return {k: _rewrite(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, ids) for v in value]
    return value


def _parse(request: Request) -> dict[str, Any] | Response:
    if not (request.headers.get("Content-Type") or "").startswith(FHIR_JSON):
        return _resp(415, outcome("expected application/fhir+json", "not-supported"))
    try:
        body = json.loads(request.get_data())
    except ValueError:
        return _resp(400, outcome("body is not JSON", "structure"))
    if not isinstance(body, dict):
        return _resp(400, outcome("body is not a resource", "structure"))
    return body


def _resp(
    status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None
) -> Response:
    data = b"" if body is None else json.dumps(body).encode()
    return Response(data, status=status, headers=headers or {}, content_type=FHIR_JSON)


def _new_id() -> str:
    return uuid.uuid4().hex[:16]
