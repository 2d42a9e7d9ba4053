"""Where a test may skip: for hardware CI does not have (CUDA) only; a missing tool, service, data file or package skips elsewhere and fails under ``AEX_REQUIRE_ALL=1``, which ``.ci/run`` sets.

Every skip of the suite goes through this module (``tests/test_suite.py`` checks that no test
calls ``pytest.skip``, ``skipif`` or ``importorskip`` itself), so CI cannot pass with a
PACS, viewer, DICOM-validation or multi-host test skipped: there a missing part is a failure
that names it. An import that fails for any reason but the package's absence is never a skip.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

SWITCH = "AEX_REQUIRE_ALL"


def required() -> bool:
    """Whether a missing part fails instead of skipping (``AEX_REQUIRE_ALL=1``, set by .ci/run)."""
    return os.environ.get(SWITCH, "") == "1"


def missing(reason: str) -> NoReturn:
    """Skip the calling test with ``reason``, or fail with it under ``AEX_REQUIRE_ALL=1``."""
    if required():
        pytest.fail(f"{reason} ({SWITCH}=1, set by .ci/run: this test may not skip)", pytrace=False)
    pytest.skip(reason)


def tool(name: str, install: str) -> str:
    """The path of program ``name`` on PATH, else ``missing`` saying how to ``install`` it."""
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed ({install})")
    return found


def data_file(path: Path, what: str) -> Path:
    """``path`` when it exists (a file or a folder), else ``missing`` naming ``what`` it is."""
    if not Path(path).exists():
        missing(f"{what} is absent: {path}")
    return Path(path)


def package(name: str, install: str = "pip install -c constraints.txt -e '.[test]'") -> ModuleType:
    """Module ``name``, imported; ``missing`` only when the package is not installed at all (an
    error inside it fails the test as any other error)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
            raise
        missing(f"the package {exc.name} is not installed ({install})")


def cuda():
    """A mark that skips a test on a machine without a CUDA device: the one skip CI allows
    (its machines have no GPU), said in the reason."""
    import torch

    return pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (hardware CI does not have: the only skip allowed)"
    )
