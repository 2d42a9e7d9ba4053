"""The Grad-CAM map as a DICOM Parametric Map (highdicom) in the source image's own pixel grid."""

from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from models.dicom.anatomy import copy_anatomy
from models.dicom.dates import dated_by_source
from models.dicom.equipment import NOT_FOR_DIAGNOSIS, Provenance
from models.dicom.uids import UidFor, nominal_frame_of_reference_uid

# PS3.16 CID 217 "Visual Explanation": DCM 130403; values are fractions of the map's maximum,
# so the unit is UCUM "1" ("no units").
QUANTITY = codes.DCM.GradientWeightedClassActivation
UNIT = codes.UCUM.NoUnits
LUT_LABEL = "GRADCAM"  # SH, at most 16 characters
CONTENT_LABEL = "GRADCAM_NO_DIAG"  # CS, at most 16 characters: a Grad-CAM map, not for diagnosis
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


_GEOMETRY = (
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
)
# What makes a (one-frame) source look multi-frame to highdicom: left out of its geometry copy.
_MULTIFRAME = (
    "NumberOfFrames",
    "FrameIncrementPointer",
    "GridFrameOffsetVector",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
)
# keyword -> (functional group sequence holding it in an enhanced image, values, positive)
_PLANE = {
    "ImagePositionPatient": ("PlanePositionSequence", 3, False),
    "ImageOrientationPatient": ("PlaneOrientationSequence", 6, False),
    "PixelSpacing": ("PixelMeasuresSequence", 2, True),
}


def _vector(value, n: int, positive: bool) -> list[float] | None:
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    ok = len(values) == n and all(np.isfinite(values)) and (not positive or all(v > 0 for v in values))
    return values if ok else None


def _plane(source: Dataset, keyword: str) -> list[float] | None:
    """A plane attribute of the source: at its top level, else in its first frame's (or the
    shared) functional groups."""
    sequence, n, positive = _PLANE[keyword]
    if keyword in source:
        return _vector(source.get(keyword), n, positive)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in (source.get(groups) or [])[:1]:
            for macro in (item.get(sequence) or [])[:1]:
                if keyword in macro:
                    return _vector(macro.get(keyword), n, positive)
    return None


def geometry_source(source: Dataset) -> Dataset:
    """A copy of the source as highdicom should see its geometry (the source is left as it is).

    A Parametric Map needs a Frame of Reference, plane position, orientation and pixel spacing
    (PS3.3 A.75). A source with all of them (CT, MR; an enhanced image's first frame) keeps
    them. A projection image or SC without them gets a Frame of Reference of its own
    (``uids.nominal_frame_of_reference_uid``: one per source instance) with the nominal 2D
    geometry viewers give such an image: position (0, 0, 0), orientation rows +x / columns
    +y, and its Pixel Spacing, else its Imager Pixel Spacing, else 1 mm. Either way the map
    and the source share Rows x Columns pixel for pixel, as the map's Derivation Image
    Sequence says (Spatial Locations Preserved YES).

    Why the nominal plane and not one read from a projection image's Patient Orientation
    (L\\F would give rows +x, columns -z): the Parametric Map IOD requires a Frame of Reference
    and a patient plane (dciodvfy: Type 1; highdicom can leave them out for a source without
    a Frame of Reference, but the object is then invalid), and a viewer fuses the map over the
    source by geometry. OHIF 3.13 gives an image without a plane exactly this nominal one
    (rows +x, columns +y at the origin; it never reads Patient Orientation), so the map lies on
    the source there; a map in a plane derived from Patient Orientation lies across it and is
    not shown at all (tried: the fused viewport shows the X-ray alone). The fused view's
    orientation letters are OHIF's own for the source either way. The Secondary Captures,
    which have a Patient Orientation, carry the source's."""
    plane = {keyword: _plane(source, keyword) for keyword in _PLANE}
    own = "FrameOfReferenceUID" in source and all(v is not None for v in plane.values())
    ds = Dataset()  # the source's elements, those set below excepted (the source is left as it is)
    for elem in source:
        if elem.keyword not in _GEOMETRY and elem.keyword not in _MULTIFRAME:
            ds.add(elem)
    if own:
        ds.FrameOfReferenceUID = source.FrameOfReferenceUID
        ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
        thickness = _vector(source.get("SliceThickness"), 1, True)
        _set_plane(ds, plane["ImagePositionPatient"], plane["ImageOrientationPatient"], plane["PixelSpacing"])
        ds.SliceThickness = thickness[0] if thickness else 1.0
    else:
        ds.FrameOfReferenceUID = nominal_frame_of_reference_uid(source.SOPInstanceUID)
        ds.PositionReferenceIndicator = ""
        spacing = plane["PixelSpacing"] or _vector(source.get("ImagerPixelSpacing"), 2, True) or [1.0, 1.0]
        _set_plane(ds, [0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], spacing)
        ds.SliceThickness = 1.0
    # One frame, described both ways: at the top level (what highdicom reads of a single-frame
    # IOD) and in functional groups (what it reads of a multi-frame IOD's, Enhanced CT or RT
    # Dose, whose one-frame instances do not always carry them).
    ds.NumberOfFrames = 1
    shared, frame = Dataset(), Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = ds.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = ds.SliceThickness
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = ds.ImageOrientationPatient
    frame.PlanePositionSequence = [Dataset()]
    frame.PlanePositionSequence[0].ImagePositionPatient = ds.ImagePositionPatient
    ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = [shared], [frame]
    return ds


def _set_plane(ds: Dataset, position: list[float], orientation: list[float], spacing: list[float]) -> None:
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = position, orientation, spacing


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
    attributes are valid (``sanitize.usable_source``). uid(role): the object's UIDs
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
            # What a viewer shows of the fused map (OHIF: the series' description in the study
            # browser, the content label and description of the layer) says it is not for
            # diagnostic use, the warning always kept whole within LO's 64 characters.
            content_label=CONTENT_LABEL,
            content_description=description[: 64 - len(NOT_FOR_DIAGNOSIS) - 2] + f", {NOT_FOR_DIAGNOSIS}",
            contributing_equipment=[provenance.contributing_equipment("Grad-CAM map of the served model")],
        )
    # Nothing from the clock, no random UID: a re-run writes the same bytes (``dates``).
    dated_by_source(pm, source, required=True)
    dimensions = uid("dimension-organization/pm")
    for item in [*pm.DimensionOrganizationSequence, *pm.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimensions
    provenance.stamp(pm)
    pm.SeriesDescription = provenance.series_description("Grad-CAM map")
    copy_anatomy(source, pm, image_laterality=False)  # Laterality only where it applies
    return pm
