"""The README's tables stay equal to the code: the settings table to ``Settings`` (every field,
its variable and default), the API tables to the OpenAPI schema (every route and multipart
form field) and to ``service.errors.HTTP_STATUS`` (every error code and its status).

Each table is the first markdown table after its marker comment (``<!-- settings-table -->``,
``<!-- api-routes-table -->``, ``<!-- api-fields-table -->``, ``<!-- api-errors-table -->``).
A default cell is compared by its first code span (``...``), or its whole text without one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from jobs.crypto import generate_data_key
from jobs.settings import Settings
from service.app import HTTP_CODES, create_app
from service.errors import HTTP_STATUS

README = Path(__file__).resolve().parents[1] / "README.md"
FORM_ROUTES = {"classify": "/v1/classify", "explain": "/v1/explain"}
# Codes the app answers with for errors that are not ours (service/app.py): the framework's
# 404 and 405 (HTTP_CODES), any other HTTP error, and an unhandled exception.
APP_CODES: dict[str, int | str] = {
    **{code: status for status, code in HTTP_CODES.items()},
    "http_error": "any other",
    "internal_error": 500,
}


def table_rows(marker: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first table after ``<!-- marker -->``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    tag = f"<!-- {marker} -->"
    assert tag in (line.strip() for line in lines), f"README.md has no {tag} marker before its table"
    i = next(n for n, line in enumerate(lines) if line.strip() == tag) + 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
        i += 1
    assert len(rows) > 2, f"no table follows {tag} in README.md"
    return rows[2:]  # after the header and the --- row


def code_text(cell: str) -> str:
    """The first code span of a cell, or the cell itself without one."""
    m = re.search(r"`([^`]*)`", cell)
    return m.group(1) if m else cell


def spelled(value: Any) -> str:
    """A default as the README writes it: as the variable would spell it, ``unset`` for None,
    ``empty`` for an empty list or string."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return str(value) or "empty"


def setting_default(name: str) -> str:
    field = Settings.model_fields[name]
    value = field.default_factory() if field.default_factory is not None else field.default
    return spelled(value)


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    settings = Settings(
        redis_url="unix:///nonexistent.sock", bundled_models=False, model_dirs=[], data_key=generate_data_key()
    )
    return create_app(settings).openapi()


def test_settings_table_lists_every_field_once():
    rows = table_rows("settings-table")
    variables = [code_text(row[0]) for row in rows]
    expected = {f"AEX_{name.upper()}" for name in Settings.model_fields}
    missing = sorted(expected - set(variables))
    extra = sorted(set(variables) - expected)
    repeated = sorted({v for v in variables if variables.count(v) > 1})
    assert not missing, f"README settings table lacks rows for {missing} (fields of jobs.settings.Settings)"
    assert not extra, f"README settings table names {extra}, which are not fields of jobs.settings.Settings"
    assert not repeated, f"README settings table repeats {repeated}"


def test_settings_table_defaults_match_the_code():
    wrong = []
    for row in table_rows("settings-table"):
        variable = code_text(row[0])
        name = variable.removeprefix("AEX_").lower()
        if name not in Settings.model_fields:
            continue  # reported by the test above
        want, got = setting_default(name), code_text(row[1])
        if got != want:
            wrong.append(f"{variable}: README says {got!r}, Settings has {want!r}")
    assert not wrong, "README settings table defaults differ from jobs.settings.Settings:\n" + "\n".join(wrong)


def test_routes_table_equals_the_openapi_schema(openapi):
    in_schema = {f"{method.upper()} {path}" for path, ops in openapi["paths"].items() for method in ops}
    in_readme = [code_text(row[0]) for row in table_rows("api-routes-table")]
    missing = sorted(in_schema - set(in_readme))
    extra = sorted(set(in_readme) - in_schema)
    assert not missing, f"README API table lacks routes {missing} (in the OpenAPI schema)"
    assert not extra, f"README API table lists routes {extra} that the OpenAPI schema does not have"


def test_fields_table_equals_the_multipart_forms(openapi):
    forms = {
        route: openapi["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        for route, path in FORM_ROUTES.items()
    }
    expected: dict[str, dict[str, str]] = {}  # field -> route -> default as written
    for route, schema in forms.items():
        for name, prop in schema["properties"].items():
            default = "required" if name in schema.get("required", []) else spelled(prop.get("default"))
            expected.setdefault(name, {})[route] = default
    rows = {code_text(row[0]): row for row in table_rows("api-fields-table")}
    missing = sorted(set(expected) - set(rows))
    extra = sorted(set(rows) - set(expected))
    assert not missing, f"README form-field table lacks {missing} (fields of the multipart forms)"
    assert not extra, f"README form-field table lists {extra}, which no multipart form has"
    wrong = []
    for name, by_route in expected.items():
        routes = {r.strip() for r in rows[name][1].split(",")}
        if routes != set(by_route):
            wrong.append(f"{name}: README says routes {sorted(routes)}, the schema {sorted(by_route)}")
        for default in set(by_route.values()):
            if code_text(rows[name][2]) != default:
                wrong.append(f"{name}: README says default {code_text(rows[name][2])!r}, the schema {default!r}")
    assert not wrong, "README form-field table differs from the OpenAPI schema:\n" + "\n".join(wrong)


def test_errors_table_equals_the_status_table():
    rows = table_rows("api-errors-table")
    in_readme: dict[str, int | str] = {}
    for row in rows:
        code, status = code_text(row[0]), row[1]
        in_readme[code] = int(status) if status.isdigit() else status
    expected = {**HTTP_STATUS, **APP_CODES}
    missing = sorted(set(expected) - set(in_readme))
    extra = sorted(set(in_readme) - set(expected))
    assert not missing, f"README error table lacks codes {missing} (service.errors.HTTP_STATUS or service.app)"
    assert not extra, f"README error table lists codes {extra} that the service does not have"
    wrong = [f"{c}: README says {in_readme[c]}, the service {s}" for c, s in expected.items() if in_readme[c] != s]
    assert not wrong, "README error statuses differ from service.errors.HTTP_STATUS:\n" + "\n".join(wrong)
