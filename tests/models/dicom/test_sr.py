"""The explanation's DICOM objects together: the TID 1500 SR and what it references, deterministic UIDs, dciodvfy."""

import copy
import io
import json

import numpy as np
import pydicom
import pytest

from models.data.geometry import map_to_source
from models.dicom.equipment import Provenance
from models.dicom.results import PARAMETRIC_MAP, REPORT, REPORT_PDF, explanation_objects
from models.dicom.uids import derived_uid, device_uid
from models.explain.region import salient_box
from tests.support.dciodvfy import check_with_dciodvfy, require_dciodvfy

SHA = "5eed" * 16
CLASSES = ["normal", "pneumonia", "effusion"]
PARAMETERS = {"targets": ["predicted", "runner-up"], "rho": 0.1, "steps": 5, "layer": "l", "stability_steps": 20}
METRICS = {"test_accuracy": 0.875, "ara_attack": 0.0123, "ara_btr": 0.0045, "ara_radii": {"n": 6}}


def summary() -> dict:
    probs = dict(zip(CLASSES, [0.15, 0.7, 0.15]))
    targets = []
    for i, (role, c) in enumerate([("predicted", 1), ("runner-up", 0)]):
        stem = f"{i:02d}_{role}_{CLASSES[c]}"
        targets.append(
            {
                "role": role,
                "class_index": c,
                "class_name": CLASSES[c],
                "rms": 0.02 + i / 100,
                "prob_before": probs[CLASSES[c]],
                "prob_after": 0.9,
                "image": f"{stem}.png",
                "difference": f"{stem}_diff.png",
                "faithfulness": faithfulness(0.2 + i / 10),
            }
        )
    return {
        "predicted": {"class_index": 1, "class_name": "pneumonia", "prob": 0.7},
        "probs": probs,
        "gradcam": {"layer": "l", "class_index": 1, "faithfulness": faithfulness(0.1)},
        "faithfulness": {"steps": 16, "baseline": "a blurred copy", "random_order": "randperm, seed 1776"},
        "targets": targets,
        "stability": {
            "attack_rms": 0.031,
            "btr_rms": 0.017,
            "attack_percentile": 50.0,
            "btr_percentile": 33.3,
            "reference_n": 6,
        },
    }


def faithfulness(deletion: float) -> dict:
    return {
        "class_index": 1,
        "deletion_auc": deletion,
        "insertion_auc": 0.6,
        "random_deletion_auc": 0.4,
        "random_insertion_auc": 0.45,
        "deletion_curve": [0.7] * 17,
    }


def images(s: dict) -> list:
    rng = np.random.default_rng(3)
    out = [("gradcam_overlay", "gradcam_overlay", rng.random((28, 28, 3)))]
    for t in s["targets"]:
        out.append((t["image"][:-4], "explanation", rng.random((28, 28, 1))))
        out.append((t["difference"][:-4], "explanation_difference", rng.random((28, 28, 1))))
    return out


def objects(source, parameters=PARAMETERS, sha=SHA):
    """The objects ``explanation_objects`` derives from ``source`` (a list, the PM first)."""
    return derived(source, parameters, sha).objects


def derived(source, parameters=PARAMETERS, sha=SHA):
    """``explanation_objects`` of ``source``: its objects and warnings."""
    s = summary()
    cam = np.random.default_rng(1).random((28, 28)).astype(np.float32)
    values = map_to_source(cam, int(source.Columns), int(source.Rows))
    return explanation_objects(
        source, values, images(s), s, METRICS, parameters, Provenance("tiny", sha), "how", salient=salient_box(values)
    )


@pytest.fixture(scope="module")
def source(dicom_file):
    pixels = (np.mgrid[0:512, 0:640].sum(0) * 3).clip(0, 4095).astype(np.uint16)
    return pydicom.dcmread(io.BytesIO(dicom_file(pixels, "MONOCHROME1", 0.5, -100.0, (400.0, 900.0))))


@pytest.fixture(scope="module")
def built(source):
    objs = objects(source)
    return objs, {o.name: pydicom.dcmread(io.BytesIO(o.data)) for o in objs}


def content_items(items):
    for item in items:
        yield item
        yield from content_items(item.get("ContentSequence", []))


def concept(item) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def groups(sr) -> list:
    return [i for i in content_items(sr.ContentSequence) if concept(i) == ("DCM", "125007")]


def finding(group) -> tuple[str, str]:
    (item,) = [i for i in group.ContentSequence if concept(i) == ("DCM", "121071")]
    return item.ConceptCodeSequence[0].CodingSchemeDesignator, item.ConceptCodeSequence[0].CodeValue


