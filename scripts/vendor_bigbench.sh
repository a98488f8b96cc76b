#!/usr/bin/env bash
# Rebuild server/lab/data/bigbench/ from the bigbench==1.0.0 sdist on PyPI (Apache-2.0).
# The task files are vendored because the sdist is 358 MB and pip >= 25 refuses to download it (its metadata
# declares a direct-URL dependency); pip 23.2 still saves the archive, so a throwaway venv pins that pip.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv" && "$tmp/venv/bin/pip" install -q pip==23.2.1
"$tmp/venv/bin/pip" download -q --no-deps bigbench==1.0.0 -d "$tmp" || true
tasks=(unit_conversion/unit_identification goal_step_wikihow/step_inference goal_step_wikihow/goal_inference
       general_knowledge phrase_relatedness similarities_abstraction physical_intuition human_organs_senses
       odd_one_out riddle_sense emoji_movie anachronisms)
tar -xzf "$tmp"/bigbench-1.0.0.tar.gz -C "$tmp" "${tasks[@]/#/bigbench-1.0.0/bigbench/benchmark_tasks/}"
for t in "${tasks[@]}"; do
  mkdir -p "$root/server/lab/data/bigbench/$t"
  cp "$tmp/bigbench-1.0.0/bigbench/benchmark_tasks/$t/task.json" "$root/server/lab/data/bigbench/$t/"
done
