"""FHIR R4 REST client for an outside EHR: read, paged search, $everything, Binary download.

STANDARDS.md §5: opaque `next` links (RS-20), only `search.mode=match` counted (RS-21), POST
search for long queries (RS-22), OperationOutcome errors (RS-09), withheld data = partial (SM-14).
Retries and error translation live in `_http`; the session and the token provider are injected.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin

import requests
import structlog

from connectors._http import FHIR_JSON, Http, origin
from fhir_gateway.errors import UpstreamError, UpstreamRejectedError
from fhir_gateway.resources import Resource, json_loads

log = structlog.get_logger(__name__)

MAX_GET_URL = 2000  # RS-22 [D]: longer searches go as POST [type]/_search
MAX_PAGES = 10_000
# IssueType codes saying the server left data out (SM-14; http://hl7.org/fhir/issue-type).
WITHHELD_ISSUES = frozenset({"suppressed", "forbidden", "security", "too-costly", "incomplete"})


class TokenProvider(Protocol):
    def token(self) -> str: ...
    def invalidate(self) -> None: ...
    def auth(self) -> requests.auth.AuthBase: ...


@dataclass
class Page:
    """One searchset page: matches, included resources and OperationOutcome issues."""

    matches: list[Resource]
    included: list[Resource]
    issues: list[dict[str, Any]]
    total: int | None
    url: str

    @property
    def withheld(self) -> bool:
        return any(i.get("code") in WITHHELD_ISSUES for i in self.issues)


@dataclass
class SearchResult:
    resources: list[Resource] = field(default_factory=list)
    included: list[Resource] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)
    pages: int = 0
    total: int | None = None
    partial: bool = False

    def add(self, page: Page) -> None:
        self.resources += page.matches
        self.included += page.included
        self.issues += page.issues
        self.pages += 1
        if self.total is None:
            self.total = page.total
        self.partial = self.partial or page.withheld


@dataclass(frozen=True)
class BinaryFile:
    path: Path
    sha256: str
    size: int
    content_type: str


class FhirEhrClient:
    """EhrClient over FHIR R4 REST; follows Bundle.link[next] as an opaque URL."""

    def __init__(
        self,
        http: Http,
        base_url: str,
        *,
        tokens: TokenProvider | None = None,
        max_get_url: int = MAX_GET_URL,
    ) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._auth = tokens.auth() if tokens else None
        self._max_get_url = max_get_url

    # -- interactions ------------------------------------------------------------------

    def capabilities(self) -> Resource:
        return self._json(self._send("GET", f"{self.base_url}/metadata"))

    def read(self, resource_type: str, resource_id: str) -> Resource:
        return self._json(self._send("GET", f"{self.base_url}/{resource_type}/{resource_id}"))

    def search(
        self,
        resource_type: str,
        params: Mapping[str, str | Sequence[str]] | None = None,
        *,
        post: bool = False,
    ) -> SearchResult:
        """All pages of a search. `post=True` keeps the parameters out of the URL (identifiers
        then never reach access logs), as `POST [type]/_search` (RS-22)."""
        result = SearchResult()
        for page in self.iter_pages(resource_type, params, post=post):
            result.add(page)
        return result

    def everything(self, patient_id: str) -> SearchResult:
        """`Patient/[id]/$everything`, all pages."""
        result = SearchResult()
        for page in self.iter_everything(patient_id):
            result.add(page)
        return result

    def iter_everything(
        self, patient_id: str, types: Sequence[str] | None = None
    ) -> Iterator[Page]:
        """`Patient/[id]/$everything`, page by page; `types` asks only for those resource types
        (the operation's `_type` parameter), so the server has nothing to withhold that we never
        wanted (a token scoped to those types would otherwise make every pull look partial)."""
        url = f"{self.base_url}/Patient/{patient_id}/$everything"
        if types:
            url += "?" + urlencode({"_type": ",".join(types)})
        yield from self._follow(self._send("GET", url))

    def iter_pages(
        self,
        resource_type: str,
        params: Mapping[str, str | Sequence[str]] | None = None,
        *,
        post: bool = False,
    ) -> Iterator[Page]:
        """Search pages in order; GET, or POST `_search` when asked or the URL would be long."""
        url = f"{self.base_url}/{resource_type}"
        query = _items(params or {})
        prepared = requests.Request("GET", url, params=query).prepare()
        if post or len(prepared.url or "") > self._max_get_url:
            first = self._send(
                "POST",
                f"{url}/_search",
                data=query,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        else:
            first = self._send("GET", url, params=query)
        yield from self._follow(first)

    def fetch_binary(self, url: str, dest_dir: Path, content_type: str | None = None) -> BinaryFile:
        """Download a Binary (or attachment URL) on this server, streamed to a temp file.

        The file is named by its SHA-256 in `dest_dir` (content addressed). Only URLs on this
        server are fetched: our token never goes elsewhere (SM-12).

        Raises:
            UpstreamRejectedError: the URL is on another server.
        """
        absolute = urljoin(self.base_url + "/", url)
        if origin(absolute) != origin(self.base_url):
            raise UpstreamRejectedError(
                "attachment is on another server; not fetched with this server's token",
                system=self._http.system,
                url=absolute,
            )
        accept = f"{content_type}, {FHIR_JSON};q=0.5" if content_type else "*/*"
        response = self._send("GET", absolute, headers={"Accept": accept}, stream=True)
        dest_dir.mkdir(parents=True, exist_ok=True)
        got_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                if got_type in (FHIR_JSON, "application/json"):
                    # The server answered with a Binary resource: its data is base64 inside.
                    resource = self._json(response)
                    data = base64.b64decode(resource.get("data") or "")
                    got_type = str(resource.get("contentType") or content_type or "")
                    out.write(data)
                    digest.update(data)
                    size = len(data)
                else:
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            sha = digest.hexdigest()
            final = dest_dir / sha
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        finally:
            response.close()
        return BinaryFile(final, sha, size, got_type or "application/octet-stream")

    # -- plumbing ----------------------------------------------------------------------

    def _follow(self, first: requests.Response) -> Iterator[Page]:
        seen: set[str] = set()
        response: requests.Response | None = first
        while response is not None:
            bundle = self._json(response)
            page = _page(bundle, response.url)
            yield page
            next_url = _next_link(bundle)
            if next_url is None:
                return
            next_url = urljoin(self.base_url + "/", next_url)
            if next_url in seen or next_url == response.url:
                raise UpstreamRejectedError(
                    f"paging loop: the server's next link repeats {next_url}",
                    system=self._http.system,
                    url=next_url,
                )
            if len(seen) >= MAX_PAGES:
                raise UpstreamRejectedError(
                    f"more than {MAX_PAGES} pages; stopped at {next_url}",
                    system=self._http.system,
                    url=next_url,
                )
            seen.add(next_url)
            seen.add(response.url)
            response = self._send("GET", next_url)

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request with FHIR headers; on a 401, renew the token once and retry (SM-10)."""
        headers = {"Accept": FHIR_JSON, **kwargs.pop("headers", {})}
        try:
            return self._http.request(method, url, headers=headers, auth=self._auth, **kwargs)
        except UpstreamRejectedError as exc:
            if exc.status != 401 or self._tokens is None:
                raise
            log.info("fhir.request.unauthorized", action="renew_token")
            self._tokens.invalidate()
            return self._http.request(method, url, headers=headers, auth=self._auth, **kwargs)

    def _json(self, response: requests.Response) -> Resource:
        try:
            body = json_loads(response.content)
        except ValueError as exc:
            raise UpstreamRejectedError(
                f"{self._http.system}: response is not JSON",
                system=self._http.system,
                url=response.url,
                status=response.status_code,
            ) from exc
        if not isinstance(body, dict) or "resourceType" not in body:
            raise UpstreamRejectedError(
                f"{self._http.system}: response is not a FHIR resource",
                system=self._http.system,
                url=response.url,
                status=response.status_code,
            )
        return body


def _items(params: Mapping[str, str | Sequence[str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        if isinstance(value, str):
            out.append((key, value))
        else:
            out += [(key, v) for v in value]
    return out


def _page(bundle: Resource, url: str) -> Page:
    if bundle.get("resourceType") != "Bundle":
        raise UpstreamRejectedError(
            f"search returned {bundle.get('resourceType')}, not a Bundle", system="fhir", url=url
        )
    matches: list[Resource] = []
    included: list[Resource] = []
    issues: list[dict[str, Any]] = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        mode = (entry.get("search") or {}).get("mode")
        if resource.get("resourceType") == "OperationOutcome":
            issues += [i for i in resource.get("issue") or [] if isinstance(i, dict)]
        elif mode in (None, "match"):
            matches.append(resource)
        else:
            included.append(resource)
    total = bundle.get("total")
    return Page(matches, included, issues, total if isinstance(total, int) else None, url)


def _next_link(bundle: Resource) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


__all__ = ["BinaryFile", "FhirEhrClient", "Page", "SearchResult", "TokenProvider", "UpstreamError"]
