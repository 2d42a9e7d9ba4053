"""dicom3tools' dciodvfy as the tests run it: the "Error" lines it prints for one DICOM file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.require import required, tool

INSTALL = "Debian package dicom3tools; scripts/test.sh installs it as root"
SKIP_REASON = f"dciodvfy is not installed ({INSTALL})"


def have_dciodvfy() -> bool:
    """Whether dciodvfy is installed, for a test that checks with pydicom anyway; under
    ``AEX_REQUIRE_ALL=1`` its absence fails the test (``tests.support.require``)."""
    if shutil.which("dciodvfy") is None and required():
        tool("dciodvfy", INSTALL)
    return shutil.which("dciodvfy") is not None


def require_dciodvfy() -> None:
    """Skip the calling test when dciodvfy is absent (fail under ``AEX_REQUIRE_ALL=1``)."""
    tool("dciodvfy", INSTALL)


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
