#!/usr/bin/env bash
# The GPU figures of the README, in one pass (about 4 minutes on one H200):
#   bash bench/gpu_run.sh OUT_DIR
# 1. sampling latency: a random paper-0.16B model in bf16 (8- vs 2048-token prompts, one image and a batch of 16)
#    and the bundled checkpoint in fp32;
# 2. bf16 training throughput and MFU of paper-0.16B and paper-0.37B against Llama with the same backbone.
set -uo pipefail
out=${1:?usage: bash bench/gpu_run.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"

python3 bench/bench_sampling.py --preset paper-0.16B --device cuda --dtype bfloat16 --prompt-lengths 8 2048 \
    --batch-images 16 --repeats 20 --out "$out/sampling-paper-0.16B.json" | tail -30
python3 bench/bench_sampling.py --model checkpoints/transfusion-tiny --device cuda --repeats 20 --batch-images 16 \
    --out "$out/sampling-transfusion-tiny.json" | tail -30

for preset in paper-0.16B paper-0.37B; do
    python3 bench/bench_training.py --preset "$preset" --device cuda --dtype bfloat16 --batch 4 --seq 4096 \
        --steps 5 --warmup 2 --peak-tflops 989 --out "$out/$preset.json" \
        | grep -E '"(transfusion|llama|ratio_transfusion_over_llama|mfu|peak_memory_GiB)"'
done
