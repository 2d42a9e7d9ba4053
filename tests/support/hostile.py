"""A hostile upload corpus generated here (nothing downloaded): truncations of every format at
many offsets, decompression and PNG text/ICC bombs, forged huge or thin headers, non-finite
float TIFFs, malformed DICOM modules and a deflated DICOM bomb, odd aspect ratios, empty and
one-byte files, and a few odd but legitimate files that must classify.

``corpus()`` yields ``Case(name, data, expect, filename)``; ``expect`` holds the error codes
a correct service may answer with (a JSON 4xx), ``OK`` among them where a finished, finite
result is a correct answer too. Bounded: about 200 files of at most a few hundred KB (the
deflate bomb inflates to 64 MiB, and is refused after its first 8).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

OK = "ok"
TRUNCATED_IMAGE = ("undecodable_image", "unsupported_media_type", OK)
TRUNCATED_DICOM = ("unsupported_media_type", "invalid_dicom")
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: tuple[str, ...]
    filename: str = "upload.png"

    @property
    def media_type(self) -> str:
        return "application/dicom" if self.filename.endswith(".dcm") else "application/octet-stream"


# --- Images -------------------------------------------------------------------------------


def structured(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    """uint8 height x width x 3: gradients and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 0.8
    return ((rgb + rng.random((height, width, 3)) * 0.2) * 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}), **options)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, extra: bytes = b"", idat_rows: int | None = None, depth: int = 1) -> bytes:
    """A grey PNG (bit depth ``depth``) declaring width x height, with ``extra`` chunks before
    its IDAT, which holds ``idat_rows`` rows of zeros (all of them by default)."""
    row = b"\x00" * (1 + (width * depth + 7) // 8)
    comp = zlib.compressobj(9)
    rows = height if idat_rows is None else idat_rows
    idat = b"".join(comp.compress(row) for _ in range(rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 header claims width x height."""
    data = bytearray(encode(Image.fromarray(structured()), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one IFD claims width x height 8-bit grey, one strip of 16 bytes."""
    entries = [
        (256, 4, 1, width),  # ImageWidth LONG
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample SHORT
        (259, 3, 1, 1),  # Compression none
        (262, 3, 1, 1),  # Photometric BlackIsZero
        (273, 4, 1, 8 + 2 + 12 * 8 + 4),  # StripOffsets: after the IFD
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16


def bmp_header_only(width: int, height: int) -> bytes:
    """An 8-bit grey BMP whose header claims width x height, with 256 bytes of pixels."""
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + 256, 0, 0, offset) + info + palette + b"\x00" * 256


def webp_canvas(width: int, height: int) -> bytes:
    """A WebP whose VP8X chunk claims a width x height canvas, with a tiny lossless image."""
    small = encode(Image.fromarray(structured(8, 8)), "WEBP")
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + small[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def float_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32)), "TIFF")


def offsets(n: int) -> list[int]:
    """Where to cut a file of n bytes: the first bytes one by one, headers, and through the body."""
    fixed = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 33, 50, 64, 100, 128, 131, 132, 150, 200, 256, 300]
    return sorted({o for o in fixed + [n // 4, n // 2, 3 * n // 4, n - 64, n - 8, n - 1] if 0 <= o < n})


def image_cases() -> Iterator[Case]:
    rgb = Image.fromarray(structured())
    for fmt in FORMATS:
        data = encode(rgb, fmt)
        ext = fmt.lower()
        yield Case(f"{ext}-whole", data, (OK,), f"x.{ext}")
        for cut in offsets(len(data)):
            expect = ("unsupported_media_type",) if cut == 0 else TRUNCATED_IMAGE
            yield Case(f"{ext}-cut-{cut}", data[:cut], expect, f"x.{ext}")
    # Empty, one byte, magic numbers alone, text, a format not taken.
    yield Case("empty", b"", ("unsupported_media_type",))
    yield Case("one-byte", b"\x89", ("unsupported_media_type",))
    yield Case("png-magic-only", b"\x89PNG\r\n\x1a\n", ("unsupported_media_type", "undecodable_image"))
    yield Case("jpeg-soi-only", b"\xff\xd8\xff", ("unsupported_media_type", "undecodable_image"))
    yield Case("text", b"patient notes, not an image\n" * 8, ("unsupported_media_type",), "notes.png")
    yield Case("gif", encode(rgb, "GIF"), ("unsupported_media_type",), "x.gif")
    # Decompression bombs: declared sizes over the pixel limit, refused from the header.
    yield Case("png-bomb-30000x30000", png_raw(30000, 30000, idat_rows=1), ("decompression_bomb",))
    yield Case("jpeg-claims-65000x65000", jpeg_with_size(65000, 65000), ("decompression_bomb",), "x.jpg")
    yield Case("tiff-claims-100000x100000", tiff_header_only(100000, 100000), ("decompression_bomb",), "x.tif")
    yield Case("bmp-claims-50000x50000", bmp_header_only(50000, 50000), ("decompression_bomb",), "x.bmp")
    yield Case("webp-claims-16384x16384", webp_canvas(16384, 16384), ("decompression_bomb", "undecodable_image"))
    # PNG text and ICC chunks that inflate past Pillow's limits (1 MB a chunk, 64 MB in all).
    text_bomb = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (2 << 20), 9))
    yield Case("png-ztxt-bomb", png_raw(16, 16, text_bomb), ("decompression_bomb",))
    icc_bomb = png_chunk(b"iCCP", b"ICC\x00\x00" + zlib.compress(b"\x00" * (2 << 20), 9))
    yield Case("png-iccp-bomb", png_raw(16, 16, icc_bomb), ("decompression_bomb",))
    many = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * ((1 << 20) - 1024), 9)) * 66
    yield Case("png-ztxt-64mb-in-all", png_raw(16, 16, many), ("decompression_bomb",))
    # Thin and odd shapes: the aspect limit (20) and 1-pixel images.
    yield Case("png-30000x1", png_raw(30000, 1), ("extreme_aspect_ratio",))
    yield Case("png-1x100000", png_raw(1, 100000), ("extreme_aspect_ratio",))
    yield Case("jpeg-claims-60000x1", jpeg_with_size(60000, 1), ("extreme_aspect_ratio",), "x.jpg")
    yield Case("png-21x1", png_raw(21, 1, depth=8), ("extreme_aspect_ratio",))
    yield Case("png-20x1", encode(Image.fromarray(structured(20, 1)), "PNG"), (OK,))
    yield Case("png-1x1", encode(Image.fromarray(structured(1, 1)), "PNG"), (OK,))
    yield Case("png-3x60", encode(Image.fromarray(structured(3, 60)), "PNG"), (OK,))
    yield Case("png-640x33", encode(Image.fromarray(structured(640, 33)), "PNG"), (OK,))
    # Non-finite float TIFFs, and finite ones at the edges of float32.
    grid = np.linspace(0, 1, 24 * 20, dtype=np.float32).reshape(20, 24)
    for label, bad in (("nan", np.nan), ("inf", np.inf), ("minus-inf", -np.inf)):
        values = grid.copy()
        values[3, 4] = bad
        yield Case(f"tiff-float-{label}", float_tiff(values), ("non_finite_pixels",), "x.tif")
    yield Case("tiff-float-all-nan", float_tiff(np.full((8, 8), np.nan)), ("non_finite_pixels",), "x.tif")
    yield Case("tiff-float-huge-range", float_tiff(grid * 3e38 - 1.5e38), (OK,), "x.tif")
    yield Case("tiff-float-constant", float_tiff(np.full((8, 8), 7.0)), (OK,), "x.tif")
    yield Case("tiff-int32", encode(Image.fromarray((grid * 2e9).astype(np.int32)), "TIFF"), (OK,), "x.tif")
    # Odd but legitimate modes.
    yield Case("png-16bit", encode(Image.fromarray((grid * 65535).astype(np.uint16)), "PNG"), (OK,))
    yield Case("png-1bit", encode(Image.fromarray(grid > 0.5), "PNG"), (OK,))
    yield Case("png-la", encode(Image.fromarray(structured()).convert("LA"), "PNG"), (OK,))
    yield Case("jpeg-cmyk", encode(rgb.convert("CMYK"), "JPEG"), (OK,), "x.jpg")
    yield Case("jpeg-progressive", encode(rgb, "JPEG", progressive=True), (OK,), "x.jpg")
    yield Case("tiff-two-pages", encode(rgb, "TIFF", save_all=True, append_images=[rgb]), (OK,), "x.tif")


