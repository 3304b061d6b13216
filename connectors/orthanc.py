"""Orthanc as image store (STOW-RS in, orthanc-api-client for lookups/reads/deletes) and as the
bridge to legacy DIMSE PACS (C-FIND / C-MOVE through Orthanc's REST API, Orthanc Book "REST API
of the Orthanc server: query/retrieve").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import requests
import structlog
from orthanc_api_client import OrthancApiClient
from orthanc_api_client import exceptions as orthanc_exc

from connectors._http import send
from connectors.dicomweb import DicomwebClient
from fhir_gateway.errors import (
    UpstreamNotFoundError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")


def _translated(system: str, call: Callable[[], T]) -> T:
    """Run an orthanc-api-client call, translating its exceptions into ours."""
    try:
        return call()
    except orthanc_exc.ResourceNotFound as exc:
        raise UpstreamNotFoundError(f"{system}: resource not found", system=system) from exc
    except orthanc_exc.HttpError as exc:
        status = getattr(exc, "http_status_code", None)
        cls = UpstreamUnavailableError if status is None or status >= 500 else UpstreamRejectedError
        raise cls(f"{system} answered {status}", system=system, status=status) from exc
    except (
        orthanc_exc.ConnectionError,
        orthanc_exc.TimeoutError,
        requests.ConnectionError,
        requests.Timeout,
    ) as exc:
        raise UpstreamUnavailableError(f"{system} unreachable", system=system) from exc
    except orthanc_exc.OrthancApiException as exc:
        raise UpstreamRejectedError(f"{system}: {exc.msg}", system=system) from exc


class OrthancStorage:
    """The Orthanc image-store backend's I/O: store by STOW-RS, read/lookup/delete by REST."""

    def __init__(
        self,
        session: requests.Session,
        orthanc_url: str,
        *,
        dicomweb_root: str = "/dicom-web",
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.url = orthanc_url.rstrip("/")
        auth = requests.auth.HTTPBasicAuth(username, password or "") if username else None
        self._session, self._auth, self._timeout_s = session, auth, timeout_s
        self.dicomweb = DicomwebClient(
            session, self.url + dicomweb_root, timeout_s=timeout_s, auth=auth, system="orthanc"
        )
        self._api = OrthancApiClient(self.url, user=username, pwd=password)

    @property
    def dicomweb_url(self) -> str:
        return self.dicomweb.base_url

    def store_file(self, path: Path, sop_uid: str) -> str:
        """STOW-RS one Part 10 file; returns Orthanc's id of the instance."""
        with path.open("rb") as fh:
            self.dicomweb.store(fh)
        return self.lookup(sop_uid)

    def lookup(self, sop_uid: str) -> str:
        """Orthanc id of the instance with SOP Instance UID `sop_uid`."""
        found = _translated("orthanc", lambda: self._api.instances.lookup(sop_uid))
        if not found:
            raise UpstreamNotFoundError(f"orthanc has no instance {sop_uid}", system="orthanc")
        return str(found)

    def open_file(self, orthanc_id: str) -> BinaryIO:
        """The instance's Part 10 file as a stream (read in chunks, then close): instances
        can be gigabytes (whole-slide images), so they are never held in memory whole."""
        r = send(
            self._session,
            "GET",
            f"{self.url}/instances/{orthanc_id}/file",
            system="orthanc",
            timeout=self._timeout_s,
            auth=self._auth,
            stream=True,
            headers={"Accept-Encoding": "identity"},
        )
        r.raw.decode_content = True
        return cast(BinaryIO, r.raw)  # urllib3's HTTPResponse: an io.IOBase with read()

    def delete(self, orthanc_id: str) -> None:
        _translated("orthanc", lambda: self._api.instances.delete(orthanc_id))


class OrthancDimse:
    """A legacy DIMSE PACS configured as modality `modality` in the Orthanc at `orthanc_url`.

    C-FIND: `POST /modalities/{id}/query`, answers at `/queries/{qid}/answers`.
    C-MOVE: `POST /queries/{qid}/retrieve` moves every answer to `target_aet` (default: that
    Orthanc itself), from where its DICOMweb serves them.
    """

    def __init__(
        self,
        session: requests.Session,
        orthanc_url: str,
        modality: str,
        *,
        auth: requests.auth.AuthBase | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self._session = session
        self.url = orthanc_url.rstrip("/")
        self.modality = modality
        self._auth = auth
        self._timeout = timeout_s

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        # Orthanc reports a failed C-FIND/C-MOVE to the remote PACS as 500: retryable.
        r = send(
            self._session,
            method,
            f"{self.url}/{path}",
            system="orthanc",
            timeout=self._timeout,
            auth=self._auth,
            json=body,
        )
        return r.json() if r.content else None

    def find_studies(self, query: Mapping[str, str]) -> tuple[str, list[dict[str, Any]]]:
        """C-FIND at study level; returns the query id (for C-MOVE) and the answers."""
        body = {"Level": "Study", "Query": {"StudyInstanceUID": "", **query}}
        answer = self._call("POST", f"modalities/{self.modality}/query", body)
        query_id = str(answer["ID"])
        answers = self._call("GET", f"queries/{query_id}/answers?expand&simplify")
        log.info("orthanc.cfind.done", modality=self.modality, count=len(answers))
        return query_id, list(answers)

    def move(self, query_id: str, target_aet: str | None = None) -> None:
        """C-MOVE every answer of `query_id` (synchronously)."""
        body: dict[str, Any] = {"Synchronous": True}
        if target_aet:
            body["TargetAet"] = target_aet
        self._call("POST", f"queries/{query_id}/retrieve", body)
        log.info("orthanc.cmove.done", modality=self.modality)
