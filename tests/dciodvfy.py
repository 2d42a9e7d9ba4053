"""dicom3tools' dciodvfy as the tests run it: the "Error" lines it prints for one DICOM file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SKIP_REASON = "dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)"


def have_dciodvfy() -> bool:
    return shutil.which("dciodvfy") is not None


def require_dciodvfy() -> None:
    """Skip the calling test when dciodvfy is absent."""
    if not have_dciodvfy():
        pytest.skip(SKIP_REASON)


def dciodvfy_report(path: Path | str) -> list[str]:
    """Every "Error" and "Warning" line dciodvfy prints for ``path``."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The "Error" lines dciodvfy prints for ``path`` (warnings left out)."""
    return [line for line in dciodvfy_report(path) if line.startswith("Error")]


def check_with_dciodvfy(folder: Path, objects: dict[str, bytes]) -> dict[str, list[str]]:
    """Write each ``name -> Part 10 bytes`` into ``folder`` and return the names whose file has
    dciodvfy errors, with those errors."""
    failures = {}
    for name, data in objects.items():
        path = folder / name
        path.write_bytes(data)
        errors = dciodvfy_errors(path)
        if errors:
            failures[name] = errors
    return failures
