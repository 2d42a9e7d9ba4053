"""The API process never imports torch (it would cost seconds of start-up and gigabytes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def torch_free_modules() -> list[str]:
    """The modules the import contract names as torch-free (pyproject.toml), so this test and
    the contract cannot drift apart."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if "never imports torch" in c["name"]]
    return contract["source_modules"]


def test_the_service_never_imports_torch(service_models, tmp_path):
    modules = torch_free_modules()
    assert {"service", "jobs", "pacs", "aex.serve"} <= set(modules)
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        from fastapi.testclient import TestClient
        from jobs.settings import Settings
        from service.app import create_app
        for name in {modules!r}:
            module = importlib.import_module(name)
            for sub in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
                importlib.import_module(sub.name)
        import aex.cli
        from jobs.crypto import generate_data_key
        app = create_app(Settings(redis_url="unix://{tmp_path}/none.sock", model_dirs=["{service_models}"],
                                  bundled_models=False, data_key=generate_data_key()))
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/openapi.json").status_code == 200
        heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision")))
        print("HEAVY", heavy)
        sys.exit(1 if heavy else 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout
