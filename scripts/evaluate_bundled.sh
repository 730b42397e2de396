#!/usr/bin/env bash
# The numbers about the bundled checkpoint in README.md, docs/evaluation.md and its model card come from this script:
# the full report, a sampler comparison and a guidance sweep (about 15 minutes on 2 CPU threads).
#
#   bash scripts/evaluate_bundled.sh [MODEL] [TEXT_BASELINE]
#
# MODEL defaults to checkpoints/transfusion-tiny, TEXT_BASELINE (a text-only model trained on as many text tokens,
# see docs/evaluation.md) to runs/text-baseline-3800/final. THREADS (default 2) and PYTHON (default .venv/bin/python) are
# read from the environment. Outputs under OUT (default results): transfusion-tiny.{json,md} (+ sample grids),
# samplers/, guidance/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-checkpoints/transfusion-tiny}
BASELINE=${2:-runs/text-baseline-3800/final}
PY=${PYTHON:-.venv/bin/python}
EVAL=("$PY" -m evaluation.evaluate --model "$MODEL" --threads "${THREADS:-2}")
SDE='{"algorithm_type": "sde-dpmsolver++"}' ODE='{"algorithm_type": "dpmsolver++"}'  # explicit: configs carry it over
R=${OUT:-results}
mkdir -p "$R/samplers" "$R/guidance"

# 1. Every task with the pipeline's own sampler (the one saved in the checkpoint) at 25 steps, guidance 3.
"${EVAL[@]}" --out "$R/transfusion-tiny.json" --text-baseline "$BASELINE" --steps 25 --num-per-class 50 \
    --shapes-prompts 200 --caption-per-class 50 --caption-shapes 200 --grid

# 2. Samplers on Fashion-MNIST at guidance 3, 200 images each (FD depends on the sample size: compare equal counts).
fashion=(--tasks fashion --num-per-class 20)
"${EVAL[@]}" "${fashion[@]}" --scheduler ddim --steps 20 --out "$R/samplers/ddim-20.json"
"${EVAL[@]}" "${fashion[@]}" --scheduler dpm --scheduler-config "$ODE" --steps 20 --out "$R/samplers/dpm-20.json"
"${EVAL[@]}" "${fashion[@]}" --scheduler dpm --scheduler-config "$SDE" --steps 20 --out "$R/samplers/dpm-sde-20.json"
"${EVAL[@]}" "${fashion[@]}" --scheduler dpm --scheduler-config "$SDE" --steps 25 --out "$R/samplers/dpm-sde-25.json"
"${EVAL[@]}" "${fashion[@]}" --scheduler ddpm --steps 250 --out "$R/samplers/ddpm-250.json"
names=(ddim-20 dpm-20 dpm-sde-20 dpm-sde-25 ddpm-250)
reports=()
for n in "${names[@]}"; do reports+=("$R/samplers/$n.json"); done
"$PY" -m evaluation.evaluate --compare "${reports[@]}" --names "${names[@]}" --compare-out "$R/samplers/samplers.md"

# 3. Guidance with the pipeline's own sampler, 25 steps.
reports=() names=()
for g in 1 2 3 5 7; do
    "${EVAL[@]}" "${fashion[@]}" --steps 25 --guidance "$g" --out "$R/guidance/g$g.json"
    reports+=("$R/guidance/g$g.json") names+=("g=$g")
done
"$PY" -m evaluation.evaluate --compare "${reports[@]}" --names "${names[@]}" \
    --compare-out "$R/guidance/guidance.md" --plot "$R/guidance/guidance.png"
echo "wrote $R/transfusion-tiny.md, $R/samplers/samplers.md, $R/guidance/guidance.md"
