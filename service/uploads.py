"""Checking an upload before anything is queued: the image decoded (or the DICOM file through
its display pipeline) with the same functions and the same limits the workers use, so a bad
file is a precise 4xx and never a failed job.

Memory this adds to the API for any accepted upload, with the default limits (50 megapixels,
20 MB uploads): an image decoded in Pillow's own layout (at most 4 bytes a pixel, 200 MB; a
JPEG decoded at 1/8 scale, which still reads every byte) and float strips of one megapixel;
a DICOM file parsed by pydicom (its elements copied once), its pixel data decoded (at most
2 bytes x AEX_MAX_IMAGE_PIXELS, 100 MB) and checked in float strips; a deflated DICOM data set
inflated no further than its header declares. Under 512 MB above idle in every case;
bench/bench_hostile_memory.py measures it on the worst cases.
"""

from __future__ import annotations

from PIL import Image

from jobs.settings import Settings
from models.data.imaging import open_image
from models.dicom.pixels import DicomImage, is_dicom, load_dicom_pixels
from service.multipart import Upload

DICOM_SUFFIXES = (".dcm", ".dicom")

DICOM_MEDIA_TYPE = "application/dicom"

# The API only checks an image: a JPEG is decoded at its smallest DCT scale (1/8).
CHECK_DRAFT_SIDE = 1


def check_image(data: bytes, settings: Settings) -> Image.Image:
    """Decode the upload fully (the same decoder the workers use): UnsupportedMediaError (415),
    DecompressionBombError, ExtremeAspectRatioError, UndecodableImageError or
    NonFinitePixelsError (422) before anything is queued."""
    return open_image(data, settings.max_image_pixels, settings.max_aspect_ratio, draft=CHECK_DRAFT_SIDE)


def is_dicom_upload(upload: Upload) -> bool:
    """A DICOM file: the 'DICM' magic, a .dcm/.dicom name, or the application/dicom type."""
    media = (upload.content_type or "").split(";")[0].strip().lower()
    return (
        is_dicom(upload.data) or (upload.filename or "").lower().endswith(DICOM_SUFFIXES) or media == DICOM_MEDIA_TYPE
    )


def check_dicom(data: bytes, settings: Settings, window: tuple[float, float] | None) -> DicomImage:
    """Parse the DICOM file and run every pixel through its display pipeline (pydicom and
    NumPy; the workers call the same ``load_dicom_pixels`` with the same limits):
    UnsupportedMediaError (415) naming why a file is refused (not DICOM, no pixel data,
    multi-frame, a transfer syntax that cannot be decoded), DecompressionBombError (422) for
    dimensions over AEX_MAX_IMAGE_PIXELS before any pixel is decoded (or a deflated data set
    that inflates past its declared size), ExtremeAspectRatioError, InvalidDicomError and
    NonFinitePixelsError (422), BadParameterError (400) for a window the file's VOI function
    cannot use."""
    return load_dicom_pixels(data, window, settings.max_image_pixels, settings.max_aspect_ratio)
