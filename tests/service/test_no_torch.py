"""The API process never imports torch (it would cost seconds of start-up and gigabytes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_service_never_imports_torch(service_models, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        from worker.settings import Settings
        from service.app import create_app
        import aex.serve, worker.pool, worker.protocol, models, models.imaging, models.catalogue
        import aex.cli
        app = create_app(Settings(redis_url="unix://{tmp_path}/none.sock", model_dirs=["{service_models}"],
                                  bundled_models=False))
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
