#!/usr/bin/env bash
# Batched GPU session (device kind nvidia-h200-x2, carry .whl): LAMB's CUDA tests and step benchmark on GPU 0, then
# the ZeRO 1/2/3 memory cases (benchmarks/deepspeed_memory.py, one torchrun per case, 2 GPUs).
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session_lamb_ds.sh "$OUT"
out=${1:-benchmarks/results}
mkdir -p "$out"
source benchmarks/gpu_env.sh
{ date -u; nvidia-smi -L; python3 -c "import torch, lightning, triton, deepspeed; print(torch.__version__, lightning.__version__, triton.__version__, deepspeed.__version__)"; } > "$out/gpu_env.txt" 2>&1
cat "$out/gpu_env.txt"
CUDA_VISIBLE_DEVICES=0 timeout "${OPT_TEST_S:-150}" python3 -m pytest -p no:cacheprovider -q -rs -m gpu tests/optim > "$out/optim_gpu_tests.txt" 2>&1
tail -3 "$out/optim_gpu_tests.txt"
CUDA_VISIBLE_DEVICES=0 timeout "${OPT_BENCH_S:-150}" python3 benchmarks/optim_step.py --device cuda --no-compile \
  --out "$out/optim_step_h200.json" > "$out/optim_step_h200.txt" 2>&1
tail -14 "$out/optim_step_h200.txt"
for case in ${DS_CASES:-effi:1:adamw effi:2:adamw effi:3:adamw stock:2:adamw}; do
  timeout "${DS_CASE_S:-80}" python3 -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/deepspeed_memory.py \
    --case "$case" --steps "${DS_STEPS:-10}" --out "$out/deepspeed_memory_h200x2.jsonl" > "$out/ds_${case//:/_}.log" 2>&1 \
    || { echo "case $case failed/timed out"; tail -5 "$out/ds_${case//:/_}.log"; }
done
cat "$out/deepspeed_memory_h200x2.jsonl" 2>/dev/null | cut -c1-600
