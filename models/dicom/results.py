"""The DICOM objects of one explanation: Parametric Map, Secondary Captures, the PDF report and the SR that describes them."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from models.dicom.class_codes import stored_codes
from models.dicom.equipment import Provenance
from models.dicom.parametric_map import parametric_map
from models.dicom.report_pdf import report_pdf
from models.dicom.sanitize import usable_source
from models.dicom.secondary_capture import part10, secondary_capture_datasets
from models.dicom.sr import measurement_report
from models.dicom.uids import result_uids

PARAMETRIC_MAP = "gradcam_parametric_map"  # names of the files (".dcm" added) and roles
REPORT = "structured_report"
REPORT_PDF = "report_pdf"


@dataclass(frozen=True)
class DerivedObject:
    """One object: its file name, role, Part 10 bytes and identifiers (no patient attribute)."""

    name: str
    role: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str

    def listing(self) -> dict[str, str]:
        """What a job result says about it."""
        return {
            "name": self.name,
            "role": self.role,
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
        }


@dataclass(frozen=True)
class DerivedObjects:
    """Every object of one explanation (the PM first, the SR last) and the warnings about the
    source's attributes they could not carry as they were (``sanitize``: keywords, never values)."""

    objects: list[DerivedObject]
    warnings: list[str]


def _object(name: str, role: str, ds: Dataset) -> DerivedObject:
    return DerivedObject(
        f"{name}.dcm", role, part10(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
    )


def explanation_objects(
    source: Dataset,
    gradcam: np.ndarray,
    images: Sequence[tuple[str, str, np.ndarray]],
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    parameters: Mapping[str, Any],
    provenance: Provenance,
    derivation: str,
    class_codes: Mapping[str, Mapping[str, str]] | None = None,
    annotated: bool = False,
    input_size: int | None = None,
    salient: tuple[int, int, int, int] | None = None,
) -> DerivedObjects:
    """Every DICOM object of one explanation of ``source``, in four new series of its study
    (Parametric Map, Secondary Capture, Encapsulated PDF report, SR: a series holds one modality), with UIDs derived
    from (source SOP Instance UID, checkpoint sha256, ``parameters``, role), so the same request
    on the same input gives the same UIDs and a re-store replaces instead of duplicating.

    gradcam: the Grad-CAM map on the source's grid (float Rows x Columns in [0, 1],
    ``models.data.geometry.map_to_source``); images: (name, role, image) of each Secondary
    Capture (the overlay, each explanation and its difference; see
    ``secondary_capture.secondary_captures``; annotated: they carry burned in text, as
    ``models.render.capture.capture_pictures`` makes them); summary, metrics: see ``sr.measurement_report``;
    derivation: the free text of how they were made; class_codes: the checkpoint's class ->
    code map (``CheckpointMeta.class_codes``: the SR codes those classes' findings with them,
    the others in 99AEX); input_size: the side of the model's square input in pixels (the PDF
    report says it, ``report_pdf.report_lines``); salient: the map's most salient area
    (left, top, right, bottom, half-open, in the source's pixels:
    ``models.explain.region.salient_box`` of ``gradcam``), where the SR's finding lies (None:
    the whole image). The PM comes first, then the Secondary
    Captures, the PDF report and the SR last. Each
    malformed attribute of the source is left out or emptied first (``sanitize.usable_source``),
    and said so in the warnings; ``sanitize.UnusableSourceError`` when no object can reference
    the source."""
    with warnings.catch_warnings():
        # pydicom's and highdicom's warnings quote attribute values (patient names, dates):
        # never into a log.
        warnings.simplefilter("ignore")
        checked = usable_source(source)
        usable = checked.dataset
        uid = result_uids(str(usable.SOPInstanceUID), provenance.checkpoint_sha256, parameters)
        pm = parametric_map(usable, gradcam, provenance, uid, f"Grad-CAM of {summary['predicted']['class_name']}")
        captures = secondary_capture_datasets(
            usable,
            [(name, image) for name, _role, image in images],
            derivation,
            provenance=provenance,
            uid=uid,
            annotated=annotated,
        )
        roles = {name: role for name, role, _image in images}
        codes = stored_codes(class_codes or {}, list(summary["probs"]))
        report = report_pdf(usable, summary, provenance, uid, input_size)
        sr = measurement_report(
            usable, pm, dict(captures), summary, metrics, parameters, provenance, uid, codes, salient
        )
        objects = [
            _object(PARAMETRIC_MAP, PARAMETRIC_MAP, pm),
            *(_object(name, roles[name], sc) for name, sc in captures),
            _object(REPORT_PDF, REPORT_PDF, report),
            _object(REPORT, REPORT, sr),
        ]
    return DerivedObjects(objects, checked.warnings)