# --- DICOM --------------------------------------------------------------------------------


def dicom(
    pixels: np.ndarray | None = None,
    photometric: str = "MONOCHROME2",
    syntax: str | None = None,
    pixel_data: bytes | None = None,
    **attributes,
) -> bytes:
    """A single-frame Secondary Capture (explicit VR little endian unless ``syntax``) of
    ``pixels`` (uint16 rows x columns, 12 bits stored; a 32 x 32 gradient by default) with
    patient identifiers, and ``attributes`` set (a None value deletes it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values set on purpose
        return _dicom(pixels, photometric, syntax, pixel_data, attributes)


def _dicom(pixels, photometric, syntax, pixel_data, attributes) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    if pixels is None:
        pixels = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4) % 4096
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "PX-HOSTILE", "Hostile^Patient", "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
    ds.WindowCenter, ds.WindowWidth = 2000.0, 4000.0
    ds.PixelData = pixel_data if pixel_data is not None else pixels.astype(np.uint16).tobytes()
    for key, value in attributes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def set_raw(data: bytes, group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """``data`` with the (explicit VR little endian, short form) element's value replaced by
    raw bytes (padded to an even length): values pydicom would refuse to write."""
    key = struct.pack("<HH", group, element) + vr
    i = data.index(key, 132 + 12)
    old = struct.unpack("<H", data[i + 6 : i + 8])[0]
    value += b" " * (len(value) % 2)
    return data[:i] + key + struct.pack("<H", len(value)) + value + data[i + 8 + old :]


def deflated(pixel_bytes: int, rows: int = 64, cols: int = 64) -> bytes:
    """Deflated explicit VR little endian whose Pixel Data holds ``pixel_bytes`` zeros, declared
    rows x cols 16-bit (a bomb when pixel_bytes is more than rows x cols x 2)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    whole = dicom(np.zeros((rows, cols), np.uint16), pixel_data=b"")
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(whole))
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))]
    chunk = b"\x00" * (1 << 20)
    left = pixel_bytes
    while left:
        parts.append(comp.compress(chunk[: min(left, len(chunk))]))
        left -= min(left, len(chunk))
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta)
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + b"".join(parts) + comp.flush()


