"""DICOM output: result images as Secondary Capture objects in the source's study.

Each derived image (the Grad-CAM overlay, an explanation) becomes one SC instance in a new
series of the source study, carrying the source's patient and study identifiers, a
Derivation Description naming the model and method, and a Source Image Sequence that
references the source instance, so a PACS viewer shows it beside the original.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from models.dicom.anatomy import copy_anatomy
from models.dicom.dates import dated_by_source
from models.dicom.equipment import MANUFACTURER, Provenance
from models.dicom.sanitize import usable_source
from models.dicom.uids import UidFor
from models.version import __version__

# DCM code for "Secondary capture of derived image" would be vendor-specific; the purpose of
# reference code below is the standard one for a source image of a derived object.
SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 from uint8/float H x W (x 1|3) input; float values are in [0, 1]."""
    arr = image
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


_AXES = (("L", "R"), ("P", "A"), ("H", "F"))


def _direction_label(cosines: Sequence[float]) -> str:
    """PS3.3 C.7.6.1.1.1 direction letters of a unit vector, dominant axis first."""
    parts = sorted(range(3), key=lambda i: -abs(cosines[i]))
    return "".join(_AXES[i][0 if cosines[i] > 0 else 1] for i in parts if abs(cosines[i]) > 0.25)


def _orientation(source: Dataset) -> list[str] | str:
    po = source.get("PatientOrientation")
    if po is not None and len(po) == 2:
        return list(po)
    iop = source.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        return [_direction_label([float(v) for v in iop[:3]]), _direction_label([float(v) for v in iop[3:]])]
    return ""


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_PURPOSE
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


# Attributes of the source's grey-scale display pipeline: an RGB Secondary Capture that keeps
# any of them renders black (or wrongly windowed) in some viewers, so none is ever written.
VOI_AND_RESCALE = (
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
)


def secondary_capture_datasets(
    source: Dataset,
    images: Sequence[tuple[str, np.ndarray]],
    derivation: str,
    series_description: str = "aex explanations",
    *,
    provenance: Provenance | None = None,
    uid: UidFor | None = None,
    annotated: bool = False,
) -> list[tuple[str, hd.sc.SCImage]]:
    """One SC data set per ``(name, image)`` in a new series of ``source``'s study (see
    ``secondary_captures``). provenance: the served model, recorded in the Contributing
    Equipment Sequence and the General Equipment Module (its series description then says
    "not for diagnostic use"); uid(role): the series' and instances' UIDs ("series/sc",
    "instance/sc/<name>"; random UIDs without it); annotated: whether the images carry burned
    in text (``models.render.capture.readable``: Burned In Annotation YES, else NO)."""
    source = usable_source(source).dataset
    uid = uid or (lambda _role: generate_uid())
    if provenance is not None:
        series_description = provenance.series_description("explanations")
    equipment = None if provenance is None else [provenance.contributing_equipment(derivation[:1024])]
    series_uid = uid("series/sc")
    out = []
    for number, (name, image) in enumerate(images, start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # highdicom's warnings quote patient names
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=source,
                pixel_array=_to_uint8_rgb(image),
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=series_uid,
                series_number=int(source.get("SeriesNumber", 0) or 0) + 900,
                sop_instance_uid=uid(f"instance/sc/{name}"),
                instance_number=number,
                manufacturer=MANUFACTURER,
                transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
                # highdicom insists on a value; it is replaced below by what the source says.
                patient_orientation=("L", "P"),
                contributing_equipment=equipment,
            )
        # Derived images keep the source's row/column directions (resize and centre crop
        # only), so its orientation holds; empty (Type 2) when the source does not say.
        sc.PatientOrientation = _orientation(source)
        sc.SeriesDescription = series_description[:64]
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.DerivationDescription = derivation[:1024]
        sc.SourceImageSequence = DicomSequence([_source_reference(source)])
        sc.ImageComments = f"{name}: {derivation}"[:10240]
        sc.SoftwareVersions = f"aex {__version__}"
        dated_by_source(sc, source)  # nothing from the clock: a re-run writes the same bytes
        if provenance is not None:
            provenance.stamp(sc)
        sc.BurnedInAnnotation = "YES" if annotated else "NO"  # aex's captions, never patient data
        copy_anatomy(source, sc, image_laterality=True)  # Laterality only where it applies
        for keyword in VOI_AND_RESCALE:
            if keyword in sc:
                del sc[keyword]
        out.append((name, sc))
    return out


def part10(ds: Dataset) -> bytes:
    """A data set as the bytes of a DICOM Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def secondary_captures(
    source: Dataset,
    images: Sequence[tuple[str, np.ndarray]],
    derivation: str,
    series_description: str = "aex explanations",
    **identity,
) -> list[tuple[str, bytes]]:
    """Build one SC object per ``(name, image)`` in a new series of ``source``'s study: RGB,
    uncompressed, without the source's VOI and rescale attributes (``VOI_AND_RESCALE``).

    images: uint8 or float [0, 1] arrays H x W, H x W x 1 or H x W x 3.
    derivation: free text naming model and method (truncated to the 1024 chars DICOM allows).
    identity: ``provenance`` and ``uid`` (see ``secondary_capture_datasets``).
    Returns ``(name, DICOM Part 10 bytes)`` pairs.
    """
    return [
        (name, part10(sc))
        for name, sc in secondary_capture_datasets(source, images, derivation, series_description, **identity)
    ]
