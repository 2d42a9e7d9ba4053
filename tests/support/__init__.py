"""Builders the tests share: tiny checkpoints, images, DICOM files, test stacks (settings, worker processes, uvicorn), Orthanc, OHIF, network namespaces, tokens, hostile and malformed inputs, and where a test may skip (``require``).

Plain functions and classes, no fixtures: the fixtures that hand them to tests live in the
``conftest.py`` files. ``REPO_ROOT`` is the repository's root folder.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The shared data sets and reference checkpoints: AEX_SHARED_DATA, else ../shared/data
    beside the repository."""
    return Path(os.environ.get("AEX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