def dicom_cases() -> Iterator[Case]:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

    good = dicom()
    yield Case("dicom-whole", good, (OK,), "x.dcm")
    yield Case("dicom-monochrome1", dicom(photometric="MONOCHROME1"), (OK,), "x.dcm")
    yield Case("dicom-implicit-vr", dicom(syntax=ImplicitVRLittleEndian), (OK,), "x.dcm")
    yield Case("dicom-big-endian", dicom(syntax=ExplicitVRBigEndian), (OK,), "x.dcm")
    yield Case("dicom-deflated", deflated(64 * 64 * 2), (OK,), "x.dcm")
    yield Case("dicom-no-window", dicom(WindowCenter=None, WindowWidth=None), (OK,), "x.dcm")
    for cut in offsets(len(good)):
        yield Case(
            f"dicom-cut-{cut}", good[:cut], ("unsupported_media_type",) if cut < 132 else TRUNCATED_DICOM, "x.dcm"
        )
    # Palette colour without (or with garbled) lookup tables.
    yield Case(
        "dicom-palette-no-luts", dicom(photometric="PALETTE COLOR", WindowCenter=None), ("invalid_dicom",), "x.dcm"
    )
    garbled = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")} | {
        f"{c}PaletteColorLookupTableData": b"\x00\x01" * 3 for c in ("Red", "Green", "Blue")
    }
    yield Case("dicom-palette-short-luts", dicom(photometric="PALETTE COLOR", **garbled), ("invalid_dicom",), "x.dcm")
    no_data = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")}
    yield Case("dicom-palette-no-lut-data", dicom(photometric="PALETTE COLOR", **no_data), ("invalid_dicom",), "x.dcm")
    # VOI and Modality LUT sequences without their descriptors, or with a garbled one.
    item = Dataset()
    item.add_new(0x00283006, "US", [0, 100, 200, 300])  # LUTData, its VR given (no descriptor to infer it)
    yield Case(
        "dicom-voi-lut-no-descriptor",
        dicom(WindowCenter=None, WindowWidth=None, VOILUTSequence=Sequence([item])),
        ("invalid_dicom",),
        "x.dcm",
    )
    bad_bits = Dataset()
    bad_bits.add_new(0x00283002, "US", [4, 0, 0])  # LUTDescriptor: 4 entries of 0 bits
    bad_bits.add_new(0x00283006, "US", [0, 1, 2, 3])
    yield Case(
        "dicom-voi-lut-zero-bits",
        dicom(WindowCenter=None, WindowWidth=None, VOILUTSequence=Sequence([bad_bits])),
        ("invalid_dicom",),
        "x.dcm",
    )
    yield Case(
        "dicom-voi-lut-empty-sequence",
        dicom(WindowCenter=None, WindowWidth=None, VOILUTSequence=Sequence([])),
        ("invalid_dicom",),
        "x.dcm",
    )
    modality = Dataset()
    modality.add_new(0x00283006, "US", [0, 1])
    yield Case(
        "dicom-modality-lut-no-descriptor", dicom(ModalityLUTSequence=Sequence([modality])), ("invalid_dicom",), "x.dcm"
    )
    # Window and rescale values that are not numbers, not finite, or that overflow.
    tags = {"WindowCenter": (0x1050, b"DS"), "WindowWidth": (0x1051, b"DS"), "RescaleIntercept": (0x1052, b"DS")}
    tags["RescaleSlope"] = (0x1053, b"DS")
    for keyword, (element, vr) in tags.items():
        yield Case(
            f"dicom-{keyword}-text", set_raw(good, 0x0028, element, vr, b"Doe^John"), ("invalid_dicom",), "x.dcm"
        )
    for keyword in ("WindowCenter", "WindowWidth"):
        element, vr = tags[keyword]
        yield Case(f"dicom-{keyword}-nan", set_raw(good, 0x0028, element, vr, b"NaN"), ("invalid_dicom",), "x.dcm")
        yield Case(f"dicom-{keyword}-inf", set_raw(good, 0x0028, element, vr, b"1e999"), ("invalid_dicom",), "x.dcm")
    yield Case("dicom-WindowWidth-zero", set_raw(good, 0x0028, 0x1051, b"DS", b"0"), ("invalid_dicom",), "x.dcm")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        element, vr = tags[keyword]
        for label, value in (("nan", b"NaN"), ("inf", b"1e999"), ("overflow", b"1e308")):
            if keyword == "RescaleIntercept" and label == "overflow":
                continue
            yield Case(
                f"dicom-{keyword}-{label}", set_raw(good, 0x0028, element, vr, value), ("non_finite_pixels",), "x.dcm"
            )
    yield Case(
        "dicom-rescale-overflow-no-window",
        dicom(RescaleSlope=1e308, WindowCenter=None, WindowWidth=None),
        ("non_finite_pixels",),
        "x.dcm",
    )
    # Geometry that disagrees with the pixel data, or is out of range.
    pixels = good[good.index(b"\xe0\x7f\x10\x00") :]
    body = pixels[12:]
    yield Case("dicom-pixel-data-long", dicom(pixel_data=body + b"\x00" * 64), ("invalid_dicom",), "x.dcm")
    yield Case("dicom-pixel-data-short", dicom(pixel_data=body[:-64]), ("invalid_dicom",), "x.dcm")
    yield Case("dicom-pixel-data-empty", dicom(pixel_data=b""), ("invalid_dicom", "unsupported_media_type"), "x.dcm")
    yield Case("dicom-rows-zero", dicom(Rows=0), ("invalid_dicom",), "x.dcm")
    yield Case("dicom-bits-allocated-7", dicom(BitsAllocated=7), ("invalid_dicom",), "x.dcm")
    yield Case("dicom-bits-stored-40", dicom(BitsStored=40), ("invalid_dicom",), "x.dcm")
    yield Case("dicom-samples-2", dicom(SamplesPerPixel=2), ("invalid_dicom",), "x.dcm")
    yield Case("dicom-photometric-odd", dicom(photometric="Doe^John"), ("invalid_dicom",), "x.dcm")
    yield Case("dicom-rgb-grey-sized-data", dicom(SamplesPerPixel=3, photometric="RGB"), ("invalid_dicom",), "x.dcm")
    yield Case(
        "dicom-frames-text",
        set_raw(dicom(NumberOfFrames=1), 0x0028, 0x0008, b"IS", b"Doe"),
        ("invalid_dicom",),
        "x.dcm",
    )
    two = np.zeros((2, 32, 32), np.uint16).tobytes()
    yield Case("dicom-multi-frame", dicom(NumberOfFrames=2, pixel_data=two), ("unsupported_media_type",), "x.dcm")
    yield Case("dicom-no-pixel-data", dicom(PixelData=None), ("unsupported_media_type",), "x.dcm")
    yield Case("dicom-claims-50000x50000", dicom(Rows=50000, Columns=50000), ("decompression_bomb",), "x.dcm")
    yield Case(
        "dicom-claims-10000x1",
        dicom(Rows=1, Columns=10000, pixel_data=b"\x00" * 20000),
        ("extreme_aspect_ratio",),
        "x.dcm",
    )
    # Deflate: a bomb (64 MiB of pixel data for a 64 x 64 image), a truncated stream, garbage.
    bomb = deflated(64 << 20)
    yield Case("dicom-deflate-bomb", bomb, ("decompression_bomb",), "x.dcm")
    small = deflated(64 * 64 * 2)
    yield Case(
        "dicom-deflate-truncated", small[: len(small) - 40], ("invalid_dicom", "unsupported_media_type"), "x.dcm"
    )
    garbage = small[:400] + bytes(range(256)) * 4
    yield Case("dicom-deflate-garbage", garbage, ("invalid_dicom", "unsupported_media_type"), "x.dcm")
    yield Case("dicom-deflate-claims-20000x20000", deflated(64, 20000, 20000), ("decompression_bomb",), "x.dcm")
    # Encapsulated pixel data that is not what its transfer syntax says.
    from pydicom.encaps import encapsulate

    junk = dicom(syntax=RLELossless, pixel_data=encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"junk" * 8]))
    yield Case("dicom-rle-junk", junk, ("unsupported_media_type", "invalid_dicom"), "x.dcm")
    yield Case("dicom-magic-only", b"\x00" * 128 + b"DICM", ("unsupported_media_type",), "x.dcm")
    yield Case(
        "dicom-named-but-png", encode(Image.fromarray(structured()), "PNG"), ("unsupported_media_type",), "x.dcm"
    )


def corpus() -> Iterator[Case]:
    """Every case: images, then DICOM."""
    yield from image_cases()
    yield from dicom_cases()
