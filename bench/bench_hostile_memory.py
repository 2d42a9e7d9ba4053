"""Benchmark: peak memory that hostile uploads cost the API's admission check and a worker.

Run: ``.venv/bin/python bench/bench_hostile_memory.py [--only NAME ...] [--keep DIR]``.

It writes the worst cases for memory (small files that decode large) and, for each, runs two
fresh processes: (a) the API's admission check (``service.uploads.check_image`` /
``check_dicom`` with default Settings) and (b) the worker's ``worker.compute.load_input``
plus one classify forward pass of a bundled checkpoint (``cifar10-robust``, loaded with
``worker.served.ServedModel.load``). Each process first imports everything, loads the model
and runs the same code once on a tiny file of the same format (so lazy imports are paid
before measuring, as in a process that has served one request), then resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``) and reports VmHWM - VmRSS: the peak it added above
idle. The table ends with the budget the service states: 512 MB above idle for either.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUDGET_MB = 512
MODEL = REPO / "models" / "checkpoints" / "cifar10-robust" / "model.safetensors"


# --- The cases ---------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_zeros(width: int, height: int, colour_type: int = 0, bit_depth: int = 8) -> bytes:
    """A valid PNG of zeros, written row by row (never the whole image in memory)."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    row = b"\x00" * (1 + (width * channels * bit_depth + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_zeros(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def webp_zeros(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def tiff_float_zeros(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("F", (width, height)).save(buf, format="TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def _dicom_dataset(rows: int, cols: int, bits: int = 16):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BENCH", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
    return ds


def dicom_native(rows: int, cols: int) -> bytes:
    """Explicit VR little endian, 16-bit, a gradient (not zeros: nothing compresses)."""
    import numpy as np

    ds = _dicom_dataset(rows, cols)
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint32) % 4096).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_deflated(rows: int, cols: int, pixel_bytes: int) -> bytes:
    """Deflated explicit VR little endian whose Pixel Data holds ``pixel_bytes`` zeros (a bomb
    when that is more than rows x cols x 2), deflated piece by piece."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dicom_dataset(rows, cols)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    header = body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\x00" * (1 << 20)
    parts = [comp.compress(header)]
    left = pixel_bytes
    while left:
        parts.append(comp.compress(chunk[: min(left, len(chunk))]))
        left -= min(left, len(chunk))
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta)
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + b"".join(parts) + comp.flush()


def dicom_rle_zeros(rows: int, cols: int) -> bytes:
    """RLE Lossless, 16-bit zeros: two PackBits segments of 128-byte runs (a few MB that decode
    to rows x cols x 2 bytes)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    plane = rows * cols
    runs, rest = divmod(plane, 128)
    segment = b"\x81\x00" * runs + (bytes([(257 - rest) & 0xFF, 0]) if rest > 1 else b"\x00\x00" * rest)
    segment += b"\x00" * (len(segment) % 2)
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds = _dicom_dataset(rows, cols)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


CASES = {
    # name: (what, maker, input format)
    "png-50mp-grey": ("7071x7071 grey PNG of zeros (the pixel limit)", lambda: png_zeros(7071, 7071), "image"),
    "png-50mp-rgba": ("7071x7071 RGBA PNG of zeros (4 bytes a pixel)", lambda: png_zeros(7071, 7071, 6), "image"),
    "tiff-50mp-float": ("7071x7071 float TIFF of zeros", lambda: tiff_float_zeros(7071, 7071), "image"),
    "jpeg-7000": ("7000x7000 RGB JPEG of zeros", lambda: jpeg_zeros(7000, 7000), "image"),
    "webp-3535": ("3535x3535 WebP of zeros (the WebP limit: a quarter)", lambda: webp_zeros(3535, 3535), "image"),
    "webp-7071": ("7071x7071 WebP of zeros (refused: over the WebP limit)", lambda: webp_zeros(7071, 7071), "image"),
    "png-30000x1": ("30000x1 PNG (refused: aspect ratio)", lambda: png_zeros(30000, 1), "image"),
    "png-30000x1500": ("30000x1500 PNG at the aspect limit (20)", lambda: png_zeros(30000, 1500), "image"),
    "dicom-deflate-bomb": (
        "deflated DICOM, 512x512 declared, 256 MiB of Pixel Data",
        lambda: dicom_deflated(512, 512, 256 << 20),
        "dicom",
    ),
    "dicom-deflate-5000": (
        "deflated DICOM 5000x5000 16-bit zeros",
        lambda: dicom_deflated(5000, 5000, 5000 * 5000 * 2),
        "dicom",
    ),
    "dicom-4096-16bit": ("4096x4096 16-bit DICOM, native (33 MB)", lambda: dicom_native(4096, 4096), "dicom"),
    "dicom-rle-50mp": ("7071x7071 16-bit RLE DICOM of zeros", lambda: dicom_rle_zeros(7071, 7071), "dicom"),
}

