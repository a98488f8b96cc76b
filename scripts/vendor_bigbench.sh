#!/usr/bin/env bash
# Rebuild server/lab/data/bigbench/ from the bigbench==1.0.0 sdist on PyPI (Apache-2.0). The only way to make
# those files: run it from any directory, then review `git diff --stat server/lab/data/bigbench`.
# The task files are vendored because the sdist is 358 MB and pip >= 25 refuses to download it (its metadata
# declares a direct-URL dependency); pip 23.2 still saves the archive, so a throwaway venv pins that pip.
# Set BIGBENCH_SDIST=/path/to/bigbench-1.0.0.tar.gz to reuse an archive already downloaded.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
sdist=${BIGBENCH_SDIST:-}
if [[ -z "$sdist" ]]; then
  python3 -m venv "$tmp/venv" && "$tmp/venv/bin/pip" install -q pip==23.2.1
  "$tmp/venv/bin/pip" download -q --no-deps bigbench==1.0.0 -d "$tmp" || true
  sdist="$tmp/bigbench-1.0.0.tar.gz"
fi
# task path under bigbench/benchmark_tasks, copied unmodified
tasks=(unit_conversion/unit_identification goal_step_wikihow/step_inference goal_step_wikihow/goal_inference
       general_knowledge phrase_relatedness similarities_abstraction physical_intuition human_organs_senses
       odd_one_out riddle_sense emoji_movie anachronisms
       unit_conversion/si_conversion unit_conversion/different_systems unit_conversion/chained_conversion
       unit_conversion/novel_systems goal_step_wikihow/step_ordering fact_checker/fever question_selection
       timedial social_iqa winowhy strategyqa epistemic_reasoning logical_fallacy_detection
       bbq_lite_json/race_ethnicity_disambig)
# tasks too large to vendor whole (14-18 MB): every k-th example, k = ceil(n / 3000), nothing else changed
thinned=(hyperbaton multiemo/all_sentence_en contextual_parametric_knowledge_conflicts)
all=("${tasks[@]}" "${thinned[@]}")
tar -xzf "$sdist" -C "$tmp" "${all[@]/#/bigbench-1.0.0/bigbench/benchmark_tasks/}"
src="$tmp/bigbench-1.0.0/bigbench/benchmark_tasks"
for t in "${tasks[@]}"; do
  mkdir -p "$root/server/lab/data/bigbench/$t"
  cp "$src/$t/task.json" "$root/server/lab/data/bigbench/$t/"
done
for t in "${thinned[@]}"; do
  mkdir -p "$root/server/lab/data/bigbench/$t"
  python3 - "$src/$t/task.json" "$root/server/lab/data/bigbench/$t/task.json" <<'PY'
import json, math, sys
task = json.load(open(sys.argv[1], encoding="utf-8"))
step = math.ceil(len(task["examples"]) / 3000)
task["examples"] = task["examples"][::step]
json.dump(task, open(sys.argv[2], "w", encoding="utf-8"), ensure_ascii=False, indent=1)
PY
done
