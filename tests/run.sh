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

# Debian packages the tests start as real processes: Chromium for the browser test (Playwright
# drives this binary; `playwright install` is never run, its downloads are not reachable here),
# redis-server for the shared log, nginx as the load balancer in front of replicas, prometheus
# (with promtool) for the metrics and alert-rule tests.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    # policy-rc.d: install the packages, never start their system services.
    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing ${missing[*]} and apt-get needs root: the tests that need them will be skipped" >&2
  fi
fi

# The official JS SDK for the cross-language conformance test; React, react-dom and esbuild
# for the browser test's page.
if command -v npm >/dev/null 2>&1; then
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
else
  echo "npm not found: the JS SDK test will be skipped" >&2
fi

# The package and its tests are typed (mypy strict, see pyproject.toml); a type error fails the run like a failing test.
.venv/bin/python -m mypy gateway tests

# Two workers; --dist loadfile keeps a file's tests (and its module fixtures) on one of them.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
