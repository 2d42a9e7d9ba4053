"""The source's attributes that derived DICOM objects copy, checked one at a time: a malformed value is left out or emptied, and named, never quoted.

A derived object (Parametric Map, Secondary Capture, SR) copies the source's patient, study,
equipment and series identification: highdicom copies the Patient and Study modules (every
root attribute of them) and the acquisition equipment; our code passes on the body part and laterality
(``anatomy``), Patient Orientation, the Frame of Reference and the UIDs that reference the source. Any of those may
be malformed in a file a PACS accepted (a sex "MALE", a birth date "1990-13-45", an age "45",
an accession number of 40 characters, a name with six "^" components, a UID with letters),
and highdicom then refuses to build the object, or builds one that ``dciodvfy`` refuses and
a PACS may not take.

``usable_source`` checks every top-level element of a copy of the source, generically
(``vr.element_ok``): the element's value must be readable, its VR the one the data dictionary
gives its tag, its value multiplicity within the dictionary's, each value valid for its VR
(PS3.5 6.2: length, characters, format, real dates and times, numbers in range, at most three
Person Name groups of at most five components), its text within the declared Specific
Character Set (the default repertoire when none is declared), and, for the attributes with
enumerated values in the outputs (``ENUMERATED``: Patient's Sex M/F/O, ...), one of those
values; a sequence is malformed when anything in it is. Nothing is repaired by guessing. A
malformed attribute is:

- emptied when the outputs need it present (Type 2 there: ``TYPE2``, such as Patient's Birth
  Date, Patient's Sex, Study Date, Accession Number, Referring Physician's Name);
- replaced when it is one of the three UIDs by which the outputs say where they belong and
  what they derive from (``IDENTITY_UIDS``: Study, Series and SOP Instance UID, Type 1 in every
  output). A malformed UID cannot be written into a valid object and cannot be mended
  without guessing, so it is replaced by a UID derived from it (``uids.unusable_uid``: the
  same malformed value always gives the same UID, so every object of the source, and a
  re-run, agree; a re-store replaces instead of duplicating). The price is said in the
  warning: with a malformed Study Instance UID the outputs form a study of their own (the
  same patient attributes), since keeping the source's study would mean writing the
  malformed UID into them; a malformed Series or SOP Instance UID leaves the outputs in the
  source's study, referencing the source by the derived UID. An empty one is treated alike.
  An instance's own UID (or an empty one) is derived from the source's pixel data as well,
  so two sources never share one;
- the SOP Class UID, which must name a real class, is taken from the file's own Media Storage
  SOP Class UID when that one is valid (the same file's statement, not a guess); otherwise
  no object can reference the source, and ``UnusableSourceError`` names it;
- left out otherwise (Type 3, or not an attribute the outputs carry).

A valid but empty patient or study attribute that is not Type 2 in the outputs (an empty
Patient's Size, Additional Patient History) is left out without a warning: it says nothing,
and a derived object carries no Type 3 attribute empty.

Each attribute so handled gives one warning naming its keyword ("PatientBirthDate was
malformed and left empty in the DICOM outputs"); its value is never quoted: it may be
patient data. Warnings are given for standard attributes the outputs carry or pass on;
other malformed elements (private ones, acquisition parameters the outputs never copy) are
left out of the copy without one, so they cannot reach highdicom either. Attributes our code
reads as numbers and writes anew (the plane geometry, ``REDERIVED``) are checked where they
are read (``parametric_map.geometry_source``) and are not judged here as text.
"""

from __future__ import annotations

import copy
import hashlib
import re
import warnings
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from models.dicom.uids import unusable_uid
from models.dicom.vr import UID, declared_encodings, element_ok, text_of

PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Type 2 in every derived object (Patient, General Study, Patient Study, Clinical Trial, General
# Equipment, Frame of Reference, General Series and General Image modules; 2C where the
# source's having it meets the condition): a malformed value is emptied, not left out.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PatientSexNeutered",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialTimePointID",
    "Manufacturer",
    "PositionReferenceIndicator",
    "PatientOrientation",
)
# Type 2 patient and study attributes every derived object carries: added empty when absent.
TYPE2_IDENTIFIERS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
IDENTITY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Read as numbers and written anew by our code (the Parametric Map's plane geometry), never
# copied as text: checked where they are read.
REDERIVED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness")

# Enumerated values (PS3.3) of attributes the outputs copy; a value outside them is malformed.
ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),
    "PregnancyStatus": frozenset({"1", "2", "3", "4"}),
    "LongitudinalTemporalEventType": frozenset({"ENROLLMENT", "BASELINE"}),
    "Laterality": frozenset({"R", "L"}),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
}
# Patient Orientation (PS3.3 C.7.6.1.1.1): each value a run of direction letters, biped or quadruped.
_ORIENTATION = re.compile(r"(?:A|P|R|L|H|F|LE|RT|D|V|CR|CD|M|PR|DI|PA|PL)+")

