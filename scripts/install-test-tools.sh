#!/usr/bin/env bash
# System packages the test suite uses beyond the venv (Debian's): a real Prometheus for tests/test_metrics.py, and
# jemalloc, which the server preloads for vLLM's engine processes (tests/test_server.py checks it does).
# Installed only as root with apt-get (CI, containers); elsewhere the tests that need them skip and say why.
set -uo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 || missing+=(libjemalloc2)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    || echo "could not install ${missing[*]}; the tests that need them will skip" >&2
fi
exit 0
