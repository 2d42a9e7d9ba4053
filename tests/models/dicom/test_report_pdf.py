"""The Encapsulated PDF report: its words, a PDF whose cross-reference table points at its objects, a DICOM object dciodvfy accepts, the same bytes on a re-run."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest

from models.dicom.equipment import Provenance
from models.dicom.report_pdf import MAX_LINES, WRAP, pdf_document, report_lines, report_pdf
from models.dicom.secondary_capture import part10
from models.dicom.uids import result_uids
from tests.support.dciodvfy import dciodvfy_report, require_dciodvfy
from tests.support.dicom import xray

SHA = "0e71a08bd2cdaac6562b952451cf1c3a8c497dfeaad3cd172704f565f7f214c6"
SUMMARY = {
    "predicted": {"class_index": 1, "class_name": "pneumonia", "prob": 0.79204},
    "probs": {"normal": 0.20796, "pneumonia": 0.79204},
    "gradcam": {"layer": "pipe.5", "class_index": 1},
    "stability": {
        "summary": "this decision is more stable than 64% (decision flip) and 71% (no better than chance) "
        "of the 100 evaluation images of the checkpoint"
    },
}


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(xray(np.full((64, 48), 1000, np.uint16), study_uid="1.2.3.4")))


def build(source, parameters=None, summary=SUMMARY) -> pydicom.Dataset:
    uid = result_uids(str(source.SOPInstanceUID), SHA, parameters or {"rho": 0.1})
    return report_pdf(source, summary, Provenance("pneumonia-robust", SHA), uid, input_size=28)


def pdf_of(ds: pydicom.Dataset) -> bytes:
    return bytes(ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength])


def shown_text(pdf: bytes) -> str:
    """The text the page's content stream shows (its literal strings, unescaped, joined)."""
    stream = pdf.split(b"stream\n", 1)[1].split(b"\nendstream", 1)[0].decode("latin-1")
    strings = re.findall(r"\(((?:\\.|[^\\)])*)\)", stream)
    return " ".join(re.sub(r"\\(.)", r"\1", s) for s in strings)


def test_the_report_says_the_findings_in_words():
    lines = report_lines(SUMMARY, Provenance("pneumonia-robust", SHA), input_size=28)
    text = " ".join(lines)
    assert "Predicted class: pneumonia, probability 79.2 %." in text
    assert "normal 20.8 %, pneumonia 79.2 %" in text
    assert "Stability: this decision is more stable than 64% (decision flip)" in text
    assert "drives the class pneumonia" in text
    assert f"Model: pneumonia-robust, checkpoint sha256 {SHA}" in text and "28 x 28 pixels" in text
    assert lines[-1].startswith("NOT FOR DIAGNOSTIC USE")
    # Without a stability figure or an input size the report says less, never something wrong.
    bare = " ".join(report_lines({**SUMMARY, "stability": None}, Provenance("m", SHA)))
    assert "Stability" not in bare and "pixels" not in bare


def test_the_pdf_is_one_page_whose_xref_points_at_its_objects():
    pdf = pdf_document("Title (1)", ["a \\ back(slash) paragraph " * 10, "", "héllo → world"])
    assert pdf.startswith(b"%PDF-1.4\n") and pdf.endswith(b"%%EOF\n")
    startxref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
    table = pdf[startxref:].split(b"trailer")[0].decode().split("\n")
    assert table[0] == "xref"
    count = int(table[1].split()[1])
    offsets = [int(row.split()[0]) for row in table[3 : 2 + count]]
    for number, offset in enumerate(offsets, start=1):
        assert pdf[offset:].startswith(f"{number} 0 obj\n".encode())
    assert pdf.count(b"/Type /Page ") == 1
    length = int(re.search(rb"<< /Length (\d+) >>\nstream\n", pdf).group(1))
    stream = pdf.split(b"stream\n", 1)[1]
    assert stream[length:].startswith(b"\nendstream")
    text = shown_text(pdf)
    assert "Title (1)" in text and "a \\ back(slash) paragraph" in text
    assert "héllo ? world" in text  # Latin-1 kept, the rest "?"
    shown = re.findall(r"\(((?:\\.|[^\\)])*)\) Tj T\*", pdf.decode("latin-1"))
    assert all(len(re.sub(r"\\(.)", r"\1", line)) <= WRAP for line in shown)
    # A report longer than the page is cut at the page's last line.
    long = pdf_document("t", [f"line {i}" for i in range(3 * MAX_LINES)])
    assert shown_text(long).split()[-1] == str(MAX_LINES - 1)


def test_the_dicom_object_is_an_encapsulated_pdf_in_the_source_study(source):
    ds = build(source)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.Modality == "DOC"
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.PatientName, ds.PatientID, ds.AccessionNumber) == (
        source.PatientName,
        source.PatientID,
        source.AccessionNumber,
    )
    assert ds.SeriesDescription == "aex pneumonia-robust report, not for diagnostic use"
    assert ds.SeriesNumber == source.SeriesNumber + 903
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf" and ds.BurnedInAnnotation == "YES"
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (ds.ContentDate, ds.ContentTime) == (source.StudyDate, source.StudyTime)
    assert "InstanceCreationDate" not in ds and "InstanceCreationTime" not in ds
    assert len(ds.EncapsulatedDocument) % 2 == 0 and len(ds.EncapsulatedDocument) - ds.EncapsulatedDocumentLength in (
        0,
        1,
    )
    pdf = pdf_of(ds)
    assert pdf.startswith(b"%PDF-") and pdf.endswith(b"%%EOF\n")
    assert "probability 79.2 %" in shown_text(pdf) and "NOT FOR DIAGNOSTIC USE" in shown_text(pdf)
    again = pydicom.dcmread(io.BytesIO(part10(ds)))
    assert pdf_of(again) == pdf


def test_a_rerun_gives_the_same_bytes_and_other_parameters_other_uids(source):
    first, again = part10(build(source)), part10(build(source))
    assert first == again
    other = build(source, parameters={"rho": 0.2})
    assert other.SOPInstanceUID != pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID
    assert other.SeriesInstanceUID != pydicom.dcmread(io.BytesIO(first)).SeriesInstanceUID


def test_dciodvfy_finds_neither_errors_nor_warnings(source, tmp_path):
    require_dciodvfy()
    path = tmp_path / "report.dcm"
    path.write_bytes(part10(build(source)))
    assert dciodvfy_report(path) == []
