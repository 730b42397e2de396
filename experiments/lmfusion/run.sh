#!/usr/bin/env bash
# The LMFusion experiment at toy scale (docs/modality_experts.md): a text model trained here is "the pretrained LLM";
# four image-training legs of equal steps (= equal training FLOPs per token: MoT runs each token through one expert)
# start from it or from scratch, each evaluated every EVAL_EVERY steps for curves.
#
#   bash experiments/lmfusion/run.sh            # resumable: a leg or an evaluation already done is skipped
#
# Legs:  text     dense, text only (the "pretrained LLM")
#        mot      MoT initialised from text (image experts copied from the text experts), --freeze-text (LMFusion)
#        dense    dense from scratch
#        dense-init  dense initialised from text, nothing frozen
#        mot-scratch MoT from scratch
# Environment: OUT (default runs/lmfusion), THREADS (1), TEXT_STEPS (2000), IMAGE_STEPS (3000), EVAL_EVERY (750).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/lmfusion}
THREADS=${THREADS:-1}
TEXT_STEPS=${TEXT_STEPS:-2000}
IMAGE_STEPS=${IMAGE_STEPS:-3000}
EVAL_EVERY=${EVAL_EVERY:-750}
export OMP_NUM_THREADS=$THREADS
# a 128-wide, 4-layer model of the bundled recipe (2.1M dense / 2.9M MoT parameters), 12,000 images per world
MODEL=(--config training/configs/transfusion-tiny.yaml --hidden-size 128 --intermediate-size 384 --layers 4 --heads 4
       --kv-heads 2 --batch-size 32 --max-examples 12000 --sample-every 0 --latent-cache runs/latent-cache
       --threads "$THREADS" --seed 0)
MIX=(--mix fashion=0.4,shapes=0.4,text=0.2)
EVAL=(--steps 20 --num-per-class 20 --shapes-prompts 100 --shapes-per-prompt 1 --caption-per-class 20
      --caption-shapes 100 --text-max-chunks 300 --vae-per-class 0 --fd-reference-per-class 20 --threads "$THREADS"
      --tasks fashion,shapes,caption,text)
mkdir -p "$OUT"

# train LEG STEPS FLAGS…: in stages of EVAL_EVERY steps (the schedule spans STEPS; resuming is exact), evaluating
# final/ after each stage into OUT/LEG/eval/step-N.json
train() {
  local leg=$1 steps=$2; shift 2
  local dir="$OUT/$leg"
  local stops=() stop
  for ((stop = EVAL_EVERY; stop < steps; stop += EVAL_EVERY)); do stops+=("$stop"); done
  stops+=("$steps")  # the last stage ends where the schedule does
  for stop in "${stops[@]}"; do
    if [[ ! -f "$dir/eval/step-$stop.json" ]]; then
      local resume=()
      [[ -d "$dir/checkpoints" ]] && resume=(--resume)
      "$PY" -m training.train "${MODEL[@]}" "$@" --max-steps "$steps" --stop-at-step "$stop" --save-every "$EVAL_EVERY" \
        --output-dir "$dir" "${resume[@]}"
      mkdir -p "$dir/eval"
      "$PY" -m evaluation.evaluate --model "$dir/final" "${EVAL[@]}" --out "$dir/eval/step-$stop.json"
    fi
  done
}

train text "$TEXT_STEPS" --mix text=1
train mot "$IMAGE_STEPS" "${MIX[@]}" --modality-experts mot --freeze-text --init-from "$OUT/text/final"
train dense "$IMAGE_STEPS" "${MIX[@]}"
train dense-init "$IMAGE_STEPS" "${MIX[@]}" --init-from "$OUT/text/final"
train mot-scratch "$IMAGE_STEPS" "${MIX[@]}" --modality-experts mot
"$PY" experiments/lmfusion/report.py --runs "$OUT"