def nums(group) -> dict:
    return {
        concept(i): float(i.MeasuredValueSequence[0].NumericValue)
        for i in group.ContentSequence
        if i.ValueType == "NUM"
    }


def test_objects_roles_and_listing(built, source):
    objs, ds = built
    assert [o.role for o in objs][0] == PARAMETRIC_MAP and objs[-1].role == REPORT
    assert {o.role for o in objs} == {
        PARAMETRIC_MAP,
        "gradcam_overlay",
        "explanation",
        "explanation_difference",
        REPORT_PDF,
        REPORT,
    }
    classes = {o.role: ds[o.name].SOPClassUID for o in objs}
    assert classes[PARAMETRIC_MAP] == pydicom.uid.ParametricMapStorage
    assert classes["explanation"] == pydicom.uid.SecondaryCaptureImageStorage
    assert classes[REPORT] == pydicom.uid.Comprehensive3DSRStorage
    assert classes[REPORT_PDF] == pydicom.uid.EncapsulatedPDFStorage
    assert len({o.series_instance_uid for o in objs}) == 4  # PM, SC, DOC and SR series: one modality each
    for o in objs:
        d = ds[o.name]
        assert (d.SOPInstanceUID, d.SeriesInstanceUID, d.SOPClassUID) == (
            o.sop_instance_uid,
            o.series_instance_uid,
            o.sop_class_uid,
        )
        assert d.StudyInstanceUID == source.StudyInstanceUID and d.PatientName == source.PatientName
        assert "not for diagnostic use" in d.SeriesDescription
        assert set(o.listing()) == {"name", "role", "sop_class_uid", "sop_instance_uid", "series_instance_uid"}
    listing = json.dumps([o.listing() for o in objs])
    assert "Test^Patient" not in listing and "PX-001" not in listing


def test_sr_references_the_parametric_map_and_every_secondary_capture(built, source):
    objs, ds = built
    sr = ds["structured_report.dcm"]
    referenced = {
        (i.ReferencedSOPSequence[0].ReferencedSOPClassUID, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in content_items(sr.ContentSequence)
        if i.ValueType == "IMAGE"
    }
    described = {(o.sop_class_uid, o.sop_instance_uid) for o in objs if o.role not in (REPORT, REPORT_PDF)}
    assert described <= referenced
    assert (source.SOPClassUID, source.SOPInstanceUID) in referenced
    evidence = {
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert described <= evidence


def test_sr_holds_the_classification_stability_and_model(built):
    _, ds = built
    sr = ds["structured_report.dcm"]
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    by_finding = {finding(g): g for g in groups(sr)}
    probability = ("DCM", "122157")
    for name, p in summary()["probs"].items():  # every class probability
        assert nums(by_finding[("99AEX", name)])[probability] == pytest.approx(p)
    classification = by_finding[("99AEX", "CLASSIFICATION")]
    (predicted,) = [i for i in classification.ContentSequence if concept(i) == ("99AEX", "PREDICTED-CLASS")]
    assert predicted.ConceptCodeSequence[0].CodeValue == "pneumonia"
    stability = by_finding[("99AEX", "STABILITY")]
    assert nums(stability) == {("99AEX", "FLIP-RADIUS"): 0.031, ("99AEX", "CHANCE-RADIUS"): 0.017}
    percentiles = [
        float(i.MeasuredValueSequence[0].NumericValue)
        for i in content_items(stability.ContentSequence)
        if concept(i) == ("DCM", "121415")
    ]
    assert sorted(percentiles) == [33.3, 50.0]
    model = nums(by_finding[("99AEX", "MODEL-METRICS")])
    assert model == {("99AEX", "TEST-ACCURACY"): 0.875, ("99AEX", "ARA-ATTACK"): 0.0123, ("99AEX", "ARA-BTR"): 0.0045}
    algorithm = {
        concept(i): i.TextValue for i in classification.ContentSequence if concept(i)[1] in ("111001", "111003")
    }
    assert algorithm[("DCM", "111001")] == "tiny" and SHA in algorithm[("DCM", "111003")]
    assert nums(by_finding[("DCM", "130403")]) == {  # the Grad-CAM group, with its map's faithfulness
        ("99AEX", "DELETION-AUC"): 0.1,
        ("99AEX", "INSERTION-AUC"): 0.6,
        ("99AEX", "RANDOM-DEL-AUC"): 0.4,
        ("99AEX", "RANDOM-INS-AUC"): 0.45,
    }
    explanations = [nums(g) for g in groups(sr) if finding(g) == ("99AEX", "ADV-EXPLANATION")]
    assert [e[("99AEX", "DELETION-AUC")] for e in explanations] == [0.2, 0.3]
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99AEX"
    aex = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "aex"]
    assert aex and aex[0].DeviceUID == device_uid(SHA) and aex[0].ManufacturerModelName == "tiny"


def scoords(item) -> list:
    """The SCOORD items a NUM is INFERRED FROM."""
    return [i for i in item.get("ContentSequence", []) if i.ValueType == "SCOORD"]


def test_every_measurement_is_inferred_from_an_image_region_and_the_finding_from_the_salient_area(built, source):
    """OHIF 3.13 shows an SR only when every measurement group has an image region (it fails
    with "Something went wrong" otherwise): each NUM is INFERRED FROM a SCOORD rectangle; the
    first group's is the Grad-CAM map's most salient area on the source, with the Comment lines
    OHIF writes beside it."""
    objs, ds = built
    sr = ds["structured_report.dcm"]
    found = groups(sr)
    for group in found:
        measured = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        assert measured, finding(group)
        for num in measured:
            (region,) = scoords(num)
            assert region.RelationshipType == "INFERRED FROM" and region.GraphicType == "POLYLINE"
            points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
            assert len(points) == 5 and (points[0] == points[-1]).all()  # a closed rectangle
    first = found[0]
    assert finding(first) == ("99AEX", "CLASSIFICATION")
    (probability,) = [i for i in first.ContentSequence if i.ValueType == "NUM"]
    assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.7)
    (region,) = scoords(probability)
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    cam = np.random.default_rng(1).random((28, 28)).astype(np.float32)  # as derived() makes it
    left, top, right, bottom = salient_box(map_to_source(cam, int(source.Columns), int(source.Rows)))
    assert [float(v) for v in region.GraphicData] == [left, top, right, top, right, bottom, left, bottom, left, top]
    comments = [i.TextValue for i in first.ContentSequence if concept(i) == ("DCM", "121106")]
    assert comments[0] == "Predicted class: pneumonia (probability 70.0 %)"
    assert comments[1].startswith("Model: tiny (checkpoint sha256 5eed5eed5eed), aex ")
    assert comments[-1].startswith("NOT FOR DIAGNOSTIC USE")
    assert len(comments) <= 4  # with the probability, at most the five lines OHIF shows in full
    # Only the finding is drawn on the source: the other regions lie on the Secondary Captures.
    on_source = [
        g
        for g in found
        for i in g.ContentSequence
        if i.ValueType == "NUM"
        for r in scoords(i)
        if r.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    ]
    assert on_source == [first]


