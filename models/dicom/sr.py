"""The explanation's findings as a Comprehensive 3D SR: a TID 1500 Measurement Report built with highdicom."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.dicom.class_codes import ClassCode
from models.dicom.dates import dated_by_source
from models.dicom.equipment import MANUFACTURER, Provenance
from models.dicom.report_pdf import WARNING
from models.dicom.uids import UidFor

# Codes: DICOM's (DCM 130403 "Gradient-weighted class activation", 122157 "Probability", 121415
# "Percentile Ranking of measurement", SCT 363679005 "Imaging procedure") where PS3.16 has one;
# otherwise the private coding scheme 99AEX, declared in the SR's Coding Scheme Identification
# Sequence. Its code values are fixed (``AEX``). A class of the classifier is the standard
# concept its checkpoint's class -> code map gives it (``class_codes``: SNOMED CT for the
# bundled pneumonia model), else the code (99AEX, its name, its name), the same for every model
# that names a class alike.
SCHEME = "99AEX"
SERIES_OFFSET = 902  # the source's Series Number + this
AEX = {
    "classification": ("CLASSIFICATION", "Image classification"),
    "predicted": ("PREDICTED-CLASS", "Predicted class"),
    "stability": ("STABILITY", "Decision stability"),
    "attack_rms": ("FLIP-RADIUS", "Smallest RMS perturbation that changes the decision"),
    "btr_rms": ("CHANCE-RADIUS", "Smallest RMS perturbation to chance-level probability"),
    "model": ("MODEL-METRICS", "Recorded metrics of the model"),
    "test_accuracy": ("TEST-ACCURACY", "Test accuracy"),
    "ara_attack": ("ARA-ATTACK", "Adversarial robustness area, attack"),
    "ara_btr": ("ARA-BTR", "Adversarial robustness area, better than random"),
    "explained": ("EXPLAINED-CLASS", "Explained class"),
    "adversarial": ("ADV-EXPLANATION", "Adversarial explanation"),
    "target": ("TARGET-CLASS", "Target class"),
    "delta_rms": ("DELTA-RMS", "RMS of the perturbation"),
    "prob_before": ("PROB-BEFORE", "Target class probability before perturbation"),
    "prob_after": ("PROB-AFTER", "Target class probability after perturbation"),
    "deletion_auc": ("DELETION-AUC", "Deletion AUC of the explained class probability"),
    "insertion_auc": ("INSERTION-AUC", "Insertion AUC of the explained class probability"),
    "random_deletion_auc": ("RANDOM-DEL-AUC", "Deletion AUC in a random pixel order"),
    "random_insertion_auc": ("RANDOM-INS-AUC", "Insertion AUC in a random pixel order"),
}
FAITHFULNESS = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")
NO_UNITS = codes.UCUM.NoUnits
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")  # OHIF shows these TEXT items beside the region


def code(key: str) -> hd.sr.CodedConcept:
    """The 99AEX concept ``AEX[key]``."""
    value, meaning = AEX[key]
    return hd.sr.CodedConcept(value, SCHEME, meaning)


def class_code(name: str, standard: Mapping[str, ClassCode] | None = None) -> hd.sr.CodedConcept:
    """A class of the classifier as a coded concept: its code in ``standard`` (the checkpoint's
    class -> code map, ``class_codes.stored_codes``) when it has one, else a 99AEX concept with
    its name as code value and meaning (a backslash, the value separator, becomes '/'; the
    meaning is cut at 64 characters)."""
    if standard and name in standard:
        code = standard[name]
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
    text = "".join(ch if ch.isprintable() and ch != "\\" else "/" for ch in str(name)) or "unnamed"
    return hd.sr.CodedConcept(text, SCHEME, text[:64])


def coding_scheme() -> Dataset:
    """The Coding Scheme Identification Sequence item that declares 99AEX."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "aex explanation concepts"
    item.CodingSchemeResponsibleOrganization = "aex project"
    return item


def _num(key: str | hd.sr.CodedConcept, value: float, unit=NO_UNITS, **kw) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=code(key) if isinstance(key, str) else key, value=float(value), unit=unit, **kw)


def _faithfulness(figures: Mapping[str, Any] | None, region) -> list[hd.sr.Measurement]:
    """A map's deletion and insertion AUCs and the random order's (``models.explain.faithfulness``),
    each inferred from ``region``."""
    figures = figures or {}
    return [_num(k, figures[k], referenced_coordinates=region) for k in FAITHFULNESS if _is_number(figures.get(k))]


