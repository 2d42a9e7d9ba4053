"""Checking an upload before anything is queued: the image decoded (or the DICOM file through
its display pipeline) with the same functions the workers use, so a bad file is a precise 4xx
and never a failed job."""

from __future__ import annotations

from PIL import Image

from models.data.imaging import open_image
from models.dicom.pixels import DicomImage, dicom_to_pixels, is_dicom, read_dicom
from models.errors import DecompressionBombError
from service.multipart import Upload
from worker.settings import Settings

DICOM_SUFFIXES = (".dcm", ".dicom")

DICOM_MEDIA_TYPE = "application/dicom"


def check_image(data: bytes, settings: Settings) -> Image.Image:
    """Decode the upload fully (the same decoder the workers use): UnsupportedMediaError (415),
    DecompressionBombError or UndecodableImageError (422) before anything is queued."""
    return open_image(data, max_pixels=settings.max_image_pixels)


def is_dicom_upload(upload: Upload) -> bool:
    """A DICOM file: the 'DICM' magic, a .dcm/.dicom name, or the application/dicom type."""
    media = (upload.content_type or "").split(";")[0].strip().lower()
    return (
        is_dicom(upload.data) or (upload.filename or "").lower().endswith(DICOM_SUFFIXES) or media == DICOM_MEDIA_TYPE
    )


def check_dicom(data: bytes, settings: Settings, window: tuple[float, float] | None) -> DicomImage:
    """Parse the DICOM file and run its pixels through the display pipeline (pydicom and
    NumPy; the workers do the same): UnsupportedMediaError (415) naming why a file is refused
    (not DICOM, no pixel data, multi-frame, a transfer syntax that cannot be decoded),
    DecompressionBombError (422) for dimensions over AEX_MAX_IMAGE_PIXELS before any pixel is
    decoded, BadParameterError (400) for a window the file's VOI function cannot use."""
    ds = read_dicom(data)
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        rows = cols = frames = 0
    if rows * cols * max(1, frames) > settings.max_image_pixels:
        raise DecompressionBombError(
            f"DICOM image is {cols}x{rows} x {frames} frame(s), over the limit of "
            f"{settings.max_image_pixels} pixels (AEX_MAX_IMAGE_PIXELS)"
        )
    return dicom_to_pixels(ds, window)