# The equipment attributes highdicom copies from the source into the Contributing Equipment
# Sequence, and those our code reads: malformed ones are warned about like the modules'.
PASSED_ON = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "SpecificCharacterSet",
    "SOPClassUID",
    "SeriesNumber",
    "FrameOfReferenceUID",
    "DeidentificationMethod",
)


class UnusableSourceError(ValueError):
    """The source cannot be referenced by a valid object (its message names the attribute only)."""


@dataclass(frozen=True)
class Finding:
    """One malformed attribute of the source and what the outputs do instead."""

    keyword: str
    action: str  # "emptied", "left out", "replaced" or "from file meta"

    @property
    def message(self) -> str:
        """The warning: the keyword and the consequence, never the value."""
        if self.action == "emptied":
            return f"{self.keyword} was malformed and left empty in the DICOM outputs"
        if self.action == "replaced" and self.keyword == "StudyInstanceUID":
            return (
                "StudyInstanceUID was malformed and is not usable: the DICOM outputs carry a UID derived "
                "from it, so they form a study of their own instead of joining the source's"
            )
        if self.action == "replaced":
            return (
                f"{self.keyword} was malformed and is not usable: the DICOM outputs reference the source "
                "by a UID derived from it"
            )
        if self.action == "from file meta":
            return (
                "SOPClassUID was malformed: the DICOM outputs reference the source's class by its file "
                "meta's MediaStorageSOPClassUID"
            )
        return f"{self.keyword} was malformed and left out of the DICOM outputs"


@dataclass(frozen=True)
class UsableSource:
    """A copy of the source (no pixel data) whose every attribute is valid, and what was done to get it."""

    dataset: Dataset
    findings: tuple[Finding, ...]

    @property
    def warnings(self) -> list[str]:
        """The findings as the job's warnings (keywords, never values)."""
        return [f.message for f in self.findings]


# The root attributes of the Patient and Clinical Trial Subject modules (the Patient IE) and of
# the General Study, Patient Study and Clinical Trial Study modules (the Study IE; PS3.3
# C.7.1.1, C.7.1.3, C.7.2.1, C.7.2.2, C.7.2.3): highdicom copies each one the source has into
# the Parametric Map and the SR.
MODULES: dict[str, frozenset[str]] = {
    "Patient": frozenset(
        {
            # Patient
            "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
            "IssuerOfPatientIDQualifiersSequence", "SourcePatientGroupIdentificationSequence",
            "GroupOfPatientsIdentificationSequence", "PatientBirthDate", "PatientBirthTime",
            "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
            "PatientAlternativeCalendar", "PatientSex", "QualityControlSubject", "StrainDescription",
            "StrainNomenclature", "StrainStockSequence", "StrainAdditionalInformation", "StrainCodeSequence",
            "GeneticModificationsSequence", "OtherPatientNames", "OtherPatientIDsSequence",
            "ReferencedPatientPhotoSequence", "EthnicGroupCodeSequence", "PatientSpeciesDescription",
            "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
            "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
            "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
            "DeidentificationMethodCodeSequence",
            # Clinical Trial Subject
            "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
            "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence", "ClinicalTrialSiteID",
            "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID", "ClinicalTrialSubjectID",
            "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
            "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
            "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
        }
    ),
    "Study": frozenset(
        {
            # General Study
            "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence",
            "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
            "ConsultingPhysicianIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
            "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
            "PhysiciansReadingStudyIdentificationSequence", "ReferencedStudySequence", "StudyInstanceUID",
            "StudyID", "RequestingService", "RequestingServiceCodeSequence",
            "ReasonForPerformedProcedureCodeSequence",
            # Patient Study
            "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
            "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
            "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus",
            "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered",
            "ReasonForVisit", "ReasonForVisitCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence",
            "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence", "PatientState",
            # Clinical Trial Study
            "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
            "LongitudinalTemporalEventType", "ClinicalTrialTimePointTypeCodeSequence",
            "IssuerOfClinicalTrialTimePointID", "ConsentForClinicalTrialUseSequence",
        }
    ),
}  # fmt: skip
# The patient and study attributes highdicom copies that are not Type 2 in the outputs: an
# empty one is left out (a derived object carries no Type 3 attribute empty).
COPIED_TYPE3 = (MODULES["Patient"] | MODULES["Study"]) - frozenset(TYPE2) - frozenset(IDENTITY_UIDS)
# The standard attributes the outputs carry or pass on: a malformed one is reported.
CARRIED = (
    MODULES["Patient"]
    | MODULES["Study"]
    | frozenset(TYPE2)
    | frozenset(IDENTITY_UIDS)
    | frozenset(PASSED_ON)
    | frozenset(ENUMERATED)
)