def _ref(ds: Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    # By its UIDs: highdicom's from_source_image also wants a Modality it accepts, which a
    # source does not always have; the reference needs none.
    return hd.sr.SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _percentile(value: float | None, n: int) -> hd.sr.MeasurementProperties | None:
    if value is None:
        return None
    rank = hd.sr.NumContentItem(
        name=codes.DCM.PercentileRankingOfMeasurement,
        value=float(value),
        unit=codes.UCUM.Percent,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )
    population = f"the same radius of the {n} evaluation images recorded in the checkpoint"
    return hd.sr.MeasurementProperties(
        measurement_statistical_properties=hd.sr.MeasurementStatisticalProperties([rank], population)
    )


def _rectangle(ds: Dataset, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The closed POLYLINE (5 points, column/row pixel coordinates: (0, 0) is the top left corner
    of the top left pixel) around ``box`` (left, top, right, bottom; half-open pixel ranges) on
    ``ds``, or around its whole picture."""
    left, top, right, bottom = box or (0, 0, int(ds.Columns), int(ds.Rows))
    return np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]],
        dtype=np.float32,
    )


def _region(ds: Dataset, box: tuple[int, int, int, int] | None = None) -> hd.sr.CoordinatesForMeasurement:
    """The image region a measurement is INFERRED FROM (TID 320): ``_rectangle`` on ``ds``."""
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_rectangle(ds, box),
        source_image=hd.sr.SourceImageForRegion(str(ds.SOPClassUID), str(ds.SOPInstanceUID)),
    )


def finding_texts(summary: Mapping[str, Any], provenance: Provenance) -> list[str]:
    """The Comment lines of the finding, as OHIF shows them next to its region (at most four,
    one line each): the predicted class with its probability, the stability statement (when
    the summary has one), the model, and that it is not for diagnostic use."""
    predicted = summary["predicted"]
    lines = [f"Predicted class: {predicted['class_name']} (probability {100.0 * float(predicted['prob']):.1f} %)"]
    stability = (summary.get("stability") or {}).get("summary")
    if stability:
        lines.append(f"Stability: {stability}")
    lines.append(
        f"Model: {provenance.model_name} (checkpoint sha256 {provenance.checkpoint_sha256[:12]}), "
        f"aex {provenance.software_version}"
    )
    lines.append(WARNING)
    return [line[:1024] for line in lines]


def _groups(
    source: Dataset,
    pm: Dataset,
    images: Mapping[str, Dataset],
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    algorithm: hd.sr.AlgorithmIdentification,
    uid: UidFor,
    standard: Mapping[str, ClassCode],
    salient: tuple[int, int, int, int],
    texts: Sequence[str],
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    # OHIF 3.13 reads every TID 1501 group as a measurement and fails ("Something went wrong")
    # on one without an image region: each measurement here is INFERRED FROM a region. The
    # finding's is the map's most salient area on the source, which OHIF draws with the
    # finding's Comment lines; every other group's is the whole picture of the Secondary
    # Capture it describes (the Grad-CAM overlay, the model's input as the model saw it, for
    # the image-level figures; each target's explanation), so OHIF draws nothing else over
    # the source.
    def group(key: str, name: str, **kw) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        tracking = hd.sr.TrackingIdentifier(uid=uid(f"tracking/{key}"), identifier=name[:64])
        return hd.sr.MeasurementsAndQualitativeEvaluations(tracking_identifier=tracking, algorithm_id=algorithm, **kw)

    overlay = images.get("gradcam_overlay", pm)
    whole = [_region(overlay)]
    predicted = summary["predicted"]
    explained = list(summary["probs"])[summary["gradcam"]["class_index"]]
    cam = [pm] + ([images["gradcam_overlay"]] if "gradcam_overlay" in images else [])
    finding = group(
        "classification",
        "Grad-CAM most salient area",
        finding_type=code("classification"),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(code("predicted"), class_code(predicted["class_name"], standard)),
            hd.sr.QualitativeEvaluation(code("explained"), class_code(explained, standard)),
        ],
        measurements=[
            _num(codes.DCM.Probability, predicted["prob"], referenced_coordinates=[_region(source, salient)])
        ],
        source_images=[_ref(source), *(_ref(ds) for ds in cam)],
    )
    for text in texts:
        finding[0].ContentSequence.append(
            hd.sr.TextContentItem(name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        )
    out = [finding]
    for i, (name, prob) in enumerate(summary["probs"].items()):
        out.append(
            group(
                f"class/{i}",
                f"class {name}",
                finding_type=class_code(name, standard),
                measurements=[_num(codes.DCM.Probability, prob, referenced_coordinates=whole)],
                source_images=[_ref(source)],
            )
        )
    stability = summary.get("stability")
    if stability:
        n = int(stability.get("reference_n") or 0)
        radii = [
            _num(
                k,
                stability[k],
                properties=_percentile(stability.get(k.replace("_rms", "_percentile")), n),
                referenced_coordinates=whole,
            )
            for k in ("attack_rms", "btr_rms")
            if stability.get(k) is not None
        ]
        if radii:
            out.append(group("stability", "stability", finding_type=code("stability"), measurements=radii))
    recorded = [
        _num(k, metrics[k], referenced_coordinates=whole)
        for k in ("test_accuracy", "ara_attack", "ara_btr")
        if _is_number(metrics.get(k))
    ]
    if recorded:
        out.append(group("model", "model metrics", finding_type=code("model"), measurements=recorded))
    faithful = _faithfulness(summary["gradcam"].get("faithfulness"), whole)
    if faithful:
        out.append(
            group(
                "gradcam",
                "Grad-CAM",
                finding_type=codes.DCM.GradientWeightedClassActivation,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(code("explained"), class_code(explained, standard))
                ],
                measurements=faithful,
                source_images=[_ref(ds) for ds in cam],
            )
        )
    for i, target in enumerate(summary["targets"]):
        refs = [images[s] for s in (_stem(target["image"]), _stem(target["difference"])) if s in images]
        anchor = [_region(refs[0])] if refs else whole
        measurements = [
            _num(concept, target[k], referenced_coordinates=anchor)
            for k, concept in (
                ("rms", "delta_rms"),
                ("prob_before", "prob_before"),
                ("prob_after", "prob_after"),
            )
            if _is_number(target.get(k))
        ] + _faithfulness(target.get("faithfulness"), anchor)
        if not measurements:
            continue  # nothing measured: a group OHIF cannot place
        out.append(
            group(
                f"target/{i}",
                f"{target['role']} {target['class_name']}",
                finding_type=code("adversarial"),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(code("target"), class_code(target["class_name"], standard))
                ],
                measurements=measurements,
                source_images=[_ref(ds) for ds in refs],
            )
        )
    return out


def _faithfulness_parameters(summary: Mapping[str, Any]) -> list[str]:
    """The faithfulness figures' definition in a few words, when the summary has them."""
    method = summary.get("faithfulness")
    if not method:
        return []
    return [
        f"faithfulness: RISE deletion and insertion AUCs of the explained class's probability, "
        f"{method['steps']} equal steps; baseline {method['baseline']}; random order {method['random_order']}"
    ]


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def measurement_report(
    source: Dataset,
    pm: Dataset,
    images: Mapping[str, Dataset],
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    parameters: Mapping[str, Any],
    provenance: Provenance,
    uid: UidFor,
    class_codes: Mapping[str, ClassCode] | None = None,
    salient: tuple[int, int, int, int] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR of one explanation, in a new series of ``source``'s study.

    Content: the observer (the served model as a device), then TID 1501 measurement groups,
    each with the algorithm identification (TID 4019: model name; checkpoint sha256 and aex
    version; the canonical parameters as JSON), every measurement INFERRED FROM an image
    region (TID 320, a POLYLINE rectangle; OHIF 3.13 shows none of the SR without one). First
    the finding, the one OHIF draws on the source: the predicted and the explained class, the
    predicted class's probability inferred from ``salient`` (the Grad-CAM map's most salient
    area, ``models.explain.region.salient_box``, in the source's pixels) and the Comment lines
    OHIF writes beside it (``finding_texts``: class and probability, stability statement,
    model, not for diagnostic use), referencing the source, the Parametric Map and the overlay.
    Then, each inferred from the whole overlay Secondary Capture (the model's input with the
    map): one group per class with its probability, the decision's stability radii with their
    percentile among the checkpoint's evaluation images (TID 311), the model's recorded
    metrics (test accuracy, attack and BTR ARA), the Grad-CAM map's deletion and insertion AUCs
    and the random order's (``models.explain.faithfulness``, defined in the algorithm's
    parameters; when computed); then each adversarial explanation (rms(delta), the target's
    probability before and after, its map's AUCs, inferred from its explanation's Secondary
    Capture, referencing its two). Completion COMPLETE, Preliminary, Verification Flag
    UNVERIFIED.

    source: the source (``sanitize.usable_source``); pm: the Parametric Map;
    images: the Secondary Captures by name ("gradcam_overlay", each target's stems, as the
    summary names its PNGs without ".png"); summary: the explain summary (predicted, probs,
    gradcam, targets, stability); metrics: the checkpoint's recorded metrics; parameters:
    the request's canonical parameters; uid(role): "series/sr", "instance/sr", "tracking/...";
    class_codes: the standard concept of each class that has one (``class_code``); salient:
    (left, top, right, bottom) in the source's pixels, half-open (None: the whole image)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=provenance.model,
        version=f"checkpoint sha256 {provenance.checkpoint_sha256}, aex {provenance.software_version}",
        parameters=[json.dumps(dict(parameters), sort_keys=True), *_faithfulness_parameters(summary)],
        manufacturer=MANUFACTURER,
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=provenance.device_uid,
        name=provenance.model,
        manufacturer_name=MANUFACTURER,
        model_name=provenance.model,
        serial_number=provenance.checkpoint_sha256[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=_groups(
            source,
            pm,
            images,
            summary,
            metrics,
            algorithm,
            uid,
            class_codes or {},
            salient or (0, 0, int(source.Columns), int(source.Rows)),
            finding_texts(summary, provenance),
        ),
    )
    evidence: Sequence[Dataset] = [source, pm, *images.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's warnings may quote source values
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=uid("series/sr"),
            series_number=int(source.get("SeriesNumber") or 0) + SERIES_OFFSET,
            sop_instance_uid=uid("instance/sr"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=[provenance.contributing_equipment("Findings of the served model")],
        )
    dated_by_source(sr, source, required=True)  # nothing from the clock: a re-run writes the same bytes
    provenance.stamp(sr)
    sr.SeriesDescription = provenance.series_description("report")
    sr.CodingSchemeIdentificationSequence = [coding_scheme()]
    return sr
