"""The WADO-RS multipart body: the file store's instances are mapped (no copy), other sources
(the Orthanc backend's HTTP stream) copied; both give the same bytes, and a stored file shorter
than its index row is refused."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from fastapi.responses import StreamingResponse

from fhir_gateway.api import dicomweb
from fhir_gateway.errors import NotFoundError
from fhir_gateway.imaging.store import InstanceRef


class FolderSource:
    """Instances as files (`streamed`: their bytes handed out as a non-file stream, as the
    Orthanc backend does)."""

    def __init__(self, files: dict[str, Path], *, streamed: bool = False) -> None:
        self.files, self.streamed = files, streamed

    def iter_instances(self, *args: Any, **kwargs: Any) -> Iterator[InstanceRef]:
        raise NotImplementedError

    def iter_series(self, *args: Any, **kwargs: Any) -> Iterator[tuple[InstanceRef, int]]:
        raise NotImplementedError

    def open_instance(self, ref: InstanceRef) -> BinaryIO:
        path = self.files[ref.sop_uid]
        return io.BytesIO(path.read_bytes()) if self.streamed else path.open("rb")

    def metadata(self, ref: InstanceRef) -> dict[str, Any]:
        raise NotImplementedError


def _refs(tmp_path: Path, sizes: list[int]) -> tuple[dict[str, Path], list[InstanceRef]]:
    files, refs = {}, []
    for i, size in enumerate(sizes):
        path = tmp_path / f"i{i}.dcm"
        path.write_bytes(bytes((i + j) % 251 for j in range(size)))
        files[f"1.2.{i}"] = path
        refs.append(
            InstanceRef("c", "1.2", "1.2.9", f"1.2.{i}", "x", "1.2.840.10008.1.2.1", "h", size)
        )
    return files, refs


def _body(source: Any, refs: list[InstanceRef]) -> tuple[bytes, int, str]:
    response = dicomweb.retrieve(source, refs, "http://gw/cases/c/dicom-web", "")
    assert isinstance(response, StreamingResponse)

    async def collect() -> bytes:
        return b"".join(
            [c.encode() if isinstance(c, str) else bytes(c) async for c in response.body_iterator]
        )

    boundary = response.media_type.rsplit("boundary=", 1)[1] if response.media_type else ""
    return asyncio.run(collect()), int(response.headers["content-length"]), boundary


def test_mapped_and_copied_bodies_are_the_same_bytes(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dicomweb, "BATCH", 3000)  # several batches, one instance alone
    files, refs = _refs(tmp_path, [1000, 0, 1500, 5000, 700])
    mapped, length, boundary = _body(FolderSource(files), refs)
    assert len(mapped) == length
    copied, _, other = _body(FolderSource(files, streamed=True), refs)
    assert copied.replace(other.encode(), boundary.encode()) == mapped
    parts = mapped.split(f"--{boundary}".encode())
    assert parts[0] == b""
    assert parts[-1] == b"--\r\n"
    for part, path in zip(parts[1:-1], files.values(), strict=True):
        head, _, body = part.partition(b"\r\n\r\n")
        assert body == path.read_bytes() + b"\r\n"
        assert f"Content-Length: {path.stat().st_size}".encode() in head


def test_a_stored_file_shorter_than_its_index_row_is_refused(tmp_path) -> None:
    files, refs = _refs(tmp_path, [1000, 2000])
    files["1.2.1"].write_bytes(b"short")
    with pytest.raises(NotFoundError, match="shorter"):
        _body(FolderSource(files), refs)
