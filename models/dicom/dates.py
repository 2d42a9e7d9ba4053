"""The dates and times a derived DICOM object carries: taken from its source, never from the clock, so a re-run gives the same bytes.

A derived object's Content Date and Time are those of the content it was computed from: the
source's Content Date/Time, else its Acquisition, Series or Study Date/Time, the first pair
with both a date and a time, else the first date alone. Nothing records when aex ran: Instance
Creation Date/Time (SOP Common, Type 3), Date/Time of Secondary Capture (SC Image, Type 3) and
each Contributing Equipment item's Contribution DateTime (Type 3), which highdicom stamps from
the clock, are left out; when a job ran is in its job record (``provenance.computed_at``), not
in the objects. A re-run of the same source, checkpoint and parameters therefore writes the
very same bytes under the same UIDs (``uids.result_uids``), as a PACS that checks checksums or
overwrites expects.

The SR and the Parametric Map must carry a Content Date and Time (Type 1): from a source with
a date but no time they get that date at 00:00, from a source with no date at all the fixed
``NO_SOURCE_DATE`` (1900-01-01 00:00), which says "unknown" rather than inventing a moment and
keeps the bytes the same too.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

# (date keyword, time keyword) of the source, in the order a derived object's content date is
# taken from: the image's own content first, the study's last.
SOURCE_DATES = (
    ("ContentDate", "ContentTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("SeriesDate", "SeriesTime"),
    ("StudyDate", "StudyTime"),
)
NO_SOURCE_DATE = ("19000101", "000000")
# Type 3 attributes highdicom fills in from the clock.
CLOCK_ATTRIBUTES = ("InstanceCreationDate", "InstanceCreationTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture")


def content_date_time(source: Dataset, required: bool = False) -> tuple[str, str]:
    """(DA, TM) of a derived object's Content Date and Time (see the module's docstring): the
    source's first pair of ``SOURCE_DATES`` with both a date and a time, else its first date
    with an empty time ("000000", midnight, where the object needs a time: ``required``), else
    ("", "") or, where required (an SR, a Parametric Map: Type 1), ``NO_SOURCE_DATE``."""
    pairs = [
        (str(source.get(date_keyword) or "").strip(), str(source.get(time_keyword) or "").strip())
        for date_keyword, time_keyword in SOURCE_DATES
    ]
    for date, time in pairs:
        if date and time:
            return date, time
    for date, _time in pairs:
        if date:
            return date, NO_SOURCE_DATE[1] if required else ""
    return NO_SOURCE_DATE if required else ("", "")


def dated_by_source(ds: Dataset, source: Dataset, required: bool = False) -> Dataset:
    """``ds`` (a derived object highdicom built) dated by its source, in place: its Content Date
    and Time (where its IOD has them: highdicom wrote them, from the clock) replaced by
    ``content_date_time(source, required)``, and every attribute highdicom stamps from the
    clock (``CLOCK_ATTRIBUTES``, each Contributing Equipment item's Contribution DateTime) left
    out. Returned for chaining."""
    date, time = content_date_time(source, required)
    if "ContentDate" in ds:
        ds.ContentDate = date
    if "ContentTime" in ds:
        ds.ContentTime = time
    for keyword in CLOCK_ATTRIBUTES:
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return ds
