"""FileImageStore: content-addressed blobs + per-case index rows (SQLite, no servers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from connectors.dicomweb import RetrievedInstance, verify_part10
from fhir_gateway.errors import NotFoundError
from fhir_gateway.imaging.store import FileImageStore
from fhir_gateway.settings import Settings
from fhir_gateway.store import open_store
from tests.integration.imaging.cases import make_case

DICOM = Path(__file__).resolve().parents[3] / "fixtures" / "dicom"


def staged(staging: Path, rel: str) -> RetrievedInstance:
    import hashlib

    src = DICOM / rel
    path = staging / (src.name + ".part")
    shutil.copy(src, path)
    data = src.read_bytes()
    info = verify_part10(path)
    return RetrievedInstance(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        study_uid=info.study_uid,
        series_uid=info.series_uid,
        sop_uid=info.sop_uid,
        sop_class_uid=info.sop_class_uid,
        transfer_syntax_uid=info.transfer_syntax_uid,
    )


def test_blobs_shared_across_cases_and_freed_with_the_last(settings: Settings):
    store = open_store(settings.db_url)
    fs = FileImageStore(store, settings.data_dir)
    a, b = make_case(store, "a"), make_case(store, "b")
    with fs.staging() as staging:
        ref_a = fs.add(a, staged(staging, "ct/CT_small.dcm"), "src")
        ref_b = fs.add(b, staged(staging, "ct/CT_small.dcm"), "src")
        assert list(staging.iterdir()) == []  # temp files were moved or removed
    assert not staging.exists()
    blob = fs.blob_path(ref_a.sha256)
    assert blob == settings.data_dir / "blobs" / "sha256" / ref_a.sha256[:2] / ref_a.sha256[2:]
    assert blob.read_bytes() == (DICOM / "ct/CT_small.dcm").read_bytes()
    assert ref_a.sha256 == ref_b.sha256
    assert fs.held_sop_uids(a) == {ref_a.sop_uid}
    assert [r.sop_uid for r in fs.iter_instances(a, ref_a.study_uid, ref_a.series_uid)] == [
        ref_a.sop_uid
    ]
    assert fs.metadata(ref_a)["00080018"]["Value"] == [ref_a.sop_uid]
    assert fs.delete_case(a) == 1
    assert blob.exists()  # still used by case b
    with pytest.raises(NotFoundError):
        fs.get(a, ref_a.sop_uid)
    assert fs.delete_case(b) == 1
    assert not blob.exists()
    with pytest.raises(NotFoundError):
        fs.open_instance(ref_b)
    store.dispose()


def test_staging_left_by_a_killed_pull_is_removed_a_day_later(settings: Settings):
    import os
    import time

    store = open_store(settings.db_url)
    fs = FileImageStore(store, settings.data_dir)
    root = settings.data_dir / "tmp" / "wado"
    old, recent = root / "pull-old", root / "pull-recent"
    for d in (old, recent):
        d.mkdir(parents=True)
        (d / "x.part").write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    with fs.staging() as staging:
        assert staging.parent == root
    assert not old.exists()
    assert (recent / "x.part").exists()  # may belong to a pull still running
    store.dispose()
