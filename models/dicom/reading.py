"""Reading a DICOM upload into a pydicom Dataset in memory bounded by what its image needs.

One path for the API's admission check and the worker: the Part 10 header, then the data set
(a deflated one inflated here under a cap checked while inflating, never by pydicom in one
go), then the Image Pixel module checked before any pixel is decoded: one single frame,
geometry within the limits, Pixel Data exactly as long as Rows x Columns x Samples per Pixel
x Bits Allocated say. Every attribute is read through ``attribute``: whatever pydicom raises
becomes InvalidDicomError naming the attribute's keyword, never its value (no patient data in
messages); pydicom's own warnings, which quote values, are silenced while reading.

Memory: the upload, plus pydicom's copy of its elements; for a deflated data set, the first
HEADER_ALLOWANCE bytes inflated, and then no more than its declared pixel data plus
HEADER_ALLOWANCE + TRAILER_ALLOWANCE (twice, while pydicom parses it). The decoded pixel data
may not exceed MAX_BYTES_PER_PIXEL x the pixel limit (100 MB at the default 50 megapixels).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from models.errors import (
    AexError,
    DecompressionBombError,
    ExtremeAspectRatioError,
    InvalidDicomError,
    UnsupportedMediaError,
)

MIB = 1024 * 1024
HEADER_ALLOWANCE = 8 * MIB  # inflated bytes before the Pixel Data element (overlays, ICC, private)
TRAILER_ALLOWANCE = 64 * 1024  # inflated bytes after it (padding)
MAX_BYTES_PER_PIXEL = 2  # decoded pixel data: at most 2 bytes x the pixel limit (16-bit grey)
INPUT_CHUNK = 64 * 1024
PIXEL_KEYWORDS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
GREY = ("MONOCHROME1", "MONOCHROME2")
PHOTOMETRIC = GREY + ("PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")

T = TypeVar("T")

# pydicom logs what it warns about, and its warnings quote element values (a patient's name
# that is not valid PN, say): none of that may reach the service's logs.
logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (the 'DICM' magic after the 128-byte preamble)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def attribute(ds: Dataset, keyword: str, kind: Callable[[Any], T], default: T | None = None, what: str = "") -> T:
    """``kind(ds.<keyword>)``, or ``default`` when it is absent or empty; any failure to read
    or convert it is InvalidDicomError naming ``keyword`` (and ``what`` it should be)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote the value
            if keyword not in ds:
                return default
            value = ds[keyword].value
        if value is None or value == "" or (isinstance(value, (list, pydicom.multival.MultiValue)) and not value):
            return default
        return kind(value)
    except AexError:
        raise
    except Exception:
        raise InvalidDicomError(f"DICOM attribute {keyword} cannot be read{' as ' + what if what else ''}") from None


def first_number(value) -> float:
    """The first value of a (possibly multi-valued) numeric attribute, as float."""
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)


def whole(value) -> int:
    """A single integer value (a multi-valued one is an error)."""
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        raise ValueError("multi-valued")
    return int(value)


