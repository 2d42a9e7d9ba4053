"""Body part and laterality in the derived images: the source's where it says them, absent where they do not apply, empty only where the body part may be paired and nothing says the side; no Type 3 attribute empty; dciodvfy on each."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from tests.models.dicom.test_sr import derived
from tests.support.dciodvfy import check_with_dciodvfy, require_dciodvfy
from tests.support.dicom import xray

# Attributes a derived object may carry empty: Type 2 (or 2C with its condition met) in its IOD.
TYPE2 = {
    "AcquisitionDateTime",  # the Encapsulated PDF's (Type 2): when aex ran is not recorded
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Laterality",
    "PatientOrientation",
    "PositionReferenceIndicator",
    "AcquisitionContextSequence",
    "PerformedProcedureCodeSequence",
    "ReferencedPerformedProcedureStepSequence",
}


def source(**attributes) -> pydicom.Dataset:
    """A 48 x 40 DX (tests.support.dicom.xray: Body Part Examined CHEST) with ``attributes``
    set (None: left out)."""
    yy, xx = np.mgrid[0:48, 0:40]
    ds = pydicom.dcmread(io.BytesIO(xray(((xx * 50 + yy * 30) % 4096).astype(np.uint16))))
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


# (case, source attributes, the map's (Body Part, Laterality), a Secondary Capture's (Body Part,
# Laterality, Image Laterality)); "absent" for an attribute left out.
CASES = [
    ("chest", {"ImageLaterality": "U"}, ("CHEST", "absent"), ("CHEST", "absent", "U")),
    ("chest-with-a-side", {"Laterality": "L"}, ("CHEST", "absent"), ("CHEST", "absent", "absent")),
    (
        "knee-right",
        {"BodyPartExamined": "KNEE", "ImageLaterality": "R"},
        ("KNEE", "R"),
        ("KNEE", "absent", "R"),
    ),
    (
        "breast-series-left",
        {"BodyPartExamined": "BREAST", "Laterality": "L"},
        ("BREAST", "L"),
        ("BREAST", "L", "absent"),
    ),
    ("nothing-said", {"BodyPartExamined": None}, ("absent", ""), ("absent", "", "absent")),
    ("empty-laterality", {"BodyPartExamined": None, "Laterality": ""}, ("absent", ""), ("absent", "", "absent")),
]


def value(ds, keyword: str) -> str:
    return str(ds[keyword].value or "") if keyword in ds else "absent"


@pytest.mark.parametrize("case, attributes, pm_expected, sc_expected", CASES, ids=[c[0] for c in CASES])
def test_body_part_and_laterality(tmp_path, case, attributes, pm_expected, sc_expected):
    require_dciodvfy()
    objects = derived(source(**attributes)).objects
    by_role = {o.role: pydicom.dcmread(io.BytesIO(o.data)) for o in objects}
    pm = by_role["gradcam_parametric_map"]
    assert (value(pm, "BodyPartExamined"), value(pm, "Laterality")) == pm_expected
    assert "ImageLaterality" not in pm  # no General Image module in a Parametric Map
    for o in objects:
        if o.role in ("gradcam_overlay", "explanation", "explanation_difference"):
            sc = pydicom.dcmread(io.BytesIO(o.data))
            got = (value(sc, "BodyPartExamined"), value(sc, "Laterality"), value(sc, "ImageLaterality"))
            assert got == sc_expected, o.name
    assert "Laterality" not in by_role["structured_report"]
    assert check_with_dciodvfy(tmp_path, {o.name: o.data for o in objects}) == {}


@pytest.mark.parametrize("name", ["dx", "CT_small.dcm", "MR_small.dcm"])
def test_no_type3_attribute_is_present_and_empty(pydicom_file, name):
    src = source() if name == "dx" else pydicom.dcmread(io.BytesIO(pydicom_file(name)))
    for o in derived(src).objects:
        ds = pydicom.dcmread(io.BytesIO(o.data))
        empty = {e.keyword for e in ds.iterall() if e.keyword != "PixelData" and e.is_empty}
        assert empty <= TYPE2, (o.name, sorted(empty - TYPE2))
