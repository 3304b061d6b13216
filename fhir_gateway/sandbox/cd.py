"""A synthetic patient CD for the demo and the tests: small CT instances of one study of one
patient, with a DICOMDIR written by pydicom's FileSet (PS3.10 File-set) or as loose files."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fhir_gateway.records.uploads import close_fileset


def synthetic_instance(study: str, series: str, number: int, patient: dict[str, str]) -> Dataset:
    """One 8x8 CT image (synthetic, about 1 KB); `patient` holds DICOM keywords and values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    for key, value in patient.items():
        setattr(ds, key, value)
    ds.Modality, ds.StudyDate, ds.StudyTime = "CT", "20240105", "101500"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "CD1", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.StudyDescription, ds.SeriesDescription = "CT chest (patient CD)", "axial"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes((number + i) % 256 for i in range(128))
    return ds


def write_cd(folder: Path, count: int, patient: dict[str, str], dicomdir: bool = True) -> str:
    """`count` instances of one study and series under `folder`, with a DICOMDIR (FileSet
    layout: PT000000/ST000000/...) or as loose files `IM00000`... Returns the study UID."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    datasets = [synthetic_instance(study, series, n + 1, patient) for n in range(count)]
    if not dicomdir:
        for n, ds in enumerate(datasets):
            ds.save_as(folder / f"IM{n:05d}", enforce_file_format=True)
        return study
    fs = FileSet()
    try:
        for ds in datasets:
            fs.add(ds)
        fs.write(folder)
    finally:
        close_fileset(fs)
    return study


__all__ = ["synthetic_instance", "write_cd"]
