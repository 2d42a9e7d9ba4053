"""Fixtures of the worker's tests: upload limits loose enough for any test image."""

from __future__ import annotations

import pytest


@pytest.fixture
def loose_upload_limits(monkeypatch):
    """The worker's upload limits (bytes, megapixels) raised to 50 MB and 20 MP for one test."""
    monkeypatch.setattr("worker.compute.upload_limits", lambda: (50_000_000, 20))
