"""Fixtures of the deploy/ tests: a copy of deploy/ with its secrets written by deploy/make-secrets, and each overlay rendered by ``kubectl kustomize`` offline (``tests.support.kube``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kube import DEPLOY, NAMESPACE, OVERLAYS, kustomize


@pytest.fixture(scope="session")
def deploy_copy(tmp_path_factory) -> Path:
    """deploy/ copied, with the secrets make-secrets writes (throwaway values), never in the repository."""
    folder = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(DEPLOY, folder, ignore=shutil.ignore_patterns("*.env", "*.crt", "*.key"))
    out = subprocess.run(["bash", str(folder / "make-secrets"), NAMESPACE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return folder


@pytest.fixture(scope="session")
def rendered(deploy_copy) -> dict[str, list[dict[str, Any]]]:
    """{overlay: its objects}, as ``kubectl kustomize deploy/overlays/<overlay>`` renders them."""
    out = {}
    for overlay in OVERLAYS:
        built = kustomize(deploy_copy / "overlays" / overlay)
        assert built.returncode == 0, f"kubectl kustomize overlays/{overlay}:\n{built.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    return out