WARMUPS = {
    "image": lambda name: {
        "jpeg": jpeg_zeros(64, 64),
        "webp": webp_zeros(64, 64),
        "tiff": tiff_float_zeros(64, 64),
    }.get(name.split("-")[0], png_zeros(64, 64, 6)),
    "dicom": lambda name: dicom_deflated(64, 64, 64 * 64 * 2) if "deflate" in name else dicom_native(64, 64),
}


# --- One measurement, in a fresh process ---------------------------------------------------


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(side: str, path: Path, fmt: str, name: str) -> dict:
    import gc

    from jobs.settings import Settings
    from models.errors import AexError

    settings = Settings(redis_url="unix:///unused.sock", bundled_models=False)
    if side == "api":
        from service.uploads import check_dicom, check_image

        def run(data: bytes) -> None:
            (check_dicom(data, settings, None) if fmt == "dicom" else check_image(data, settings))

    else:
        import torch

        from worker.compute import load_input
        from worker.served import ServedModel

        torch.set_num_threads(1)
        served = ServedModel.load("cifar10-robust", MODEL, torch.device("cpu"))
        limits = (settings.max_image_pixels, settings.max_aspect_ratio)

        def run(data: bytes) -> None:
            x, *_ = load_input(data, fmt, served, None, limits)
            with torch.no_grad():
                served.model(x.unsqueeze(0)).softmax(1)

    run(WARMUPS[fmt](name))
    data = path.read_bytes()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    idle = _status("VmRSS")
    t = time.perf_counter()
    try:
        run(data)
        outcome = "accepted"
    except AexError as exc:
        outcome = exc.code
    seconds = time.perf_counter() - t
    return {"peak_mb": (_status("VmHWM") - idle) / 1e6, "idle_mb": idle / 1e6, "outcome": outcome, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="case names")
    parser.add_argument("--keep", type=Path, help="write the cases to this folder and keep them")
    parser.add_argument("--one", nargs=4, metavar=("SIDE", "PATH", "FORMAT", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        side, path, fmt, name = args.one
        print(json.dumps(measure(side, Path(path), fmt, name)))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="aex-hostile-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (what, make, fmt) in CASES.items():
        if args.only and name not in args.only:
            continue
        path = folder / name
        if not path.exists():
            path.write_bytes(make())
        row = {"name": name, "what": what, "bytes": path.stat().st_size}
        for side in ("api", "worker"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", side, str(path), fmt, name],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if out.returncode != 0:
                row[side] = {"peak_mb": float("nan"), "outcome": "crashed: " + out.stderr.strip().splitlines()[-1]}
            else:
                row[side] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{name:20s} {row['bytes'] / 1e6:8.2f} MB  api {row['api']['peak_mb']:7.1f} MB "
            f"({row['api']['outcome']})  worker {row['worker']['peak_mb']:7.1f} MB ({row['worker']['outcome']})",
            flush=True,
        )
    print()
    print("| case | upload | API peak above idle | API answer | worker peak above idle | worker answer | budget |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        a, w = row["api"], row["worker"]
        print(
            f"| {row['name']}: {row['what']} | {row['bytes'] / 1e6:.2f} MB | {a['peak_mb']:.1f} MB | {a['outcome']} | "
            f"{w['peak_mb']:.1f} MB | {w['outcome']} | {BUDGET_MB} MB |"
        )
    worst = max(max(r["api"]["peak_mb"], r["worker"]["peak_mb"]) for r in rows) if rows else 0.0
    print(
        f"\nworst peak above idle: {worst:.1f} MB (budget {BUDGET_MB} MB): {'within' if worst <= BUDGET_MB else 'OVER'}"
    )
    if not args.keep:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
