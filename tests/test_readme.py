"""The README and the pages of docs/ stay true: the README is short, opens with the two commands
and links pages that exist; each table follows the code it describes: the settings table
(docs/configuration.md) to ``Settings`` (every field, its variable and default), the API tables
(docs/api.md) to the OpenAPI schema (every route and multipart form field) and to
``service.errors.HTTP_STATUS`` (every error code and its status), the layout tables
(docs/development.md) to the modules on disk.

Each table is the first markdown table after its marker comment (``<!-- settings-table -->``,
``<!-- api-routes-table -->``, ``<!-- api-fields-table -->``, ``<!-- api-errors-table -->``,
``<!-- layout-table -->``, ``<!-- models-layout-table -->``).
A default cell is compared by its first code span (``...``), or its whole text without one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from aex.credentials import default_token_file
from jobs.crypto import generate_data_key
from jobs.settings import Settings
from service.app import HTTP_CODES, create_app
from service.errors import HTTP_STATUS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.md"
SETTINGS_PAGE = DOCS / "configuration.md"
LAYOUT_PAGE = DOCS / "development.md"
README_MAX_LINES = 150
# The two commands the README opens with: install and serve, install and test.
SERVE_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e . && .venv/bin/aex serve"
TEST_COMMAND = "bash scripts/test.sh"
FORM_ROUTES = {"classify": "/v1/classify", "explain": "/v1/explain"}
# Codes the app answers with for errors that are not ours (service/app.py): the framework's
# 404 and 405 (HTTP_CODES), any other HTTP error, and an unhandled exception.
APP_CODES: dict[str, int | str] = {
    **{code: status for status, code in HTTP_CODES.items()},
    "http_error": "any other",
    "internal_error": 500,
}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def table_rows(page: Path, marker: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first table after ``<!-- marker -->`` in ``page``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    tag = f"<!-- {marker} -->"
    name = page.relative_to(ROOT)
    assert tag in (line.strip() for line in lines), f"{name} has no {tag} marker before its table"
    i = next(n for n, line in enumerate(lines) if line.strip() == tag) + 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
        i += 1
    assert len(rows) > 2, f"no table follows {tag} in {name}"
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
    rows = table_rows(SETTINGS_PAGE, "settings-table")
    variables = [code_text(row[0]) for row in rows]
    expected = {f"AEX_{name.upper()}" for name in Settings.model_fields}
    missing = sorted(expected - set(variables))
    extra = sorted(set(variables) - expected)
    repeated = sorted({v for v in variables if variables.count(v) > 1})
    assert not missing, (
        f"docs/configuration.md settings table lacks rows for {missing} (fields of jobs.settings.Settings)"
    )
    assert not extra, (
        f"docs/configuration.md settings table names {extra}, which are not fields of jobs.settings.Settings"
    )
    assert not repeated, f"docs/configuration.md settings table repeats {repeated}"


def test_settings_table_defaults_match_the_code():
    wrong = []
    for row in table_rows(SETTINGS_PAGE, "settings-table"):
        variable = code_text(row[0])
        name = variable.removeprefix("AEX_").lower()
        if name not in Settings.model_fields:
            continue  # reported by the test above
        want, got = setting_default(name), code_text(row[1])
        if got != want:
            wrong.append(f"{variable}: the page says {got!r}, Settings has {want!r}")
    assert not wrong, "docs/configuration.md settings table defaults differ from jobs.settings.Settings:\n" + "\n".join(
        wrong
    )


def test_routes_table_equals_the_openapi_schema(openapi):
    in_schema = {f"{method.upper()} {path}" for path, ops in openapi["paths"].items() for method in ops}
    in_readme = [code_text(row[0]) for row in table_rows(API_PAGE, "api-routes-table")]
    missing = sorted(in_schema - set(in_readme))
    extra = sorted(set(in_readme) - in_schema)
    assert not missing, f"docs/api.md API table lacks routes {missing} (in the OpenAPI schema)"
    assert not extra, f"docs/api.md API table lists routes {extra} that the OpenAPI schema does not have"


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
    rows = {code_text(row[0]): row for row in table_rows(API_PAGE, "api-fields-table")}
    missing = sorted(set(expected) - set(rows))
    extra = sorted(set(rows) - set(expected))
    assert not missing, f"docs/api.md form-field table lacks {missing} (fields of the multipart forms)"
    assert not extra, f"docs/api.md form-field table lists {extra}, which no multipart form has"
    wrong = []
    for name, by_route in expected.items():
        routes = {r.strip() for r in rows[name][1].split(",")}
        if routes != set(by_route):
            wrong.append(f"{name}: the page says routes {sorted(routes)}, the schema {sorted(by_route)}")
        for default in set(by_route.values()):
            if code_text(rows[name][2]) != default:
                wrong.append(f"{name}: the page says default {code_text(rows[name][2])!r}, the schema {default!r}")
    assert not wrong, "docs/api.md form-field table differs from the OpenAPI schema:\n" + "\n".join(wrong)


def test_errors_table_equals_the_status_table():
    rows = table_rows(API_PAGE, "api-errors-table")
    in_readme: dict[str, int | str] = {}
    for row in rows:
        code, status = code_text(row[0]), row[1]
        in_readme[code] = int(status) if status.isdigit() else status
    expected = {**HTTP_STATUS, **APP_CODES}
    missing = sorted(set(expected) - set(in_readme))
    extra = sorted(set(in_readme) - set(expected))
    assert not missing, f"docs/api.md error table lacks codes {missing} (service.errors.HTTP_STATUS or service.app)"
    assert not extra, f"docs/api.md error table lists codes {extra} that the service does not have"
    wrong = [f"{c}: the page says {in_readme[c]}, the service {s}" for c, s in expected.items() if in_readme[c] != s]
    assert not wrong, "docs/api.md error statuses differ from service.errors.HTTP_STATUS:\n" + "\n".join(wrong)


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks of a markdown text, in order."""
    return [m.group(1).strip() for m in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, over {README_MAX_LINES}: move the rest to docs/"
    )


