#!/usr/bin/env bash
# One batched GPU session on 2xH200 (device kind nvidia-h200-x2, carry .whl): throughput/memory benchmarks first,
# then the NCCL and CUDA tests. Every part has its own time cap so the whole stays inside one 10-minute call.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh "$OUT"
out=${1:-benchmarks/results}
mkdir -p "$out"
source benchmarks/gpu_env.sh
{ date -u; nvidia-smi -L; python3 -c "import torch, lightning, deepspeed; print(torch.__version__, lightning.__version__, deepspeed.__version__)"; } > "$out/gpu_env.txt" 2>&1
cases=${CASES:-model_parallel,effi_fsdp_adamw,effi_fsdp_lamb,deepspeed_stage_2,effi_ds2_adamw,effi_ds2_lamb,ddp,deepspeed_stage_3,effi_ds3_adamw}
timeout "${BENCH_S:-330}" python3 benchmarks/train_throughput.py --cases "$cases" --steps "${STEPS:-10}" --warmup "${WARMUP:-4}" \
  --timeout "${CASE_S:-75}" --out "$out/train_throughput_h200x2.jsonl" > "$out/train_throughput_h200x2.log" 2>&1
cat "$out/train_throughput_h200x2.jsonl" 2>/dev/null | cut -c1-400
timeout "${TEST_S:-200}" python3 -m pytest -p no:cacheprovider -q -rs -m "gpu or multi_gpu" \
  tests/distributed/test_fsdp.py tests/distributed/test_deepspeed.py tests/plugins/test_gpu.py tests/models/test_gpt.py \
  > "$out/gpu_tests.txt" 2>&1
tail -25 "$out/gpu_tests.txt"
