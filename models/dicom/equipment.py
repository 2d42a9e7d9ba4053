"""Who made a derived DICOM object: the served model as IHE AI Results-style equipment, and the series' wording."""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.dicom.uids import device_uid
from models.version import __version__

MANUFACTURER = "aex"
NOT_FOR_DIAGNOSIS = "not for diagnostic use"


def _lo(text: str) -> str:
    """A value for an LO attribute: at most 64 characters, no backslash (the VM separator)."""
    return str(text).replace("\\", "/")[:64]


@dataclass(frozen=True)
class Provenance:
    """The served model an object comes from: its name (Manufacturer's Model Name), the sha256 of
    its checkpoint file (the Device UID is derived from it) and the aex version."""

    model_name: str
    checkpoint_sha256: str
    software_version: str = __version__

    @property
    def device_uid(self) -> str:
        return device_uid(self.checkpoint_sha256)

    @property
    def model(self) -> str:
        return _lo(self.model_name)

    def series_description(self, what: str) -> str:
        """``aex <model> <what>, not for diagnostic use`` within the 64 characters DICOM allows,
        the warning always kept whole."""
        tail = f", {NOT_FOR_DIAGNOSIS}"
        return f"aex {self.model_name} {what}"[: 64 - len(tail)].replace("\\", "/") + tail

    def contributing_equipment(self, description: str) -> hd.ContributingEquipment:
        """The Contributing Equipment Sequence item of IHE AI Results: Purpose of Reference
        (DCM 109102 "Processing Equipment", CID 7005), Manufacturer "aex", the model's name,
        the aex version and the Device UID (a standard attribute that PS3.3 lists in the
        General Equipment Module, carried here as a Standard Extended attribute, as IHE AIR
        asks)."""
        item = hd.ContributingEquipment(
            MANUFACTURER,
            codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model,
            software_versions=f"aex {self.software_version}",
            device_serial_number=self.checkpoint_sha256[:64],
            contribution_description=description[:1024],
        )
        item.DeviceUID = self.device_uid
        return item

    def stamp(self, ds: Dataset) -> None:
        """The General Equipment Module of an object aex creates: the same identification at
        the top level (Device UID included: Type 3 there)."""
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = self.model
        ds.SoftwareVersions = f"aex {self.software_version}"
        ds.DeviceSerialNumber = self.checkpoint_sha256[:64]
        ds.DeviceUID = self.device_uid
