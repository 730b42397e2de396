#!/usr/bin/env bash
# Text and image guidance on the held-out edits (results/instruct/image-guidance/README.md): five settings at noise
# seeds 0, 1 and 2, about 30 seconds each on one CPU thread.
#
#   bash scripts/sweep_image_guidance.sh [MODEL]        # → results/instruct/image-guidance/g{G}-i{I}-seed{S}.json
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-checkpoints/transfusion-tiny-instruct}
PY=${PYTHON:-.venv/bin/python}
R=${OUT:-results/instruct/image-guidance}
mkdir -p "$R"
for setting in "3 none" "3 1.5" "3 3" "5 1.5" "1.5 1.5"; do
    read -r text image <<<"$setting"
    extra=()
    [ "$image" != none ] && extra=(--image-guidance "$image")
    for seed in 0 1 2; do
        "$PY" -m evaluation.evaluate --model "$MODEL" --tasks edit --edit-prompts 200 --steps 25 --guidance "$text" \
            "${extra[@]}" --seed "$seed" --threads "${THREADS:-1}" --out "$R/g$text-i$image-seed$seed.json"
    done
done
