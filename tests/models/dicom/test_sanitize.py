"""Malformed patient, study and equipment attributes of a source: each one left out or emptied
(or, for an identity UID, replaced) and named, never quoted; every DICOM object still made,
and every one passes dciodvfy."""

from __future__ import annotations

import io
import warnings

import pydicom
import pytest
from pydicom.dataset import Dataset

from models.dicom.reading import read_dicom
from models.dicom.sanitize import Finding, UnusableSourceError, usable_source
from models.dicom.uids import unusable_uid
from tests.models.dicom.test_sr import derived
from tests.support.dciodvfy import check_with_dciodvfy, require_dciodvfy
from tests.support.malformed import CANARY, CASES, EVERYTHING, malformed, source_file

NAMES = {
    "gradcam_parametric_map.dcm",
    "gradcam_overlay.dcm",
    "00_predicted_pneumonia.dcm",
    "00_predicted_pneumonia_diff.dcm",
    "01_runner-up_normal.dcm",
    "01_runner-up_normal_diff.dcm",
    "report_pdf.dcm",
    "structured_report.dcm",
}
CANARY_BYTES = CANARY[:8].encode()
OWN = (
    "Manufacturer",
    "SeriesNumber",
)  # the outputs' own values, whatever the source's  # the shortest piece of it a case writes (a birth date)


@pytest.fixture(scope="module")
def base() -> bytes:
    return source_file()


def outputs(data: bytes):
    """(the source as the worker reads it, its objects by name as data sets, the warnings, the raw objects)."""
    source = read_dicom(data)
    out = derived(source)
    return source, {o.name: pydicom.dcmread(io.BytesIO(o.data)) for o in out.objects}, out.warnings, out.objects


def assert_carried_as_expected(source, objects, warnings_, expected) -> None:
    """Each expected keyword is warned about once, by name only, and carried as said."""
    assert sorted(warnings_) == sorted(Finding(k, action).message for k, action in expected.items())
    assert not [w for w in warnings_ if CANARY[:8] in w]
    for keyword, action in expected.items():
        for name, ds in objects.items():
            if keyword in OWN:
                continue
            if action == "emptied":
                assert keyword not in ds or ds[keyword].value in ("", None, []), (name, keyword)
            elif action == "left out":
                assert not [e for e in ds.iterall() if e.keyword == keyword], (name, keyword)
            elif action == "replaced" and keyword == "StudyInstanceUID":
                raw = str(source[keyword].value)
                assert ds.StudyInstanceUID == unusable_uid(keyword, {"value": raw}), name
            elif action == "from file meta":
                assert source.file_meta.MediaStorageSOPClassUID in _referenced_classes(ds), name


def _referenced_classes(ds) -> set[str]:
    found = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPClassUID":
            found.add(str(elem.value))
    return found


@pytest.mark.parametrize("case_id, elements, expected", CASES, ids=[c[0] for c in CASES])
def test_each_malformed_attribute_is_named_and_every_object_passes_dciodvfy(
    tmp_path, base, case_id, elements, expected
):
    require_dciodvfy()
    source, objects, warnings_, raw = outputs(malformed(base, elements))
    assert set(objects) == NAMES
    assert_carried_as_expected(source, objects, warnings_, expected)
    assert not [o.name for o in raw if CANARY_BYTES in o.data]  # no malformed value reached an object
    assert check_with_dciodvfy(tmp_path, {o.name: o.data for o in raw}) == {}


def test_every_malformed_attribute_at_once(tmp_path, base):
    require_dciodvfy()
    elements = [(k, raw, vr) for k, (raw, vr) in EVERYTHING.items()]
    source, objects, warnings_, raw = outputs(malformed(base, elements))
    assert set(objects) == NAMES
    keywords = sorted(w.split(" ", 1)[0] for w in warnings_)
    assert keywords == sorted(EVERYTHING), warnings_  # each one named, once
    assert not [o.name for o in raw if CANARY_BYTES in o.data]
    assert check_with_dciodvfy(tmp_path, {o.name: o.data for o in raw}) == {}
    # The outputs stay together: one derived study, the source's patient (what was valid of it).
    assert len({ds.StudyInstanceUID for ds in objects.values()}) == 1


