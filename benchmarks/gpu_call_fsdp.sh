#!/usr/bin/env bash
# One 2xH200 call (kind nvidia-h200-x2, carry .whl): FSDP throughput cases (hand-written FSDP2, effi_fsdp with and
# without compile). Usage on the GPU machine: OUT=... bash benchmarks/gpu_call_fsdp.sh
source benchmarks/gpu_env.sh
timeout 570 python3 benchmarks/train_throughput.py --steps 20 --warmup 6 --timeout 200 \
  --cases model_parallel,effi_fsdp_adamw,effi_fsdp_adamw_compile,effi_fsdp_lamb_compile,effi_fsdp_adamw_compile_bf16_reduce \
  --out $OUT/train_throughput_h200x2_v4.jsonl > $OUT/train_throughput_h200x2_v4.log 2>&1
cut -c1-700 $OUT/train_throughput_h200x2_v4.jsonl; tail -5 $OUT/train_throughput_h200x2_v4.log
