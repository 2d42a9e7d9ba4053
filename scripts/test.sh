#!/usr/bin/env bash
# Install the project with its test extras into .venv, install the system tools the tests use,
# check lint, format and import contracts, and run the whole test suite.
#
# A system tool that cannot be installed stops the run with the reason (exit 1) where the tests
# must not skip: under AEX_REQUIRE_ALL=1, which .ci/run sets. Elsewhere (a developer's machine,
# not root) it is said loudly on stderr and the tests that need it skip, each with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The versions CI ran (constraints.txt): a fresh clone installs exactly what was tested.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'

missing_tools=()
# need WHAT CHECK PACKAGE...: when CHECK fails, apt-get install PACKAGE... (root with apt only),
# then CHECK again; still failing, WHAT is recorded as missing.
need() {
  local what=$1 check=$2
  shift 2
  eval "$check" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    local log
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >"$log" 2>&1; then
      echo "error: apt-get install $* failed:" >&2
      tail -n 20 "$log" >&2
    fi
    rm -f "$log"
  else
    echo "error: $what is missing and cannot be installed here (needs root and apt-get: apt-get install $*)" >&2
  fi
  eval "$check" >/dev/null 2>&1 || missing_tools+=("$what ($*)")
}
# dciodvfy, the DICOM validator (tests/models/dicom, tests/worker, tests/pacs).
need "dciodvfy" "command -v dciodvfy" dicom3tools
# Orthanc and its DICOMweb plugin for the PACS tests (tests/pacs start one on loopback ports).
need "Orthanc with its DICOMweb plugin" "command -v Orthanc && dpkg -s orthanc-dicomweb" orthanc orthanc-dicomweb
# iproute2 and a Redis with TLS for the multi-host fault test and the test of deploy/'s Redis
# (tests/deploy): redis-tools brings the server binary (redis-check-rdb, which runs as a server
# under the name redis-server) without starting any service.
need "iproute2 and a Redis server with TLS" "command -v ip && command -v redis-check-rdb" iproute2 redis-tools
# Chromium for the viewer tests (driven by the playwright package with this executable; no
# browser download).
need "Chromium" "test -x /usr/bin/chromium" chromium
# npm, to fetch the pinned OHIF Viewer build for the OHIF test (tests/pacs/test_ohif.py).
need "npm" "command -v npm" npm
# The OHIF Viewer: the pinned @ohif/app build from the npm registry, its integrity checked, into
# ~/.cache/aex/ohif (scripts/install-ohif; the test runs it too).
if ! bash scripts/install-ohif >/dev/null; then
  echo "error: scripts/install-ohif could not install the OHIF Viewer" >&2
  missing_tools+=("the OHIF Viewer (scripts/install-ohif)")
fi
if [ "${#missing_tools[@]}" -gt 0 ]; then
  printf 'missing for the tests: %s\n' "${missing_tools[@]}" >&2
  if [ "${AEX_REQUIRE_ALL:-}" = 1 ]; then
    echo "AEX_REQUIRE_ALL=1: no test may skip for a missing tool; stopping here" >&2
    exit 1
  fi
  echo "WARNING: the tests that need them will skip (AEX_REQUIRE_ALL=1 makes that a failure)" >&2
fi

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
