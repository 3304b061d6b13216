"""connectors.dicomweb.verify_part10: each WADO-RS part must be a complete Part 10 file."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.dicomweb import verify_part10
from fhir_gateway.errors import ParseError

DICOM = Path(__file__).resolve().parents[3] / "fixtures" / "dicom"
IMAGES = [
    "ct/CT_small.dcm",
    "mr/MR_small.dcm",
    "series_77654033_CT2/17136.dcm",
    "series_77654033_CR1/6154.dcm",
    "charsets/chrH31.dcm",
    "sm/sm_image.dcm",
]


@pytest.mark.parametrize("rel", IMAGES)
def test_complete_file_verifies(rel):
    info = verify_part10(DICOM / rel)
    assert info.sop_uid
    assert info.study_uid
    assert info.transfer_syntax_uid


@pytest.mark.parametrize("rel", IMAGES)
def test_every_odd_cut_of_an_image_is_rejected(rel, tmp_path):
    # pydicom itself stops silently at a cut; verify_part10 must not. DICOM element lengths
    # are even, so an odd cut is never a clean element boundary.
    data = (DICOM / rel).read_bytes()
    part = tmp_path / "part.dcm"
    for n in range(1, len(data) - 1, 2 * max(1, len(data) // 120)):
        part.write_bytes(data[:n])
        with pytest.raises(ParseError):
            verify_part10(part)


def test_image_file_without_pixels_is_kept():
    # Real files omit Pixel Data (the corpus chrJapMulti.dcm has Rows and no pixels).
    assert verify_part10(DICOM / "charsets/chrJapMulti.dcm").sop_uid


@pytest.mark.parametrize(
    ("rel", "reason"),
    [("bad/no_meta.dcm", "no preamble"), ("bad/MR_truncated.dcm", "truncated")],
)
def test_corpus_bad_files_rejected(rel, reason):
    with pytest.raises(ParseError, match=reason):
        verify_part10(DICOM / rel)
