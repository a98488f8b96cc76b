#!/usr/bin/env bash
# Train the shipped banks (prompt_banks/default and prompt_banks/single) from scratch against the default
# compressed model, as issue 17's recipe does; every step resumes where it stopped, so run it again after an
# interruption. About 4 CPU-core hours in all (teacher caches 1.3, general prompt 0.8, domain prompts 0.8, single 0.7,
# routing 0.3; the script runs one step at a time: run the domain prompts in parallel to use 2 cores). On a GPU
# machine pass --device cuda.
#
#   PYTHON=$IDP_HOME/venv-cpu-*/bin/python scripts/train_banks.sh [--device cuda]
#
# The domains are corpus.SOURCES' recipe domains (one per damaged task of the evaluation's primary pool);
# the single prompt is compute-matched: the general prompt continued on their union for the bank's summed steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DOMAINS=(unit-names si-units unit-systems social-bias facts)
DOMAIN_TOKENS=61440   # 60 steps of 4 x 256 tokens, half of each batch from the domain
run() { echo "+ $*" >&2; "$PYTHON" "$@"; }

# 1. the base model's next-token distributions on general text (train and dev slices), once
run -m server.lab.teacher_cache --split train "$@"
run -m server.lab.teacher_cache --split dev "$@"
# 2. the general prompt: 300k tokens of general text, learning-curve checkpoints kept
run -m server.lab.recipe general --run general-m32 --tokens 300000 --checkpoints 10000,30000,100000,300000 "$@"
# 3. one prompt per domain, warm-started from the general prompt; the compute-matched single prompt
for d in "${DOMAINS[@]}"; do
  run -m server.lab.recipe domain --run "$d-m32" --init-run general-m32 --sources "$d" --tokens $DOMAIN_TOKENS \
    --checkpoints "" "$@"
done
sources=$(IFS=,; echo "${DOMAINS[*]}")
run -m server.lab.recipe domain --run single-m32 --init-run general-m32 --sources "$sources" \
  --tokens $((DOMAIN_TOKENS * ${#DOMAINS[@]})) --checkpoints "" "$@"
# 4. the banks, then the selection rule chosen on dev inputs and written into the default bank's manifest
run -m server.lab.assemble --name default --out prompt_banks/default --prompt general=general-m32 \
  $(for d in "${DOMAINS[@]}"; do printf -- '--prompt %s=%s-m32 ' "$d" "$d"; done)
run -m server.lab.assemble --name single --out prompt_banks/single --prompt single=single-m32
run -m server.lab.routing --bank prompt_banks/default --per-source 60 --write
