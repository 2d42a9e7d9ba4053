"""The explanation's findings as an Encapsulated PDF: a one-page report that a reader sees as text in viewers that do not display the SR.

OHIF 3.13 (its default mode) shows an Encapsulated PDF in the viewport with the browser's PDF
viewer, where it shows a TID 1500 SR without image regions as an empty viewport; most PACS
viewers display Encapsulated PDF too. The report says, in words: the predicted class and its
probability, every class's probability, the decision's stability statement, the class the
Grad-CAM map explains, the model (name, checkpoint sha256, aex version, input size) and that
the results are not for diagnostic use.

The PDF is written here (``pdf_document``: one A4 page, Helvetica, uncompressed, no dates), so
the same findings always give the same bytes, and the DICOM object's UIDs come from the
result's (``uids.result_uids``: roles "series/pdf" and "instance/pdf"), its dates from the
source: a re-run is byte-identical. Text outside Latin-1 (Helvetica's WinAnsi encoding) is
written as "?".
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from models.dicom.dates import content_date_time
from models.dicom.equipment import MANUFACTURER, NOT_FOR_DIAGNOSIS, Provenance
from models.dicom.uids import UidFor

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SERIES_OFFSET = 903  # the source's Series Number + this (the SR's is + 902)
TITLE = "aex explanation report"
# LOINC 18748-4 "Diagnostic imaging study": the kind of document (CID 7020's first entry).
DOCUMENT_KIND = ("18748-4", "LN", "Diagnostic imaging study")
WARNING = (
    f"{NOT_FOR_DIAGNOSIS.upper()}: computed by a research classifier; not verified by a physician and not a diagnosis."
)

PAGE_POINTS = (595, 842)  # A4, in points (1/72 inch)
MARGIN = 56
FONT_SIZE = 11
LEADING = 15
TITLE_SIZE = 16
# Characters per line: Helvetica's average width is about half its size, so this fits the
# text width (483 points at 11 points) with room for wide letters.
WRAP = 84
MAX_LINES = (PAGE_POINTS[1] - 2 * MARGIN - 2 * LEADING) // LEADING


def _percent(p: float) -> str:
    return f"{100.0 * float(p):.1f} %"


def report_lines(summary: Mapping[str, Any], provenance: Provenance, input_size: int | None = None) -> list[str]:
    """The report's text, one paragraph per entry (``pdf_document`` wraps them).

    summary: the explain summary (predicted, probs, gradcam, stability); input_size: the side of
    the square image the model reads, in pixels (said so a reader knows what it saw)."""
    predicted = summary["predicted"]
    lines = [
        f"Predicted class: {predicted['class_name']}, probability {_percent(predicted['prob'])}.",
        "Class probabilities: " + ", ".join(f"{name} {_percent(p)}" for name, p in summary["probs"].items()) + ".",
    ]
    stability = summary.get("stability") or {}
    if stability.get("summary"):
        lines.append(f"Stability: {stability['summary']}.")
    gradcam = summary.get("gradcam") or {}
    if "class_index" in gradcam:
        explained = list(summary["probs"])[gradcam["class_index"]]
        lines.append(f"The Grad-CAM map (Parametric Map series) shows where the image drives the class {explained}.")
    model = f"Model: {provenance.model_name}, checkpoint sha256 {provenance.checkpoint_sha256}, aex {provenance.software_version}"
    if input_size:
        model += f"; the model reads the image scaled to {input_size} x {input_size} pixels"
    lines += [model + ".", "", WARNING]
    return lines


def _latin1(text: str) -> str:
    return "".join(ch if ch.isprintable() and ord(ch) < 256 else "?" for ch in text)


def _pdf_string(text: str) -> str:
    """A PDF literal string of ``text`` (Latin-1, the three special characters escaped)."""
    escaped = _latin1(text).replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f"({escaped})"


def pdf_document(title: str, paragraphs: Sequence[str]) -> bytes:
    """One A4 page: ``title`` in bold, then each paragraph wrapped at ``WRAP`` characters (an
    empty one is a blank line); lines beyond the page are cut. Deterministic bytes: no dates,
    no document ID."""
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += textwrap.wrap(_latin1(paragraph), WRAP) or [""]
    lines = lines[:MAX_LINES]
    top = PAGE_POINTS[1] - MARGIN
    body = [f"BT /F2 {TITLE_SIZE} Tf {MARGIN} {top} Td {_pdf_string(title)} Tj ET"]
    body.append(f"BT /F1 {FONT_SIZE} Tf {LEADING} TL {MARGIN} {top - 2 * LEADING} Td")
    body += [f"{_pdf_string(line)} Tj T*" for line in lines]
    body.append("ET")
    stream = "\n".join(body).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_POINTS[0]} {PAGE_POINTS[1]}] "
            "/Resources << /Font << /F1 4 0 R /F2 5 0 R >> >> /Contents 6 0 R >>"
        ).encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>",
        f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream",
        f"<< /Title {_pdf_string(title)} /Producer (aex) >>".encode("latin-1"),
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")  # the binary comment marks the file as binary
    offsets = []
    for number, body_bytes in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body_bytes + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {len(objects)} 0 R >>\n".encode()
    out += f"startxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def encapsulated_pdf(source: Dataset, pdf: bytes, provenance: Provenance, uid: UidFor, title: str = TITLE) -> Dataset:
    """The Encapsulated PDF object of ``pdf`` in a new series (modality DOC) of ``source``'s study.

    source: the source as the derived objects copy it (checked by the caller, as
    ``results.explanation_objects`` does); it gives the patient and study modules, the dates
    (Content Date and Time: ``dates.content_date_time``, as the SR's) and the Source Instance Sequence.
    uid(role): "series/pdf", "instance/pdf". Conversion Type SYN, Burned In Annotation YES
    (the PDF names the findings, not the patient)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's warnings may quote source values
        ds = hd.SOPClass(
            study_instance_uid=str(source.StudyInstanceUID),
            series_instance_uid=uid("series/pdf"),
            series_number=int(source.get("SeriesNumber") or 0) + SERIES_OFFSET,
            sop_instance_uid=uid("instance/pdf"),
            sop_class_uid=ENCAPSULATED_PDF,
            instance_number=1,
            modality="DOC",
            manufacturer=MANUFACTURER,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        ds.copy_patient_and_study_information(source)
    # highdicom stamps the clock's date and time of creation (Type 3): left out, so a re-run
    # gives the same bytes.
    del ds.InstanceCreationDate, ds.InstanceCreationTime
    provenance.stamp(ds)
    ds.SeriesDescription = provenance.series_description("report")
    ds.ConversionType = "SYN"
    # The same Content Date and Time as the SR and the map (``dates``): the source's, never the clock's.
    ds.ContentDate, ds.ContentTime = content_date_time(source, required=True)
    ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = DicomSequence([_code(*DOCUMENT_KIND)])
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceInstanceSequence = DicomSequence([reference])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB values have even length: a PDF of odd length gets one padding byte, and the
    # Encapsulated Document Length says where the PDF ends.
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds


def report_pdf(
    source: Dataset,
    summary: Mapping[str, Any],
    provenance: Provenance,
    uid: UidFor,
    input_size: int | None = None,
) -> Dataset:
    """The Encapsulated PDF report of one explanation (``report_lines`` in ``pdf_document``)."""
    pdf = pdf_document(TITLE, report_lines(summary, provenance, input_size))
    return encapsulated_pdf(source, pdf, provenance, uid)