def test_a_valid_source_is_carried_whole(base):
    source, objects, warnings_, _raw = outputs(base)
    assert warnings_ == []
    pm, sr = objects["gradcam_parametric_map.dcm"], objects["structured_report.dcm"]
    for ds in (pm, sr):
        assert (ds.PatientSex, ds.PatientBirthDate, ds.PatientAge, ds.AccessionNumber) == (
            "F",
            "19700101",
            "054Y",
            "ACC-MAL",
        )
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.ContributingEquipmentSequence[0].InstitutionName == "Test Hospital"


def test_replaced_uids_keep_a_study_together_and_instances_apart(base):
    """Two instances of one study whose Study UID is malformed (and whose SOP Instance UIDs
    are the same malformed value): one derived study, two derived instances; the same again
    on a re-run (a re-store replaces)."""
    bad = [("StudyInstanceUID", b"1.2.abc", None), ("SOPInstanceUID", b"1.2.xyz", None)]
    first = usable_source(read_dicom(malformed(base, bad))).dataset
    second = usable_source(read_dicom(malformed(source_file(seed=1), bad))).dataset
    again = usable_source(read_dicom(malformed(base, bad))).dataset
    assert first.StudyInstanceUID == second.StudyInstanceUID == again.StudyInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID and first.SOPInstanceUID == again.SOPInstanceUID
    for uid in (first.StudyInstanceUID, first.SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64


def test_a_source_that_no_object_can_reference_is_named_not_quoted(base):
    source = read_dicom(malformed(base, [("SOPClassUID", f"1.2.{CANARY}".encode(), None)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.file_meta.MediaStorageSOPClassUID = f"9.{CANARY}"
    with pytest.raises(UnusableSourceError) as info:
        usable_source(source)
    assert "SOPClassUID" in str(info.value) and CANARY not in str(info.value)


def _dataset(**attributes) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "attributes",
    [
        {"PatientName": "Doe^John^Q^Dr^Jr"},  # five components
        {"PatientName": "Doe^John=D^J=d^j"},  # three groups
        {"PatientName": "J\u00f6rg^M\u00fcller", "SpecificCharacterSet": "ISO_IR 100"},
        {"PatientName": "\u5c71\u7530^\u592a\u90ce", "SpecificCharacterSet": "ISO_IR 192"},
        {"PatientSex": "O", "PatientAge": "054Y", "PatientBirthDate": "19700101"},
        {"StudyTime": "101500.123456", "StudyDate": "20240229"},
        {"AcquisitionDateTime": "20240102101500.5+0100"},
        {"PatientWeight": "1.5e1", "PatientSize": " 1.70"},
        {"PatientComments": "first line\r\nsecond line"},
        {"PatientOrientation": ["A", "FL"], "Laterality": "R"},
        {"OtherPatientIDsSequence": [_dataset(PatientID="P2", TypeOfPatientID="TEXT")]},
    ],
    ids=lambda a: ",".join(a),
)
def test_valid_values_are_kept(attributes):
    checked = usable_source(_dataset(**attributes))
    assert checked.findings == ()
    for keyword in attributes:
        assert keyword in checked.dataset


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("PatientName", "a^b^c^d^e^f"),
        ("AcquisitionDateTime", "20241301"),
        ("PatientAge", "54Y"),
        ("PatientWeight", "nan"),
        ("InstitutionAddress", "x" * 1025),
        ("StudyInstanceUID", "1.2."),
    ],
)
def test_the_vr_checks_refuse(keyword, value):
    checked = usable_source(_dataset(**{keyword: value}))
    assert [f.keyword for f in checked.findings] == [keyword]


def test_a_malformed_sequence_is_left_out_whole():
    bad = _dataset(ReferencedSOPInstanceUID=f"1.2.{CANARY}", ReferencedSOPClassUID="1.2.3")
    checked = usable_source(_dataset(ReferencedStudySequence=[bad]))
    assert checked.findings == (Finding("ReferencedStudySequence", "left out"),)
    assert "ReferencedStudySequence" not in checked.dataset
