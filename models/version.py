"""The version of aex: one home, read by the package metadata, provenance and DICOM outputs."""

__version__ = "0.1.0"
