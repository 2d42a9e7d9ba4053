"""The test suite's own rules: every third-party package the tests import is declared (the project's dependencies or its test extras, pinned in constraints.txt), no test skips but through ``tests.support.require``, and ``conftest.py`` files hold fixtures only, none over 200 lines."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

TESTS = REPO_ROOT / "tests"
FIRST_PARTY = {"aex", "service", "worker", "jobs", "pacs", "models", "tests"}
REQUIRE = TESTS / "support" / "require.py"
MAX_CONFTEST_LINES = 200


def normalised(name: str) -> str:
    """A distribution's name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def imported_top_levels(path: Path) -> set[str]:
    """The top-level names of every absolute import in ``path``, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def declared() -> set[str]:
    """Distributions named by pyproject.toml's dependencies and test extras (normalised)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    return {normalised(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]) for spec in specs}


def pinned() -> dict[str, str]:
    """constraints.txt: distribution (normalised) -> version."""
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[normalised(name)] = version.strip()
    return pins


def test_every_package_the_tests_import_is_declared_and_pinned():
    providers = packages_distributions()
    third_party = set()
    for path in python_files():
        third_party |= imported_top_levels(path) - FIRST_PARTY - set(sys.stdlib_module_names)
    assert "scipy" in third_party and "yaml" in third_party  # the scan sees imports at any depth
    unknown = sorted(m for m in third_party if m not in providers)
    assert not unknown, f"imported by tests/ but provided by no installed distribution: {unknown}"
    needed = {m: {normalised(d) for d in providers[m]} for m in third_party}
    undeclared = sorted(f"{m} ({', '.join(sorted(d))})" for m, d in needed.items() if not d & declared())
    assert not undeclared, f"imported by tests/ but not in pyproject.toml's dependencies or test extras: {undeclared}"
    pins = pinned()
    unpinned = sorted(d for ds in needed.values() for d in ds & declared() if d not in pins)
    assert not unpinned, f"declared but not pinned in constraints.txt: {unpinned}"


def test_declared_test_extras_are_pinned_as_installed():
    from importlib.metadata import PackageNotFoundError, version

    pins = pinned()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["optional-dependencies"]["test"]:
        name = normalised(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0])
        assert name in pins, f"test extra {name} is not pinned in constraints.txt"
        try:
            assert version(name) == pins[name], f"{name}: installed {version(name)}, constraints.txt {pins[name]}"
        except PackageNotFoundError:
            pytest.fail(f"test extra {name} is not installed: pip install -c constraints.txt -e '.[test]'")


SKIPS = re.compile(r"pytest\.skip\b|\bskipif\b|importorskip|pytest\.mark\.skip\b|pytest\.xfail|mark\.xfail")


def test_no_test_skips_but_through_the_require_switch():
    """A test that would skip for a missing part calls ``tests.support.require`` (which fails
    under AEX_REQUIRE_ALL=1); nothing else in tests/ skips or expects a failure."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}"
        for path in python_files()
        if path not in (REQUIRE, Path(__file__))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if SKIPS.search(line)
    ]
    assert not offenders, "skips outside tests/support/require.py:\n" + "\n".join(offenders)


def is_fixture(node: ast.AST) -> bool:
    for deco in getattr(node, "decorator_list", []):
        target = deco.func if isinstance(deco, ast.Call) else deco
        if ast.unparse(target) in ("pytest.fixture", "fixture"):
            return True
    return False


@pytest.mark.parametrize("path", sorted(TESTS.rglob("conftest.py")), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_conftest_files_hold_fixtures_only(path):
    """Builders live in tests/support; a conftest.py holds fixtures (and their imports) only."""
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_CONFTEST_LINES, f"{path} has {len(text.splitlines())} lines"
    others = [
        f"line {node.lineno}: {ast.unparse(node).splitlines()[0]}"
        for node in ast.parse(text).body
        if not isinstance(node, ast.Import | ast.ImportFrom)
        and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))  # the docstring
        and not is_fixture(node)
    ]
    assert not others, f"{path} holds more than fixtures:\n" + "\n".join(others)


def test_the_builders_are_in_tests_support_not_beside_the_tests():
    """Helper modules of tests/ (not test_*.py, not conftest.py) live in tests/support/."""
    stray = [
        str(p.relative_to(REPO_ROOT))
        for p in python_files()
        if not p.name.startswith("test_") and p.name != "conftest.py" and TESTS / "support" not in p.parents
    ]
    assert not stray, f"helper modules outside tests/support/: {stray}"


def test_a_missing_tool_skips_and_fails_under_the_switch(tmp_path):
    """A test that needs dciodvfy, run with dciodvfy hidden from PATH: skipped with the reason,
    and a failure naming it under AEX_REQUIRE_ALL=1 (as .ci/run runs the suite)."""
    import os
    import subprocess

    (tmp_path / "test_needs_a_tool.py").write_text(
        "from tests.support.dciodvfy import require_dciodvfy\n\n\ndef test_it():\n    require_dciodvfy()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "AEX_REQUIRE_ALL"}
    env.update(PATH=str(Path(sys.executable).parent), PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    command.append(str(tmp_path / "test_needs_a_tool.py"))
    run = lambda **extra: subprocess.run(
        command, env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    skipped = run()
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout + skipped.stderr
    assert "dciodvfy is not installed" in skipped.stdout
    failed = run(AEX_REQUIRE_ALL="1")
    assert failed.returncode == 1 and "1 failed" in failed.stdout, failed.stdout + failed.stderr
    assert "dciodvfy is not installed" in failed.stdout and "AEX_REQUIRE_ALL=1" in failed.stdout