def test_readme_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    blocks = code_blocks(text)
    assert blocks[:2] == [SERVE_COMMAND, TEST_COMMAND], f"README.md's first two code blocks are {blocks[:2]}"
    # Nothing but the title comes before them.
    before = text[: text.index("```")].strip().splitlines()
    assert len(before) == 1 and before[0].startswith("# "), f"README.md has {before} before its two commands"


def markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_link_resolves(page):
    """Every relative link (and image) of README.md and docs/*.md names a file or folder of the
    repository; README.md links at least every page of docs/."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to {broken}, which do not exist"
    if page == README:
        linked = {(ROOT / t.split("#")[0]).resolve() for t in LINK.findall(README.read_text(encoding="utf-8"))}
        unlinked = sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in linked)
        assert not unlinked, f"README.md does not link docs/{unlinked}"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_name_no_issue_and_no_outside_document(page):
    """Pages name modules and commands: never an issue of the tracker, never a document outside
    the repository (``../shared/...`` other than its data)."""
    text = page.read_text(encoding="utf-8")
    issues = sorted(set(re.findall(r"\bissues?[- ]#?\d+", text, re.I)))
    assert not issues, f"{page.relative_to(ROOT)} names {issues}: say what was built instead"
    outside = sorted(set(re.findall(r"\.\./shared/docs/\S+", text)))
    assert not outside, f"{page.relative_to(ROOT)} refers to {outside}, outside the repository"


def test_readme_token_path_is_where_aex_serve_writes_it(tmp_path):
    """The README's first request reads the token where ``aex serve`` writes it
    (``aex.credentials.default_token_file``), with and without XDG_CONFIG_HOME."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r'TOKEN=\$\(cat "([^"]+)"\)', text)
    assert m, 'README.md\'s first requests read no token file (TOKEN=$(cat "..."))'
    expression = m.group(1)
    home = tmp_path / "home"
    for env in ({"HOME": str(home)}, {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "config")}):
        shell = subprocess.run(
            ["bash", "-c", f'printf %s "{expression}"'],
            env={"PATH": os.environ["PATH"], **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        expected = default_token_file(env) if "XDG_CONFIG_HOME" in env else home / ".config" / "aex" / "token"
        assert Path(shell) == expected, f"README reads {shell}, aex serve writes {expected} (env {env})"
    assert "Authorization: Bearer $TOKEN" in text


def python_modules(folder: Path) -> list[str]:
    """The module files of a package folder, without ``__init__.py``/``__main__.py``."""
    return sorted(p.name for p in folder.glob("*.py") if not p.name.startswith("__"))


def test_layout_rows_name_every_module():
    """Each folder row of the layout table names every module of that package, and the models
    table has a row for every package and module of ``models/``."""
    wrong = []
    models_rows = {code_text(row[0]).rstrip("/"): row[1] for row in table_rows(LAYOUT_PAGE, "models-layout-table")}
    for row in table_rows(LAYOUT_PAGE, "layout-table"):
        folder = ROOT / code_text(row[0]).rstrip("/")
        assert folder.is_dir(), f"docs/development.md's layout table lists {code_text(row[0])}, which is no folder"
        if not (folder / "__init__.py").exists() or folder.name in ("tests", "models"):
            continue  # not a package (deploy/, docs/), the mirror of the tree, or the models table's
        missing = [name for name in python_modules(folder) if name not in row[1]]
        if missing:
            wrong.append(f"{code_text(row[0])} row lacks {missing}")
    models = ROOT / "models"
    for package in sorted(p for p in models.iterdir() if (p / "__init__.py").exists()):
        key = f"models/{package.name}"
        if key not in models_rows:
            wrong.append(f"the models table has no row for {key}/")
            continue
        missing = [name for name in python_modules(package) if name not in models_rows[key]]
        if missing:
            wrong.append(f"{key}/ row lacks {missing}")
    for name in python_modules(models):
        if f"models/{name}" not in models_rows:
            wrong.append(f"the models table has no row for models/{name}")
    for key in models_rows:
        if not (ROOT / key).exists():
            wrong.append(f"the models table lists {key}, which does not exist")
    assert not wrong, "docs/development.md's layout tables differ from the code:\n" + "\n".join(wrong)


def test_metrics_row_names_every_metric():
    """The ``GET /metrics`` row of docs/api.md names every metric family ``service/metrics.py``
    defines (a counter as Prometheus exposes it, with ``_total``)."""
    source = (ROOT / "service" / "metrics.py").read_text(encoding="utf-8")
    names = sorted(set(re.findall(r'"(aex_[a-z_]+)"', source)))
    assert len(names) >= 5, f"service/metrics.py defines too few metrics to be read this way: {names}"
    rows = [row for row in table_rows(API_PAGE, "api-routes-table") if code_text(row[0]) == "GET /metrics"]
    assert rows, "docs/api.md's routes table has no GET /metrics row"
    missing = [name for name in names if not re.search(rf"`{name}(_total)?[`{{]", rows[0][1])]
    assert not missing, f"docs/api.md's /metrics row does not name {missing} (service/metrics.py)"


def readme_quick_start() -> list[str]:
    """The bash blocks of the README's section "A first classify and explanation"."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## A first classify and explanation\n(.*?)^## ", text, re.S | re.M)
    assert m, 'README.md has no section "A first classify and explanation"'
    return code_blocks(m.group(1))


@pytest.mark.e2e
def test_the_readme_quick_start_works_as_printed(tmp_path):
    """The README's first requests, run as printed (only the port changed) by bash in a folder
    beside the installed ``.venv``, against ``aex serve`` with the bundled checkpoints and its
    token where it writes it: the classify answers a finished classification, the explanation
    finishes with both targets, and its overlay is a PNG."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AEX_", "XDG_"))}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        AEX_PORT=str(port),
        AEX_WORKERS="1",
        AEX_TORCH_THREADS="1",
    )
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "aex.cli", "serve"], cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert serve.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        folder = tmp_path / "user"
        folder.mkdir()
        (folder / ".venv").symlink_to(ROOT / ".venv")
        script = "\n".join(readme_quick_start()).replace("http://127.0.0.1:8000", base)
        assert script.count(base) >= 4, "the README's quick start no longer talks to http://127.0.0.1:8000"
        run = subprocess.run(
            ["bash", "-e", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
        classified, end = json.JSONDecoder().raw_decode(run.stdout)
        assert classified["status"] == "finished" and classified["kind"] == "classify", classified
        assert classified["result"]["predicted"]["class_name"] in classified["result"]["probs"]
        explained = json.loads(run.stdout[end:])
        assert explained["status"] == "finished" and explained["kind"] == "explain", explained.get("error")
        assert [t["role"] for t in explained["result"]["targets"]] == ["predicted", "runner-up"]
        assert (folder / "overlay.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(60)
    assert code == 0, log.read_text()
