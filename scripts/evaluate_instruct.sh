#!/usr/bin/env bash
# Before/after numbers of the instruction fine-tune (README, docs/instruct.md, the model card): the whole suite — the
# bundled model's tasks and edit / instruct / qa — at three noise seeds, so each score comes with its sampling noise.
#
#   bash scripts/evaluate_instruct.sh MODEL NAME        # → results/instruct/NAME-seed{0,1,2}.{json,md}
#
# THREADS (default 1) and PYTHON (default .venv/bin/python) are read from the environment; about 3 minutes a seed
# on one CPU thread.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: evaluate_instruct.sh MODEL NAME}
NAME=${2:?usage: evaluate_instruct.sh MODEL NAME}
PY=${PYTHON:-.venv/bin/python}
R=${OUT:-results/instruct}
mkdir -p "$R"
for seed in 0 1 2; do
    "$PY" -m evaluation.evaluate --model "$MODEL" --threads "${THREADS:-1}" --steps 25 --num-per-class 50 \
        --shapes-prompts 200 --caption-per-class 50 --caption-shapes 200 --edit-prompts 200 --instruct-prompts 100 \
        --qa-questions 300 --seed "$seed" --out "$R/$NAME-seed$seed.json" $([ "$seed" = 0 ] && echo --grid)
done
"$PY" -m evaluation.evaluate --compare "$R/$NAME"-seed{0,1,2}.json --names "$NAME" "$NAME" "$NAME" \
    --compare-out "$R/$NAME-seeds.md"
