#!/usr/bin/env bash
# The one 2xH200 call that issue 6 still needs (kind nvidia-h200-x2, carry .whl): the FSDP NCCL tests (SIGTERM
# agreement, wrap_group_size, fused AdamW on local shards included) and the MFU target cases side by side.
# Usage on the GPU machine: OUT=... bash benchmarks/gpu_call_fsdp_target.sh
source benchmarks/gpu_env.sh
{ nvidia-smi -L; lscpu | grep "Model name"; } > $OUT/gpu_env_target.txt
timeout 240 python3 -m pytest -q -m "gpu or multi_gpu" tests/distributed/test_fsdp.py -p no:cacheprovider \
  > $OUT/fsdp_multi_gpu_tests_target.txt 2>&1
tail -3 $OUT/fsdp_multi_gpu_tests_target.txt
timeout 330 python3 benchmarks/train_throughput.py --steps 20 --warmup 6 --timeout 110 \
  --cases model_parallel_eagerloss,effi_fsdp_adamw_compile_group2,model_parallel,effi_fsdp_adamw_compile,effi_fsdp_lamb_compile_group2 \
  --out $OUT/train_throughput_h200x2_target.jsonl > $OUT/train_throughput_h200x2_target.log 2>&1
python3 -c "
import json
for l in open('$OUT/train_throughput_h200x2_target.jsonl'):
    r=json.loads(l); print(r.get('strategy'), r.get('tokens_per_s'), r.get('mfu_untied_count'), r.get('peak_alloc_gib'), r.get('error','')[:300], r.get('tail','')[-600:])"
