"""DICOM files for the tests, written here with pydicom: a Secondary Capture of any pixels and photometric interpretation, a DX X-ray as a PACS holds it, and pydicom's bundled test files (never downloaded)."""

from __future__ import annotations

import io
import time
from pathlib import Path

from tests.support.require import missing

# DX "for presentation": what a digital chest X-ray is stored as.
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def write_dicom(pixels, photometric: str, slope=1.0, intercept=0.0, window=None) -> bytes:
    """A single-frame DICOM file (Secondary Capture, explicit VR little endian) of ``pixels``
    (uint16 H x W, stored as 16-bit with 12 bits used) with the given Photometric
    Interpretation, Rescale Slope/Intercept and, when given, Window Center/Width, plus the
    patient and study identifiers a PACS would have."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "PX-001", "Test^Patient", "DX"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "S1", "ACC-1"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 3, 1
    ds.ConversionType, ds.PatientOrientation = "WSD", ["A", "F"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.asarray(pixels).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def xray(pixels, study_uid: str | None = None, modality: str = "DX") -> bytes:
    """A DX (for presentation) Part 10 file of uint16 ``pixels`` (16 bits stored), with the
    patient and study identifiers a PACS would have, in a new series of ``study_uid``."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_PRESENTATION, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PX-PACS", "Test^Pacs", "19700101", "O"
    ds.StudyDate, ds.StudyTime = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "S1", "ACC-PACS", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = modality, 1, 1, "TestVendor"
    ds.PatientOrientation, ds.ImageType = ["A", "F"], ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType, ds.BodyPartExamined = "FOR PRESENTATION", "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def pneumonia_xrays(npz: Path):
    """xrays(n, size=(rows, cols), study_uid=None, start=0) -> [Part 10 bytes]: PneumoniaMNIST
    test images of ``npz`` upsampled to ``size`` and written as 16-bit DX X-rays."""
    import numpy as np
    from PIL import Image

    images = np.load(npz)["test_images"]

    def make(n: int, size=(512, 512), study_uid: str | None = None, start: int = 0) -> list[bytes]:
        out = []
        for img in images[start : start + n]:
            big = Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            out.append(xray(np.asarray(big, dtype=np.uint16) * 257, study_uid))
        return out

    return make


def bundled_dicom(name: str) -> bytes:
    """One of pydicom's bundled test files (never downloaded: there may be no network)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        missing(f"pydicom test file {name} is not bundled with this pydicom")
    return Path(path).read_bytes()
