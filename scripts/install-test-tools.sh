#!/usr/bin/env bash
# System tools the test suite uses beyond the venv: a real Prometheus (Debian's package) for tests/test_metrics.py.
# Installed only as root with apt-get (CI, containers); elsewhere the test that needs it skips and says why.
set -uo pipefail
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
    || echo "could not install prometheus; tests/test_metrics.py's Prometheus test will skip" >&2
fi
exit 0
