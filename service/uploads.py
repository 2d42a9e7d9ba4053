"""Reading an upload: the multipart body in memory with a size limit, then the image checked.

FastAPI's own form parsing spools files over 1 MB to a temporary file; an upload here never
touches the disk (the size limit bounds the memory it takes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from models.data.imaging import open_image
from models.dicom.pixels import DicomImage, dicom_to_pixels, is_dicom, read_dicom
from models.errors import BadParameterError, DecompressionBombError, UploadTooLargeError
from worker.settings import Settings

DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_MEDIA_TYPE = "application/dicom"
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the text fields
MAX_TEXT_FIELD_BYTES = 16 * 1024


@dataclass
class Upload:
    data: bytes
    filename: str | None
    fields: dict[str, str | list[str]] = field(default_factory=dict)  # a repeated field is a list
    content_type: str | None = None  # the file part's declared type


def _too_large(limit: int) -> UploadTooLargeError:
    return UploadTooLargeError(f"the upload is over the limit of {limit} bytes (AEX_MAX_UPLOAD_BYTES)")


async def read_upload(request: Request, settings: Settings) -> Upload:
    """The ``image`` file and the text fields of a multipart/form-data request.

    Raises UploadTooLargeError (413) as soon as the body passes the limit, and
    BadParameterError (400) for a body that is not multipart or lacks the image."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise BadParameterError("send multipart/form-data with the image in a file field named 'image'")
    limit = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(settings.max_upload_bytes)

    async def limited():
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _too_large(settings.max_upload_bytes)
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=16, max_part_size=MAX_TEXT_FIELD_BYTES)
    parser.spool_max_size = limit + 1  # keep the file part in memory
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadParameterError(f"malformed multipart body: {exc.message}") from None
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise BadParameterError("the form has no file field named 'image'")
        data = await image.read()
        if len(data) > settings.max_upload_bytes:
            raise _too_large(settings.max_upload_bytes)
        fields: dict[str, str | list[str]] = {}
        for k, v in form.multi_items():
            if not isinstance(v, str):
                continue
            if k not in fields:
                fields[k] = v
            else:
                prev = fields[k]
                fields[k] = [*prev, v] if isinstance(prev, list) else [prev, v]
        return Upload(data=data, filename=image.filename, fields=fields, content_type=image.content_type)
    finally:
        await form.close()


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
