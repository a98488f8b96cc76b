#!/usr/bin/env bash
# Issue 15's measurements, one after another, on a machine with nothing else running (every ratio compares IDP
# on against IDP off in the same run, but a busy neighbour still skews both): the serving benchmark with the
# selection pass on one thread, with the idle-thread switch, with speculation, and with speculation plus an arm
# that forces one prompt (the prompt's own cost, without a pass); the selection pass's profile; and five
# 30-minute soaks: glibc's malloc, glibc with MALLOC_ARENA_MAX=2, tcmalloc and jemalloc preloaded for the whole
# server (Debian's libtcmalloc-minimal4 and libjemalloc2), and the server's defaults (tcmalloc preloaded for
# vLLM's engine processes, server/online/allocator.py). Each step writes under bench/runs/serving/ and is skipped
# when its output exists, so run it again after an interruption. About 3.5 hours on 2 cores.
#
#   PYTHON=$IDP_HOME/venv-cpu-*/bin/python scripts/serving_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=bench/runs/serving
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the bench scripts import the project from this checkout
# step NAME ARGS...: `bench/ARGS...` with its printout kept as $OUT/NAME.txt, unless that file exists
step() {
  local name=$1; shift
  if [[ -e $OUT/$name.txt ]]; then echo "= $OUT/$name.txt exists, skipped" >&2; return; fi
  echo "+ $PYTHON bench/$*" >&2
  "$PYTHON" "bench/$@" | tee "$OUT/$name.tmp"
  mv "$OUT/$name.tmp" "$OUT/$name.txt"
}
step serve-one-thread serve.py --json "$OUT/serve-one-thread.json"
step serve-idle-threads serve.py --idp-flag=--selection-idle-threads=0 --json "$OUT/serve-idle-threads.json"
step serve-speculation serve.py --idp-flag=--selection-speculation=idle --json "$OUT/serve-speculation.json"
step serve-forced serve.py --idp-flag=--selection-speculation=idle --forced general --json "$OUT/serve-forced.json"
step profile profile_selection.py --repeats 7
step soak-glibc soak.py --launch --minutes 30 --idp-flag=--engine-allocator=glibc --out "$OUT/soak-glibc"
step soak-arena2 soak.py --launch --minutes 30 --idp-flag=--engine-allocator=glibc --malloc-arena-max 2 --out "$OUT/soak-arena2"
step soak-tcmalloc soak.py --launch --minutes 30 --allocator tcmalloc --out "$OUT/soak-tcmalloc"
step soak-jemalloc soak.py --launch --minutes 30 --allocator jemalloc --out "$OUT/soak-jemalloc"
step soak-default soak.py --launch --minutes 30 --out "$OUT/soak-default"
