"""Fixtures of the PACS tests: a real Orthanc with its DICOMweb plugin for the session, its AEX_PACS settings, PneumoniaMNIST X-rays as DX files, and a pynetdicom storage SCP (``tests.support.orthanc``, ``tests.support.dicom``)."""

from __future__ import annotations

import pytest

from tests.support.dicom import pneumonia_xrays as make_xrays
from tests.support.orthanc import start_orthanc, start_storage_scp


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A running Orthanc (DICOMweb plugin on) for the session; skips (fails under
    AEX_REQUIRE_ALL=1) when it is not installed."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pacs_settings(orthanc):
    """settings(**overrides, pacs_extra=...): Settings whose AEX_PACS names the Orthanc "orthanc"."""
    from jobs.settings import Settings

    def make(pacs_extra: dict | None = None, **overrides):
        return Settings(pacs={"orthanc": orthanc.endpoint(**(pacs_extra or {}))}, **overrides)

    return make


@pytest.fixture(scope="session")
def pneumonia_xrays(pneumonia_npz):
    """xrays(n, size=(rows, cols), study_uid=None, start=0) -> [Part 10 bytes]: PneumoniaMNIST
    test images upsampled to ``size`` and written as 16-bit DX X-rays."""
    return make_xrays(pneumonia_npz)


@pytest.fixture
def storage_scp():
    """A running pynetdicom storage SCP (every storage SOP class), stopped after the test."""
    scp = start_storage_scp()
    try:
        yield scp
    finally:
        scp.stop()