@dataclass(frozen=True)
class Geometry:
    """The Image Pixel module, checked: what the pixel data must hold."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    photometric: str
    keyword: str  # PixelData, FloatPixelData or DoubleFloatPixelData

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded pixel array (1-bit pixels unpack to one byte each)."""
        return self.rows * self.columns * self.samples * max(1, self.bits_allocated // 8)

    @property
    def stored_bytes(self) -> int:
        """Bytes the native (not encapsulated) pixel data element must hold, before padding."""
        n = self.rows * self.columns * self.samples
        if self.bits_allocated == 1:
            return (n + 7) // 8
        n *= self.bits_allocated // 8
        return n // 3 * 2 if self.photometric == "YBR_FULL_422" else n


def _pixel_keyword(ds: Dataset) -> str | None:
    return next((k for k in PIXEL_KEYWORDS.values() if k in ds), None)


def image_geometry(
    ds: Dataset, max_pixels: int | None, max_aspect: float | None, keyword: str | None = None
) -> Geometry:
    """Check the Image Pixel module before any pixel is decoded: UnsupportedMediaError (415)
    without pixel data or with more than one frame, InvalidDicomError for an attribute that is
    missing or out of range, DecompressionBombError / ExtremeAspectRatioError over the limits.
    ``keyword``: the pixel data element, when ``ds`` was read up to it only."""
    keyword = keyword or _pixel_keyword(ds)
    if keyword is None:
        sop = attribute(ds, "SOPClassUID", lambda v: pydicom.uid.UID(str(v)).name, "unknown SOP class")
        raise UnsupportedMediaError(f"DICOM object has no pixel data ({sop}); send an image object")
    frames = attribute(ds, "NumberOfFrames", whole, 1, "an integer")
    if frames > 1:
        raise UnsupportedMediaError(f"multi-frame DICOM ({frames} frames) is not supported; send one frame")
    if frames < 1:
        raise InvalidDicomError("DICOM attribute NumberOfFrames must be at least 1")
    rows = attribute(ds, "Rows", whole, None, "an integer")
    columns = attribute(ds, "Columns", whole, None, "an integer")
    for name, value in (("Rows", rows), ("Columns", columns)):
        if value is None or value < 1:
            raise InvalidDicomError(f"DICOM attribute {name} is missing or not a positive integer")
    samples = attribute(ds, "SamplesPerPixel", whole, 1, "an integer")
    if samples not in (1, 3):
        raise InvalidDicomError("DICOM attribute SamplesPerPixel must be 1 or 3")
    default_bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword)
    bits = attribute(ds, "BitsAllocated", whole, default_bits, "an integer")
    if bits is None or bits not in (1, 8, 16, 32, 64) or (default_bits is not None and bits != default_bits):
        raise InvalidDicomError(
            "DICOM attribute BitsAllocated is missing or not one of 1, 8, 16, 32, 64 (as its pixel data needs)"
        )
    stored = attribute(ds, "BitsStored", whole, bits, "an integer")
    if not 1 <= stored <= bits:
        raise InvalidDicomError("DICOM attribute BitsStored must be between 1 and BitsAllocated")
    if attribute(ds, "PixelRepresentation", whole, 0, "an integer") not in (0, 1):
        raise InvalidDicomError("DICOM attribute PixelRepresentation must be 0 or 1")
    photometric = attribute(ds, "PhotometricInterpretation", lambda v: str(v).strip().upper(), "MONOCHROME2")
    if photometric not in PHOTOMETRIC:
        raise InvalidDicomError(f"DICOM attribute PhotometricInterpretation is not one of {', '.join(PHOTOMETRIC)}")
    if (samples == 3) != (photometric not in GREY + ("PALETTE COLOR",)):
        raise InvalidDicomError("DICOM attributes SamplesPerPixel and PhotometricInterpretation disagree")
    if samples == 3 and attribute(ds, "PlanarConfiguration", whole, 0, "an integer") not in (0, 1):
        raise InvalidDicomError("DICOM attribute PlanarConfiguration must be 0 or 1")
    what = f"DICOM image ({columns}x{rows}, Columns x Rows)"
    _check_limits(columns, rows, max_pixels, max_aspect, what)
    geometry = Geometry(rows, columns, samples, bits, photometric, keyword)
    if max_pixels is not None and geometry.decoded_bytes > MAX_BYTES_PER_PIXEL * max_pixels:
        raise DecompressionBombError(
            f"the DICOM pixel data would be {geometry.decoded_bytes} bytes decoded, over the limit of "
            f"{MAX_BYTES_PER_PIXEL * max_pixels} ({MAX_BYTES_PER_PIXEL} bytes x AEX_MAX_IMAGE_PIXELS)"
        )
    return geometry


def _check_limits(width: int, height: int, max_pixels: int | None, max_aspect: float | None, what: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise DecompressionBombError(
            f"{what} is {width * height} pixels, over the limit of {max_pixels} (AEX_MAX_IMAGE_PIXELS)"
        )
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise ExtremeAspectRatioError(
            f"{what}: its longer side is over {max_aspect:g} times its shorter side (AEX_MAX_ASPECT_RATIO)"
        )


def transfer_syntax(ds: Dataset) -> pydicom.uid.UID | None:
    """The file's Transfer Syntax UID (None without file meta)."""
    return _syntax_of(getattr(ds, "file_meta", None))


def _syntax_of(meta: Dataset | None) -> pydicom.uid.UID | None:
    return None if meta is None else attribute(meta, "TransferSyntaxUID", lambda v: pydicom.uid.UID(str(v)))


def check_pixel_length(ds: Dataset, geometry: Geometry) -> None:
    """InvalidDicomError when native pixel data is longer or shorter than the geometry says
    (one byte of padding to an even length allowed); encapsulated data is checked by its decoder."""
    ts = transfer_syntax(ds)
    try:
        encapsulated = ts is not None and ts.is_transfer_syntax and ts.is_encapsulated
    except Exception:
        encapsulated = False
    if encapsulated:
        return
    n = attribute(ds, geometry.keyword, len, 0)
    expected = geometry.stored_bytes
    if n not in (expected, expected + expected % 2):
        raise InvalidDicomError(
            f"DICOM attribute {geometry.keyword} holds {n} bytes, but Rows x Columns x SamplesPerPixel x "
            f"BitsAllocated need {expected}"
        )


class _Inflater:
    """A raw deflate stream read in bounded pieces (``read(n)`` returns at most n bytes)."""

    def __init__(self, body: memoryview):
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._body, self._pos, self.exhausted = body, 0, False

    @property
    def finished(self) -> bool:
        return self._z.eof or self.exhausted

    @property
    def truncated(self) -> bool:
        return self.exhausted and not self._z.eof

    def read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n and not self.finished:
            src = self._z.unconsumed_tail
            if not src:
                src = bytes(self._body[self._pos : self._pos + INPUT_CHUNK])
                self._pos += len(src)
            try:
                piece = self._z.decompress(src, n - got)
            except zlib.error:
                raise InvalidDicomError("the deflated DICOM data set cannot be inflated (corrupt data)") from None
            if not piece and not src:
                self.exhausted = True
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)


