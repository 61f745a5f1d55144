#!/usr/bin/env bash
# One short 2xH200 call (kind nvidia-h200-x2, carry .whl): how host-bound the FSDP2 cases are (with and without
# Lightning's per-batch SIGTERM sync). Usage on the GPU machine: OUT=... bash benchmarks/gpu_call_hostbound.sh
source benchmarks/gpu_env.sh
lscpu | grep "Model name" > $OUT/gpu_env.txt
timeout 200 python3 benchmarks/train_throughput.py --steps 20 --warmup 6 --timeout 90 \
  --cases model_parallel,model_parallel_nosync,effi_fsdp_adamw_compile,effi_fsdp_adamw_compile_nosync \
  --out $OUT/train_throughput_h200x2_v6.jsonl > $OUT/train_throughput_h200x2_v6.log 2>&1
python3 -c "
import json
for l in open('$OUT/train_throughput_h200x2_v6.jsonl'):
    r=json.loads(l); print(r.get('strategy'), r.get('tokens_per_s'), r.get('mfu_untied_count'), r.get('peak_alloc_gib'), r.get('error','')[:200])"
