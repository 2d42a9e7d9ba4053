"""Preprocessing into tensors, defined once and shared by the trainer, the CLI and the
workers: an image file or a DICOM file into the model's input (float C x H x W in [0, 1],
checked finite and in range by ``imaging.check_model_input``; normalisation lives inside the
models), and uint8 batches into floats."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from models.data.imaging import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    open_image,
    prepare_array,
    prepare_strips,
)

if TYPE_CHECKING:
    from models.dicom.pixels import DicomImage


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """float32 H x W x C in [0, 1] -> float32 tensor C x H x W in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


def load_image_for_model(
    source: str | os.PathLike | bytes,
    input_size: int,
    in_channels: int,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
) -> torch.Tensor:
    """Decode an image file or bytes into the model's input: float C x H x W in [0, 1] (a
    JPEG decoded at the reduced scale the input size allows, as the workers do)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    img = open_image(data, max_pixels, max_aspect, draft=input_size)
    return image_to_tensor(img, input_size, in_channels)


def image_to_tensor(img: Image.Image, input_size: int, in_channels: int) -> torch.Tensor:
    """A decoded PIL image into the model's input: float C x H x W in [0, 1] (the one path:
    channels matched, shorter side resized, centre-cropped)."""
    return array_to_tensor(prepare_array(img, input_size, in_channels))


def load_dicom_for_model(
    data: bytes,
    input_size: int,
    in_channels: int,
    window: tuple[float, float] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
) -> tuple[torch.Tensor, DicomImage]:
    """A single-frame DICOM file into the model's input (float C x H x W in [0, 1]), through
    the DICOM display pipeline (``models.dicom.pixels``: Modality LUT, VOI window or the
    ``window`` = (center, width) override, MONOCHROME1 inversion) and then the same
    block-averaging, channel matching and resize/centre-crop as any other image
    (``prepare_strips``: only the region the model sees is computed in float). Also returns
    the parsed DicomImage."""
    from models.dicom.pixels import load_dicom_pixels  # pydicom only when DICOM comes in

    dicom = load_dicom_pixels(data, window, max_pixels, max_aspect)
    width, height = dicom.size
    return array_to_tensor(prepare_strips(width, height, dicom.strips, input_size, in_channels)), dicom


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch in [0, 255] -> float32 in [0, 1]; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()
