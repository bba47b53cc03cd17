#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The gateway plus the real clients and the real Agent Server used as upstream.
.venv/bin/python -m pip install --quiet -e ".[test]"

# Debian's Chromium for the browser test (tests/test_browser.py). Playwright drives this binary;
# `playwright install` is never run (its browser downloads are not reachable here).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "/usr/bin/chromium not found and apt-get needs root: the browser test will be skipped" >&2
  fi
fi

# The official JS SDK for the cross-language conformance test; React, react-dom and esbuild
# for the browser test's page.
if command -v npm >/dev/null 2>&1; then
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
else
  echo "npm not found: the JS SDK test will be skipped" >&2
fi

# The package is typed; a type error fails the run like a failing test.
.venv/bin/python -m mypy gateway

exec .venv/bin/python -m pytest "$@"