def test_uids_are_deterministic(source, built):
    objs, _ = built
    again = objects(source)
    assert [(o.sop_instance_uid, o.series_instance_uid) for o in again] == [
        (o.sop_instance_uid, o.series_instance_uid) for o in objs
    ]
    other_rho = objects(source, {**PARAMETERS, "rho": 0.2})
    other_model = objects(source, sha="f00d" * 16)
    for other in (other_rho, other_model):
        assert not {o.sop_instance_uid for o in other} & {o.sop_instance_uid for o in objs}
        assert not {o.series_instance_uid for o in other} & {o.series_instance_uid for o in objs}
    uid = derived_uid("1.2.3", SHA, PARAMETERS, "instance/pm")
    assert uid == derived_uid("1.2.3", SHA, dict(reversed(PARAMETERS.items())), "instance/pm")  # key order
    assert uid != derived_uid("1.2.4", SHA, PARAMETERS, "instance/pm")
    assert uid != derived_uid("1.2.3", SHA, PARAMETERS, "instance/sr")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid[5:].isdigit()


BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "liver_1frame.dcm",  # Enhanced CT: its plane lives in functional groups
    "ExplVR_BigEnd.dcm",  # an ACR-NEMA style Study Date ("1997.04.24"), emptied
    "SC_rgb_jpeg_app14_dcmd.dcm",  # no Modality
]


@pytest.mark.parametrize("name", ["xray16", "sparse", *BUNDLED])
def test_every_object_passes_dciodvfy(tmp_path, source, pydicom_file, name):
    require_dciodvfy()
    if name in ("xray16", "sparse"):
        src = source
        if name == "sparse":  # Type 2 patient and study attributes absent altogether
            src = copy.deepcopy(source)
            for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
                del src[keyword]
    else:
        src = pydicom.dcmread(io.BytesIO(pydicom_file(name)))
    assert check_with_dciodvfy(tmp_path, {o.name: o.data for o in objects(src)}) == {}
