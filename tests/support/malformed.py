"""DICOM sources whose patient, study and equipment attributes are malformed, written byte by
byte (pydicom refuses to write many of these values), with a PHI canary in each value that
can hold one: the tests look for the canary wherever patient data must never go."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword

CANARY = "QQPHICANARY"  # in every malformed value with room for it; never in a message, log or JSON
BINARY_VRS = {"AT", "FD", "FL", "OB", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV", "UL", "UN", "US", "UV"}
LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}

# (case id, [(keyword, raw value bytes, VR written or None for the dictionary's)], how the
# outputs carry each keyword: "emptied", "left out" or "replaced").
CASES: list[tuple[str, list[tuple[str, bytes, str | None]], dict[str, str]]] = [
    ("sex-X", [("PatientSex", b"X", None)], {"PatientSex": "emptied"}),
    ("sex-MALE", [("PatientSex", b"MALE", None)], {"PatientSex": "emptied"}),
    ("sex-lower", [("PatientSex", b"m", None)], {"PatientSex": "emptied"}),
    ("sex-non-ascii", [("PatientSex", "\u00d6".encode("latin-1"), None)], {"PatientSex": "emptied"}),
    ("sex-two-values", [("PatientSex", b"M\\F", None)], {"PatientSex": "emptied"}),
    ("sex-wrong-vr", [("PatientSex", b"M", "LO")], {"PatientSex": "emptied"}),
    ("birth-date-iso", [("PatientBirthDate", b"1990-13-45", None)], {"PatientBirthDate": "emptied"}),
    ("birth-date-word", [("PatientBirthDate", CANARY.encode()[:8], None)], {"PatientBirthDate": "emptied"}),
    ("birth-date-feb-30", [("PatientBirthDate", b"19900230", None)], {"PatientBirthDate": "emptied"}),
    ("birth-date-yesterday", [("PatientBirthDate", b"yesterday", None)], {"PatientBirthDate": "emptied"}),
    ("age-no-unit", [("PatientAge", b"45", None)], {"PatientAge": "left out"}),
    ("age-bad-unit", [("PatientAge", b"045Q", None)], {"PatientAge": "left out"}),
    ("study-date", [("StudyDate", b"2024-01-01", None)], {"StudyDate": "emptied"}),
    ("study-time-word", [("StudyTime", b"noon", None)], {"StudyTime": "emptied"}),
    ("study-time-25h", [("StudyTime", b"251500", None)], {"StudyTime": "emptied"}),
    ("accession-too-long", [("AccessionNumber", (CANARY + "A" * 30).encode(), None)], {"AccessionNumber": "emptied"}),
    ("study-id-too-long", [("StudyID", (CANARY + "S" * 19).encode(), None)], {"StudyID": "emptied"}),
    (
        "referring-six-components",
        [("ReferringPhysicianName", f"{CANARY}^b^c^d^e^f".encode(), None)],
        {"ReferringPhysicianName": "emptied"},
    ),
    (
        "referring-four-groups",
        [("ReferringPhysicianName", f"{CANARY}=b=c=d".encode(), None)],
        {"ReferringPhysicianName": "emptied"},
    ),
    ("name-too-long", [("PatientName", (CANARY * 7).encode(), None)], {"PatientName": "emptied"}),
    ("name-control-char", [("PatientName", f"{CANARY}\x07^X".encode(), None)], {"PatientName": "emptied"}),
    (
        "name-non-ascii-undeclared",
        [("PatientName", f"{CANARY}^J\u00f6rg".encode("latin-1"), None)],
        {"PatientName": "emptied"},
    ),
    ("patient-id-too-long", [("PatientID", (CANARY * 7).encode(), None)], {"PatientID": "emptied"}),
    ("manufacturer-too-long", [("Manufacturer", (CANARY * 7).encode(), None)], {"Manufacturer": "emptied"}),
    ("institution-too-long", [("InstitutionName", (CANARY * 7).encode(), None)], {"InstitutionName": "left out"}),
    ("station-too-long", [("StationName", (CANARY + "X" * 10).encode(), None)], {"StationName": "left out"}),
    ("weight-word", [("PatientWeight", b"heavy", None)], {"PatientWeight": "left out"}),
    ("size-two-dots", [("PatientSize", b"1.2.3", None)], {"PatientSize": "left out"}),
    ("pregnancy-odd-length", [("PregnancyStatus", b"\x01\x00\x02", None)], {"PregnancyStatus": "left out"}),
    ("pregnancy-not-enumerated", [("PregnancyStatus", b"\x09\x00", None)], {"PregnancyStatus": "left out"}),
    ("comments-control-char", [("PatientComments", f"{CANARY}\x01".encode(), None)], {"PatientComments": "left out"}),
    ("series-number-word", [("SeriesNumber", b"x1", None)], {"SeriesNumber": "left out"}),
    ("laterality-B", [("Laterality", b"B", None)], {"Laterality": "left out"}),
    ("orientation-word", [("PatientOrientation", b"UP\\DOWN", None)], {"PatientOrientation": "emptied"}),
    ("identity-removed-maybe", [("PatientIdentityRemoved", b"MAYBE", None)], {"PatientIdentityRemoved": "left out"}),
    ("study-uid-letters", [("StudyInstanceUID", b"1.2.abc", None)], {"StudyInstanceUID": "replaced"}),
    ("study-uid-leading-zero", [("StudyInstanceUID", b"1.2.840.0113.5", None)], {"StudyInstanceUID": "replaced"}),
    ("study-uid-too-long", [("StudyInstanceUID", b"1." + b"2" * 70, None)], {"StudyInstanceUID": "replaced"}),
    ("series-uid-letters", [("SeriesInstanceUID", b"1.2.abc", None)], {"SeriesInstanceUID": "replaced"}),
    ("instance-uid-empty", [("SOPInstanceUID", b"", None)], {"SOPInstanceUID": "replaced"}),
    ("class-uid-letters", [("SOPClassUID", b"1.2.abc", None)], {"SOPClassUID": "from file meta"}),
    (
        "charset-unknown",
        [("SpecificCharacterSet", b"ISO_IR 999", None), ("PatientName", f"{CANARY}^J\u00f6rg".encode("latin-1"), None)],
        {"SpecificCharacterSet": "left out", "PatientName": "emptied"},
    ),
]
# Every malformed attribute of CASES at once (the last value of a keyword wins).
EVERYTHING = {keyword: (raw, vr) for _id, elements, _expected in CASES for keyword, raw, vr in elements}


def with_element(data: bytes, keyword: str, raw: bytes, vr: str | None = None) -> bytes:
    """``data`` (explicit VR little endian Part 10) with the top-level element ``keyword`` set
    to the raw bytes ``raw`` (padded to an even length) written as ``vr`` (the dictionary's by
    default): replaced where it is, else inserted in tag order."""
    tag = tag_for_keyword(keyword)
    vr = vr or dictionary_VR(tag).split(" or ")[0]
    if vr not in BINARY_VRS:  # text is padded to an even length; a binary value is written as given
        raw += (b"\0" if vr == "UI" else b" ") * (len(raw) % 2)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    element = head + (b"\0\0" + struct.pack("<I", len(raw)) if vr in LONG_LENGTH_VRS else struct.pack("<H", len(raw)))
    element += raw
    (meta_length,) = struct.unpack("<I", data[140:144])
    pos = 144 + meta_length
    while pos < len(data):
        group, elem = struct.unpack("<HH", data[pos : pos + 4])
        here = (group << 16) | elem
        this_vr = data[pos + 4 : pos + 6].decode()
        if this_vr in LONG_LENGTH_VRS:
            (length,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            end = pos + 12 + length
        else:
            (length,) = struct.unpack("<H", data[pos + 6 : pos + 8])
            end = pos + 8 + length
        if here == tag:
            return data[:pos] + element + data[end:]
        if here > tag:
            break
        pos = end
    return data[:pos] + element + data[pos:]


def malformed(base: bytes, elements: list[tuple[str, bytes, str | None]]) -> bytes:
    """``base`` with each (keyword, raw, vr) of ``elements`` written into it."""
    for keyword, raw, vr in elements:
        base = with_element(base, keyword, raw, vr)
    return base


def source_file(rows: int = 64, columns: int = 80, seed: int = 0) -> bytes:
    """A valid DX (for presentation) Part 10 file, 16-bit, with the patient, study and equipment
    attributes a modality writes (each later made malformed by ``malformed``)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dx = "1.2.840.10008.5.1.4.1.1.1.1"
    rng = np.random.default_rng(seed)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dx, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = dx, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PX-MAL", "Mal^Formed", "19700101", "F"
    ds.PatientAge, ds.PatientWeight, ds.PatientSize = "054Y", "70", "1.7"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "S1", "ACC-MAL"
    ds.ReferringPhysicianName, ds.Manufacturer, ds.InstitutionName = "Ref^Doc", "TestVendor", "Test Hospital"
    ds.StationName = "ST1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 4, 1
    ds.PatientOrientation, ds.ImageType, ds.Laterality = ["A", "F"], ["ORIGINAL", "PRIMARY"], "L"
    ds.PresentationIntentType, ds.BodyPartExamined = "FOR PRESENTATION", "CHEST"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
