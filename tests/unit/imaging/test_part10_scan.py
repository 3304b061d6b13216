"""connectors.part10.scan_part10 (the fast path) must never accept what pydicom's check refuses,
and must agree with it on the UIDs of what it accepts.

Files: our DICOM fixtures plus the test files that ship inside the installed pydicom package
(big and little endian, implicit VR, deflate, JPEG/RLE encapsulated, UN and private sequences,
truncated ones), each whole and cut at many offsets.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from connectors.dicomweb import verify_part10
from connectors.part10 import scan_part10
from fhir_gateway.errors import ParseError

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "dicom"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FILES = sorted(FIXTURES.rglob("*.dcm")) + sorted(PYDICOM_FILES.glob("*.dcm"))


def _scan(data: bytes, head: int):
    return scan_part10(data[:head], len(data), lambda at, n: data[at : at + n])


def _reference(data: bytes, tmp_path: Path):
    path = tmp_path / "part.dcm"
    path.write_bytes(data)
    try:
        return verify_part10(path)
    except ParseError:
        return None


def test_there_are_enough_files_to_compare():
    assert len(FILES) > 60


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_fast_scan_agrees_with_pydicom(path, tmp_path):
    data = path.read_bytes()
    step = max(1, len(data) // 30)
    for n in [len(data), *range(1, len(data), step)]:
        cut = data[:n]
        for head in (len(cut), 200):  # all in memory, or only a prefix (the rest read on demand)
            fast = _scan(cut, head)
            if fast is not None:
                assert fast == _reference(cut, tmp_path), (path.name, n, head)


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "test-SR.dcm"]
)
def test_common_encodings_take_the_fast_path(name):
    data = (PYDICOM_FILES / name).read_bytes()
    info = _scan(data, 1024)
    assert info is not None
    assert info.sop_uid == str(pydicom.dcmread(PYDICOM_FILES / name).SOPInstanceUID)


def test_encapsulated_pixel_data_takes_the_fast_path():
    data = (PYDICOM_FILES / "JPEG2000.dcm").read_bytes()
    assert _scan(data, len(data)) is not None


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "image_dfl.dcm"])
def test_big_endian_and_deflate_are_left_to_pydicom(name):
    data = (PYDICOM_FILES / name).read_bytes()
    assert _scan(data, len(data)) is None


def test_a_cut_inside_pixel_data_is_never_accepted():
    data = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    assert _scan(data[:-2], len(data)) is None
    assert _scan(data[:-1], len(data)) is None
