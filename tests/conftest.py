"""Shared fixtures: where ../shared/data is, and skipping with a reason where it is not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("AEX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set AEX_SHARED_DATA or place ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def cifar_test_tar(shared_data: Path) -> Path:
    path = shared_data / "cifar10-jpeg" / "test.tar"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def pneumonia_npz(shared_data: Path) -> Path:
    path = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def reference_checkpoints(shared_data: Path) -> Path:
    path = shared_data / "reference-checkpoints"
    if not (path / "resnet44-robust.pt").is_file():
        pytest.skip(f"reference checkpoints are absent from {path}")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Data-set caches of tests go to a temporary folder, never the user's ~/.cache.
    monkeypatch.setenv("AEX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "aex-cache"))
