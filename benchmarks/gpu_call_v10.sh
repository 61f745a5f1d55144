#!/usr/bin/env bash
# One 1xH200 call (kind nvidia-h200, carry .whl): per-GPU efficiency of the FSDP cases once the example GPT reads
# nothing back per step, Blocks grouped, and fused AdamW on local shards (v10) and a profiler trace.
# Usage on the GPU machine: OUT=... bash benchmarks/gpu_call_v10.sh
source benchmarks/gpu_env.sh
{ nvidia-smi -L; lscpu | grep "Model name"; } > $OUT/gpu_env_v10.txt
timeout 330 python3 benchmarks/train_throughput.py --steps 20 --warmup 6 --timeout 110 \
  --cases model_parallel,effi_fsdp_adamw_compile_group2_dtensor_adam,effi_fsdp_adamw_compile_group2,effi_fsdp_adamw_compile,effi_fsdp_lamb_compile_group2 \
  --out $OUT/train_throughput_h200x1_v10.jsonl > $OUT/train_throughput_h200x1_v10.log 2>&1
timeout 100 python3 benchmarks/train_throughput.py --steps 3 --warmup 6 --timeout 95 --profile --profile-dir $OUT/prof \
  --cases effi_fsdp_adamw_compile_group2 >> $OUT/train_throughput_h200x1_v10.log 2>&1
gzip -1 $OUT/prof/*.json; ls -la $OUT/prof
python3 -c "
import json
for l in open('$OUT/train_throughput_h200x1_v10.jsonl'):
    r=json.loads(l); print(r.get('strategy'), r.get('tokens_per_s'), r.get('mfu_untied_count'), r.get('peak_alloc_gib'), r.get('error','')[:300], r.get('tail','')[-600:])"
