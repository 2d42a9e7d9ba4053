#!/usr/bin/env bash
# Install the project with its test extras into .venv, check lint, format and import contracts,
# and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The versions CI ran (constraints.txt): a fresh clone installs exactly what was tested.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
# System tools some tests use: dciodvfy (DICOM validator). Installed when we may (root with
# apt); the tests that need it skip with a reason otherwise.
if ! command -v dciodvfy >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools) >/dev/null 2>&1 \
    || echo "warning: could not install dicom3tools; DICOM validation tests will skip" >&2
fi
# Orthanc and its DICOMweb plugin for the PACS tests (tests/pacs start one on loopback
# ports): installed when we may; those tests skip with a reason otherwise.
if { ! command -v Orthanc >/dev/null 2>&1 || ! dpkg -s orthanc-dicomweb >/dev/null 2>&1; } \
  && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb) >/dev/null 2>&1 \
    || echo "warning: could not install orthanc and orthanc-dicomweb; the PACS tests will skip" >&2
fi
# iproute2 and a Redis with TLS for the multi-host fault test and the test of deploy/'s Redis
# (tests/deploy): redis-tools brings the server binary (redis-check-rdb, which runs as a server
# under the name redis-server) without starting any service. Installed when we may; those tests
# skip with a reason otherwise, except under .ci/run (AEX_REQUIRE_NETNS=1), where they fail.
if { ! command -v ip >/dev/null 2>&1 || ! command -v redis-check-rdb >/dev/null 2>&1; } \
  && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 redis-tools) >/dev/null 2>&1 \
    || echo "warning: could not install iproute2 and redis-tools; the multi-host test will say why" >&2
fi
# Chromium for the viewer test (driven by the playwright package with this executable; no
# browser download); the test skips with a reason without it.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the viewer test will skip" >&2
fi
# The OHIF Viewer for the OHIF test (tests/pacs/test_ohif.py): npm from apt when we may, then the
# pinned @ohif/app build from the npm registry, its integrity checked, into ~/.cache/aex/ohif
# (scripts/install-ohif; the test runs it too and skips without it, or fails under .ci/run).
if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm) >/dev/null 2>&1 \
    || echo "warning: could not install npm; the OHIF test cannot install the viewer" >&2
fi
bash scripts/install-ohif >/dev/null || echo "warning: could not install the OHIF Viewer; the OHIF test will say why" >&2
# Lint, format and the import contracts first: any of them failing fails the run.
echo "ruff check" && .venv/bin/ruff check .
echo "ruff format --check" && .venv/bin/ruff format --check .
echo "lint-imports" && .venv/bin/lint-imports
set +e
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure for CI, never a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
