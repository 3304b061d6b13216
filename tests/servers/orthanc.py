"""Start a real Orthanc 1.10 + DICOMweb plugin on loopback for tests (DESIGN.md "Real components").

`OrthancServer` writes a JSON config (loopback only, free HTTP + DICOM ports, temp storage,
`DefaultEncoding` Utf8, no auth), runs `Orthanc CONFIG`, waits for `/system` and stops it again.
`other modalities` may be registered so two Orthancs can play PACS and gateway for DIMSE tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from fhir_gateway.sandbox.server import free_port
from tests.servers.postgres import skip_or_fail

ORTHANC_BIN = os.environ.get("FHIR_GATEWAY_ORTHANC_BIN", "/usr/sbin/Orthanc")
PLUGIN_DIR = Path(os.environ.get("FHIR_GATEWAY_ORTHANC_PLUGINS", "/usr/share/orthanc/plugins"))
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"


def require_orthanc() -> None:
    """Skip (or fail, when FHIR_GATEWAY_REQUIRE_SERVERS=1) when Orthanc or its plugin is missing."""
    missing = [p for p in (Path(ORTHANC_BIN), DICOMWEB_PLUGIN) if not p.exists()]
    if not missing:
        return
    skip_or_fail(f"Orthanc not installed (missing {', '.join(map(str, missing))})")


@dataclass
class OrthancServer:
    """A running Orthanc: `url` (REST root), `dicomweb_url`, `aet`, `dicom_port`."""

    aet: str
    http_port: int
    dicom_port: int
    storage: Path
    process: subprocess.Popen[bytes] | None = None
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, object]:
        return {
            "Name": self.aet,
            "StorageDirectory": str(self.storage / "db"),
            "IndexDirectory": str(self.storage / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DefaultEncoding": "Utf8",
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "HttpTimeout": 60,
            "StableAge": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
            "OverwriteInstances": True,
        }

    def start(self, timeout_s: float = 30.0) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        cfg = self.storage / "orthanc.json"
        cfg.write_text(json.dumps(self.config()), encoding="utf-8")
        with (self.storage / "orthanc.log").open("wb") as log:  # the child keeps its own fd
            self.process = subprocess.Popen(
                [ORTHANC_BIN, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=self.storage
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited early, see {self.storage / 'orthanc.log'}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout_s}s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def add_modality(self, name: str, other: OrthancServer) -> None:
        """Register `other` as DICOM modality `name` (REST, no restart)."""
        self.modalities[name] = (other.aet, "127.0.0.1", other.dicom_port)
        r = requests.put(
            f"{self.url}/modalities/{name}",
            json={"AET": other.aet, "Host": "127.0.0.1", "Port": other.dicom_port},
            timeout=10,
        )
        r.raise_for_status()

    def upload(self, data: bytes) -> dict[str, str]:
        """Store one Part 10 file through the REST API; returns Orthanc's answer."""
        r = requests.post(f"{self.url}/instances", data=data, timeout=60)
        r.raise_for_status()
        answer: dict[str, str] = r.json()
        return answer

    def clear(self) -> None:
        """Delete every patient (keeps the server running)."""
        for pid in requests.get(f"{self.url}/patients", timeout=10).json():
            requests.delete(f"{self.url}/patients/{pid}", timeout=30).raise_for_status()


@contextmanager
def run_orthanc(
    base: Path, aet: str = "ORTHANC", modalities: Mapping[str, OrthancServer] | None = None
) -> Iterator[OrthancServer]:
    """A started Orthanc under `base`, stopped (and its storage removed) on exit."""
    require_orthanc()
    server = OrthancServer(aet=aet, http_port=free_port(), dicom_port=free_port(), storage=base)
    for name, other in (modalities or {}).items():
        server.modalities[name] = (other.aet, "127.0.0.1", other.dicom_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
