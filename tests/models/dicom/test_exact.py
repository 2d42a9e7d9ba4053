"""Exact objects: the same source, checkpoint and parameters give byte-identical DICOM objects, in another process and at another time; dates come from the source, never the clock."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.dicom.dates import CLOCK_ATTRIBUTES, NO_SOURCE_DATE, content_date_time
from tests.models.dicom.test_sr import derived
from tests.support.dciodvfy import check_with_dciodvfy, require_dciodvfy

REPO = Path(__file__).resolve().parents[3]
# Builds every object of one explanation of the source file argv[1] (the fixed summary, map
# and pictures of test_sr) into the folder argv[2], one file each.
BUILD = """
import sys
from pathlib import Path
import pydicom
from tests.models.dicom.test_sr import derived
out = Path(sys.argv[2])
for obj in derived(pydicom.dcmread(sys.argv[1])).objects:
    (out / obj.name).write_bytes(obj.data)
"""


def dx(dicom_file, **attributes) -> pydicom.Dataset:
    """A 64 x 80 DX-like source with the given attributes set (None: left out)."""
    pixels = (np.mgrid[0:64, 0:80].sum(0) * 40).clip(0, 4095).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(dicom_file(pixels, "MONOCHROME2", 1.0, 0.0, (2048.0, 4096.0))))
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def build_in_a_process(source: Path, out: Path) -> dict[str, bytes]:
    out.mkdir()
    subprocess.run([sys.executable, "-c", BUILD, str(source), str(out)], cwd=REPO, check=True, timeout=300)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def every_element(ds: pydicom.Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from every_element(item)


def test_two_processes_a_second_apart_write_the_same_bytes(tmp_path, dicom_file):
    source = tmp_path / "source.dcm"
    dx(dicom_file, ContentDate="20240102", ContentTime="101733").save_as(source, enforce_file_format=True)
    first = build_in_a_process(source, tmp_path / "first")
    time.sleep(1.5)  # the clock's second differs: any date or time taken from it shows
    second = build_in_a_process(source, tmp_path / "second")
    assert len(first) >= 5 and set(first) == set(second)
    assert "report_pdf.dcm" in first  # the Encapsulated PDF report too
    for name in first:
        assert first[name] == second[name], name


def test_dates_come_from_the_source_and_nothing_records_the_clock(dicom_file):
    source = dx(dicom_file, ContentDate="20240102", ContentTime="101733", SeriesDate="20240103")
    today = time.strftime("%Y%m%d")
    for obj in derived(source).objects:
        ds = pydicom.dcmread(io.BytesIO(obj.data))
        assert (ds.get("ContentDate"), ds.get("ContentTime")) in (("20240102", "101733"), (None, None)), obj.name
        for elem in every_element(ds):
            assert elem.keyword not in (*CLOCK_ATTRIBUTES, "ContributionDateTime"), (obj.name, elem.keyword)
            if elem.VR in ("DA", "DT") and elem.value:
                assert not str(elem.value).startswith(today), (obj.name, elem.keyword)
        if obj.role in ("structured_report", "report_pdf"):
            assert (ds.ContentDate, ds.ContentTime) == ("20240102", "101733")
        if obj.role == "gradcam_parametric_map":
            uids = {item.DimensionOrganizationUID for item in ds.DimensionOrganizationSequence}
            assert uids == {item.DimensionOrganizationUID for item in ds.DimensionIndexSequence}
            assert all(uid.startswith("2.25.") for uid in uids)  # derived, not highdicom's random one


@pytest.mark.parametrize(
    "attributes, expected",
    [
        ({"ContentDate": "20240102", "ContentTime": "101733", "StudyDate": "20230101"}, ("20240102", "101733")),
        ({"ContentDate": "20240102", "ContentTime": None, "StudyDate": "20230101"}, ("20230101", "101500")),
        ({"ContentDate": None, "SeriesDate": "20240105", "StudyTime": None}, ("20240105", "")),
        ({"ContentDate": None, "StudyDate": "20240101", "StudyTime": "0930"}, ("20240101", "0930")),
        ({"ContentDate": None, "StudyDate": None, "StudyTime": "0930"}, ("", "")),
    ],
)
def test_content_date_is_the_sources_first_dated_pair(dicom_file, attributes, expected):
    source = dx(dicom_file, **attributes)  # its Study Date and Time: 20240102 101500 unless set
    assert content_date_time(source) == expected
    date, time_of_day = expected
    required = (date, time_of_day or "000000") if date else NO_SOURCE_DATE  # Type 1 in the SR and the map
    assert content_date_time(source, required=True) == required


def test_a_source_without_any_date_gives_valid_identical_objects(tmp_path, dicom_file):
    require_dciodvfy()
    source = dx(dicom_file, ContentDate=None, ContentTime=None, StudyDate=None, StudyTime=None)
    first, second = derived(source).objects, derived(source).objects
    assert [o.data for o in first] == [o.data for o in second]
    sr = pydicom.dcmread(io.BytesIO(first[-1].data))
    assert (sr.ContentDate, sr.ContentTime) == NO_SOURCE_DATE  # Type 1 in an SR: "unknown", not the clock
    assert check_with_dciodvfy(tmp_path, {o.name: o.data for o in first}) == {}