# --- the copy ----------------------------------------------------------------------------------


def _values_ok(keyword: str, values: list) -> bool:
    """Attribute-specific rules: enumerated values, Patient Orientation's letters."""
    if keyword in ENUMERATED:
        return all(text_of(v).strip() in ENUMERATED[keyword] for v in values)
    if keyword == "PatientOrientation":
        return all(_ORIENTATION.fullmatch(text_of(v).strip()) for v in values)
    return True


def usable_source(source: Dataset) -> UsableSource:
    """A copy of ``source`` (without its pixel data) every attribute of which is valid, and the
    findings (see the module's docstring); the source itself is left as it is. Those of
    ``TYPE2_IDENTIFIERS`` the source lacks are added empty, and a source whose identity was
    removed without saying how gets a De-identification Method that says so. Raises
    ``UnusableSourceError`` when the source's SOP Class UID is malformed and its file meta has
    no valid one either."""
    ref = Dataset()
    ref.file_meta = copy.deepcopy(getattr(source, "file_meta", Dataset()))
    findings: list[Finding] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote values
        encodings, charset_ok = declared_encodings(source)
        for tag in list(source.keys()):
            if keyword_for_tag(tag) in PIXEL_DATA:
                continue  # never copied (and never deep-copied: up to 100 MB)
            try:
                elem = copy.deepcopy(source[tag])
            except Exception:  # not even readable: left out
                _note(findings, keyword_for_tag(tag), "left out")
                continue
            keyword = elem.keyword
            if keyword == "SpecificCharacterSet":
                ok = charset_ok
            else:
                ok = keyword in REDERIVED or element_ok(elem, encodings, _values_ok)
            if keyword in (*IDENTITY_UIDS, "SOPClassUID") and ok:
                ok = bool(str(elem.value or "").strip())  # Type 1: empty is as unusable as malformed
            if ok and keyword in COPIED_TYPE3 and elem.is_empty:
                continue  # says nothing, and an output may not carry a Type 3 attribute empty
            if ok:
                ref.add(elem)
            elif keyword in IDENTITY_UIDS:
                ref.add_new(tag, "UI", _replacement(source, keyword, elem))
                findings.append(Finding(keyword, "replaced"))
            elif keyword == "SOPClassUID":
                ref.SOPClassUID = _class_from_meta(source)
                findings.append(Finding(keyword, "from file meta"))
            elif keyword in TYPE2:
                vr = dictionary_VR(tag).split(" or ")[0]
                ref.add_new(tag, vr, [] if vr == "SQ" else "")
                _note(findings, keyword, "emptied")
            else:
                _note(findings, keyword, "left out")
    for keyword in TYPE2_IDENTIFIERS:
        if keyword not in ref:
            setattr(ref, keyword, "")
    if str(ref.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
        "DeidentificationMethod" in ref or "DeidentificationMethodCodeSequence" in ref
    ):
        ref.DeidentificationMethod = "not stated by the source"  # Type 1C once identity is removed
    return UsableSource(ref, tuple(findings))


def _note(findings: list[Finding], keyword: str, action: str) -> None:
    if keyword in CARRIED:
        findings.append(Finding(keyword, action))


def _raw(elem: DataElement) -> str:
    """A UID element's value as text, for deriving its replacement (never shown)."""
    try:
        return text_of(elem.value or "")
    except Exception:
        return repr(elem.value)


def _replacement(source: Dataset, keyword: str, elem: DataElement) -> str:
    """The UID that stands for a malformed (or empty) identity UID: derived from its value, so
    the instances of one study or series still share theirs; an instance's own, or an empty
    value, also from the source's pixel data, so two sources never share one."""
    value = _raw(elem)
    material = {"value": value}
    if keyword == "SOPInstanceUID" or not value.strip():
        digest = hashlib.sha256()
        for name in PIXEL_DATA:
            if name in source:
                digest.update(bytes(source[name].value or b""))
        material["pixel_data_sha256"] = digest.hexdigest()
    return unusable_uid(keyword, material)


def _class_from_meta(source: Dataset) -> str:
    meta = getattr(source, "file_meta", None)
    try:
        value = str(meta.MediaStorageSOPClassUID) if meta is not None else ""
    except Exception:
        value = ""
    if not (UID.fullmatch(value) and len(value) <= 64):
        raise UnusableSourceError(
            "SOPClassUID is malformed and the file meta has no valid MediaStorageSOPClassUID: no derived object "
            "can reference the source"
        )
    return value
