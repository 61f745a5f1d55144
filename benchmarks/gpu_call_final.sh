#!/usr/bin/env bash
# One 2xH200 call (kind nvidia-h200-x2, carry .whl): LAMB step benchmark, FSDP and ZeRO-2 throughput repeats, and
# the multi-GPU FSDP tests. Usage on the GPU machine: OUT=... bash benchmarks/gpu_call_final.sh
source benchmarks/gpu_env.sh
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv; lscpu | grep "Model name"; } > $OUT/gpu_env.txt 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/optim_step.py --device cuda --no-compile --blocks 65536:2048:8,32768:4096:8 \
  --out $OUT/optim_step_h200_v4.json > $OUT/optim_step_h200_v4.txt 2>&1
tail -14 $OUT/optim_step_h200_v4.txt | cut -c1-600
timeout 330 python3 benchmarks/train_throughput.py --steps 20 --warmup 6 --timeout 120 \
  --cases model_parallel,effi_fsdp_adamw_compile,effi_fsdp_lamb_compile,deepspeed_stage_2,effi_ds2_adamw,effi_ds2_lamb,deepspeed_stage_2,effi_ds2_adamw \
  --out $OUT/train_throughput_h200x2_v5.jsonl > $OUT/train_throughput_h200x2_v5.log 2>&1
python3 -c "
import json,sys
for l in open('$OUT/train_throughput_h200x2_v5.jsonl'):
    r=json.loads(l); print(r.get('strategy'), r.get('optimizer'), r.get('tokens_per_s'), r.get('mfu_untied_count'), r.get('peak_alloc_gib'), r.get('error','')[:200])"
timeout 120 python3 -m pytest -p no:cacheprovider -q -rs -m "gpu or multi_gpu" tests/distributed/test_fsdp.py > $OUT/fsdp_gpu_tests.txt 2>&1
tail -4 $OUT/fsdp_gpu_tests.txt