def _header_of(head: bytes) -> tuple[Dataset, str] | None:
    """(the elements before the pixel data in ``head`` (explicit VR little endian), the pixel
    data's keyword), or None when ``head`` ends before the pixel data."""
    reached = []

    def stop(tag, _vr, _length) -> bool:
        if tag in PIXEL_KEYWORDS:
            reached.append(tag)
            return True
        return False

    ds = read_dataset(io.BytesIO(head), is_implicit_VR=False, is_little_endian=True, stop_when=stop)
    return (ds, PIXEL_KEYWORDS[reached[0]]) if reached else None


def _read_deflated(data: bytes, start: int, preamble, meta, max_pixels: int | None, max_aspect) -> FileDataset:
    inflater = _Inflater(memoryview(data)[start:])
    head = inflater.read(HEADER_ALLOWANCE)
    cap = HEADER_ALLOWANCE
    if not inflater.finished:
        header = _header_of(head)
        if header is None:
            raise DecompressionBombError(
                f"the deflated DICOM data set holds more than {HEADER_ALLOWANCE} bytes before its pixel data"
            )
        geometry = image_geometry(header[0], max_pixels, max_aspect, header[1])
        cap = HEADER_ALLOWANCE + geometry.stored_bytes + TRAILER_ALLOWANCE
    buf = io.BytesIO()
    buf.write(head)
    del head
    while not inflater.finished:
        buf.write(inflater.read(min(MIB, cap + 1 - buf.tell())))
        if buf.tell() > cap:
            raise DecompressionBombError(
                f"the deflated DICOM data set inflates past {cap} bytes, more than its Rows x Columns x "
                "SamplesPerPixel x BitsAllocated need (decompression bomb?)"
            )
    if inflater.truncated:
        raise InvalidDicomError("the deflated DICOM data set is truncated")
    buf.seek(0)
    dataset = read_dataset(buf, is_implicit_VR=False, is_little_endian=True)
    del buf
    ds = FileDataset("", dataset, preamble, meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)  # as pydicom's own reader does
    return ds


def read_dicom(data: bytes, max_pixels: int | None = None, max_aspect: float | None = None) -> Dataset:
    """Parse a DICOM Part 10 file and check its Image Pixel module (``image_geometry``,
    ``check_pixel_length``) before any pixel is decoded. UnsupportedMediaError (415) for a
    file that is not readable DICOM; see ``image_geometry`` for the rest."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote element values
        fp = io.BytesIO(data)
        try:
            preamble = read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            ts = _syntax_of(meta)
        except AexError:
            raise
        except Exception:
            raise UnsupportedMediaError("not a readable DICOM file (no valid Part 10 header)") from None
        try:
            if ts == DeflatedExplicitVRLittleEndian:
                ds = _read_deflated(data, fp.tell(), preamble, meta, max_pixels, max_aspect)
            else:
                ds = pydicom.dcmread(io.BytesIO(data))
        except AexError:
            raise
        except Exception:
            raise UnsupportedMediaError("not a readable DICOM file (its data set cannot be parsed)") from None
        for tag in list(ds.keys()):  # convert every element now, while pydicom's warnings are silenced;
            with contextlib.suppress(Exception):  # one that fails is refused only if the pipeline needs it
                ds[tag]
        check_pixel_length(ds, image_geometry(ds, max_pixels, max_aspect))
    return ds
