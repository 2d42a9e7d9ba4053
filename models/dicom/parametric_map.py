"""The Grad-CAM map as a DICOM Parametric Map (highdicom) in the source image's own pixel grid."""

from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.dicom.equipment import Provenance
from models.dicom.uids import UidFor, nominal_frame_of_reference_uid

# PS3.16 CID 217 "Visual Explanation": DCM 130403; values are fractions of the map's maximum,
# so the unit is UCUM "1" ("no units").
QUANTITY = codes.DCM.GradientWeightedClassActivation
UNIT = codes.UCUM.NoUnits
LUT_LABEL = "GRADCAM"  # SH, at most 16 characters
SERIES_OFFSET = 901  # the source's Series Number + this (the SC series uses + 900, the SR + 902)


class _ParametricMap(hd.pm.ParametricMap):
    """highdicom 0.28's Parametric Map, mended for one case: a single-frame map whose source
    has no spatial coordinate system gets a Dimension Index on Frame Label but no Frame Label
    nor index value in its frame, and highdicom then refuses its own object. The frame is
    labelled and indexed (1) before highdicom reads its dimensions back."""

    def _build_luts(self) -> None:
        for item in self.get("PerFrameFunctionalGroupsSequence", []):
            content = item.FrameContentSequence[0]
            if "DimensionIndexValues" in content and not content.DimensionIndexValues:
                content.DimensionIndexValues = [1]
                content.FrameLabel = LUT_LABEL
        super()._build_luts()


_GEOMETRY = {
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
}


def _numbers(ds: Dataset, keyword: str, n: int) -> list[float] | None:
    try:
        values = [float(v) for v in ds.get(keyword) or []]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(np.isfinite(values)) and all(v > 0 for v in values) else None


def geometry_source(source: Dataset) -> Dataset:
    """The source as highdicom should see its geometry. A Parametric Map needs a Frame of
    Reference, plane position, orientation and pixel spacing (PS3.3 A.75); a source with its
    own (CT, MR) is used as it is. A projection image or SC without one gets, in a copy, a
    Frame of Reference of its own (``uids.nominal_frame_of_reference_uid``: one per source
    instance) with the nominal 2D geometry viewers give such an image: position (0, 0, 0),
    orientation rows +x / columns +y, and its Pixel Spacing, else its Imager Pixel Spacing,
    else 1 mm. The map and the source then share Rows x Columns pixel for pixel, as the
    Derivation Image Sequence says (Spatial Locations Preserved YES)."""
    if "FrameOfReferenceUID" in source and "ImagePositionPatient" in source and "ImageOrientationPatient" in source:
        if _numbers(source, "PixelSpacing", 2) is not None:
            return source
    ds = Dataset()  # the source's elements, those set below excepted (the source is left as it is)
    for elem in source:
        if elem.keyword not in _GEOMETRY:
            ds.add(elem)
    ds.FrameOfReferenceUID = nominal_frame_of_reference_uid(source.SOPInstanceUID)
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = _numbers(source, "PixelSpacing", 2) or _numbers(source, "ImagerPixelSpacing", 2) or [1.0, 1.0]
    ds.SliceThickness = 1.0
    return ds


def parametric_map(
    source: Dataset,
    values: np.ndarray,
    provenance: Provenance,
    uid: UidFor,
    description: str,
) -> hd.pm.ParametricMap:
    """The Grad-CAM map of ``source`` as a Parametric Map in a new series of its study.

    values: float H x W in [0, 1] on the source's own grid (Rows x Columns; see
    ``models.data.geometry.map_to_source``), stored as 32-bit floats with a Real World Value
    Mapping (identity, 0 to 1, quantity DCM 130403, unit UCUM "1"). source: a data set whose
    attributes parse (``secondary_capture.usable_source``). uid(role): the object's UIDs
    ("series/pm", "instance/pm"). description: the Content Description (free text, at most
    64 characters kept)."""
    rows, columns = int(source.Rows), int(source.Columns)
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (rows, columns):
        raise ValueError(f"the map is {values.shape[1]} x {values.shape[0]}, the source {columns} x {rows}")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation="Grad-CAM, fraction of the map's maximum",
        unit=UNIT,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=QUANTITY,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's warnings may quote source values
        pm = _ParametricMap(
            source_images=[geometry_source(source)],
            pixel_array=np.clip(values, 0.0, 1.0),
            series_instance_uid=uid("series/pm"),
            series_number=int(source.get("SeriesNumber") or 0) + SERIES_OFFSET,
            sop_instance_uid=uid("instance/pm"),
            instance_number=1,
            manufacturer="aex",
            manufacturer_model_name=provenance.model,
            software_versions=f"aex {provenance.software_version}",
            device_serial_number=provenance.checkpoint_sha256[:64],
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            content_label=LUT_LABEL,
            content_description=description[:64],
            contributing_equipment=[provenance.contributing_equipment("Grad-CAM map of the served model")],
        )
    provenance.stamp(pm)
    pm.SeriesDescription = provenance.series_description("Grad-CAM map")
    # Type 2C: dciodvfy cannot tell whether the body part is paired, so always send it
    # (empty when the source does not say), as the Secondary Captures do.
    pm.Laterality = source.get("Laterality", "")
    return pm
