"""The one table of HTTP statuses covers the whole catalogue of error codes, and the client
maps every code back to its named exception."""

from __future__ import annotations

from models import errors
from service.errors import HTTP_STATUS, status_of


def catalogue() -> list[type[errors.AexError]]:
    out, stack = [], [errors.AexError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


def test_every_code_of_the_catalogue_has_a_status():
    codes = [cls.code for cls in catalogue()]
    assert len(codes) == len(set(codes)), "two errors share a code"
    missing = sorted(set(codes) - set(HTTP_STATUS))
    assert not missing, f"service/errors.py HTTP_STATUS lacks {missing}"
    assert not set(HTTP_STATUS) - set(codes), "HTTP_STATUS names codes the catalogue does not have"
    assert all(400 <= s < 600 for s in HTTP_STATUS.values())


def test_client_errors_are_4xx_and_server_faults_5xx():
    assert status_of(errors.BadParameterError.code) == 400
    assert status_of(errors.UnsupportedMediaError.code) == 415
    assert status_of(errors.ServiceUnavailableError.code) == 503
    assert status_of("no_such_code") == 500


def test_errors_carry_no_transport():
    assert not any(hasattr(cls, "http_status") for cls in catalogue())
    assert errors.error_class_for(errors.UnknownJobError.code) is errors.UnknownJobError
    assert errors.error_class_for("no_such_code") is errors.JobFailedError
