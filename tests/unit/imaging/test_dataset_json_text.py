"""The image index keeps each instance's DICOM JSON as text made with per-element memos
(`dataset_json_text`): it must be pydicom's own `to_json_dict` output, byte for byte, for every
DICOM file in fixtures/ (non-ASCII character sets, sequences, whole-slide, odd ones), whether
its elements' texts are made afresh or come from the memo filled by the other files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from fhir_gateway.imaging import store
from fhir_gateway.imaging.store import dataset_json, dataset_json_text
from tests.conftest import FIXTURES

FILES = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.suffix not in (".json", ".md"))


def _read(path: Path | bytes, *, pixels: bool = False) -> pydicom.Dataset | None:
    try:
        src = io.BytesIO(path) if isinstance(path, bytes) else path
        return pydicom.dcmread(src, stop_before_pixels=not pixels)
    except Exception:  # not DICOM (the fixtures tree holds every kind of input)
        return None


def _pydicom_text(ds: pydicom.Dataset) -> str:
    return json.dumps(dataset_json(ds), ensure_ascii=False, separators=(",", ":"))


DICOM = [p for p in FILES if _read(p) is not None]


def test_the_fixtures_cover_what_matters() -> None:
    names = {p.name for p in DICOM}
    assert len(DICOM) >= 30
    assert {"chrJapMulti.dcm", "chrSQEncoding.dcm", "chrArab.dcm", "sm_image.dcm"} <= names
    assert any(p.parent.name == "bad" for p in DICOM)


@pytest.mark.parametrize("pixels", [False, True], ids=["header", "whole"])
def test_every_fixture_gives_pydicoms_json_fresh_and_memoised(pixels: bool) -> None:
    memo: store.Fragments = {}
    compared = 0
    for rounds in range(2):  # the first fills the memo, the second reads from it
        for path in DICOM:
            ds, again = _read(path, pixels=pixels), _read(path, pixels=pixels)
            assert ds is not None
            assert again is not None
            try:
                expected = _pydicom_text(ds)
            except Exception as exc:  # pydicom refuses it: the memoised path must too
                with pytest.raises(type(exc)):
                    dataset_json_text(again, memo)
                continue
            assert dataset_json_text(again, memo) == expected, (path.name, rounds)
            compared += 1
    assert compared >= 2 * 28
    assert len(memo) > 100  # the memo was used, not bypassed


def test_a_series_of_instances_shares_the_memo_and_keeps_what_differs() -> None:
    """Instances that differ only in a few elements (as the slices of a CT series do)."""
    memo: store.Fragments = {}
    base = _read(FIXTURES / "dicom" / "ct" / "CT_small.dcm", pixels=True)
    assert base is not None
    texts = []
    for n in range(1, 6):
        base.SOPInstanceUID = generate_uid()
        base.InstanceNumber = n
        base.SliceLocation = -77.2 + n * 0.5
        buf = io.BytesIO()
        base.save_as(buf, enforce_file_format=True)
        ds = _read(buf.getvalue())
        assert ds is not None
        expected = _pydicom_text(_read(buf.getvalue()))  # type: ignore[arg-type]
        text = dataset_json_text(ds, memo)
        assert text == expected
        texts.append(json.loads(text))
    assert len({t["00200013"]["Value"][0] for t in texts}) == 5
    assert len({t["00080018"]["Value"][0] for t in texts}) == 5
    assert all(t["00100010"] == texts[0]["00100010"] for t in texts)


def test_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "FRAGMENTS_MAX", 10)
    memo: store.Fragments = {}
    for path in DICOM[:5]:
        ds = _read(path)
        assert ds is not None
        try:
            dataset_json_text(ds, memo)
        except Exception:
            continue
        assert len(memo) <= 10


def test_the_same_bytes_under_another_character_set_are_decoded_again() -> None:
    """chrRuss.dcm's bytes once as Cyrillic (ISO_IR 144) and once as Latin-1 (ISO_IR 100)."""
    memo: store.Fragments = {}
    data = (FIXTURES / "dicom" / "charsets" / "chrRuss.dcm").read_bytes()
    assert data.count(b"ISO_IR 144") == 1
    for variant in (data, data.replace(b"ISO_IR 144", b"ISO_IR 100")):
        ds = _read(variant)
        assert ds is not None
        assert dataset_json_text(ds, memo) == _pydicom_text(_read(variant))  # type: ignore[arg-type]
