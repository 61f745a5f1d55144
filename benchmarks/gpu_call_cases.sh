#!/usr/bin/env bash
# One GPU call (kind nvidia-h200 or -x2, carry .whl): optionally GPU tests, then train_throughput.py cases side by side,
# then optionally a torch.profiler trace of one case. Everything lands in $OUT, named after $TAG. On the GPU machine:
#   OUT=... TAG=h200x1_v9 CASES=model_parallel,effi_fsdp_adamw_compile [PROFILE=effi_fsdp_adamw_compile] \
#     [MARK=gpu PATHS="tests/models"] bash benchmarks/gpu_call_cases.sh
source benchmarks/gpu_env.sh
{ nvidia-smi -L; lscpu | grep "Model name"; } > $OUT/gpu_env_$TAG.txt
if [ -n "$MARK" ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m "$MARK" $PATHS > $OUT/gpu_tests_$TAG.txt 2>&1
  tail -3 $OUT/gpu_tests_$TAG.txt
fi
timeout 330 python3 benchmarks/train_throughput.py --steps 20 --warmup 6 --timeout 110 --cases "$CASES" \
  --out $OUT/train_throughput_$TAG.jsonl > $OUT/train_throughput_$TAG.log 2>&1
if [ -n "$PROFILE" ]; then
  timeout 100 python3 benchmarks/train_throughput.py --steps 3 --warmup 6 --timeout 95 --profile \
    --profile-dir $OUT/prof --cases "$PROFILE" >> $OUT/train_throughput_$TAG.log 2>&1
  gzip -1 $OUT/prof/*.json
fi
python3 -c "
import json
for l in open('$OUT/train_throughput_$TAG.jsonl'):
    r = json.loads(l)
    print(r.get('strategy'), r.get('tokens_per_s'), r.get('mfu_untied_count'), r.get('peak_alloc_gib'),
          r.get('error', '')[:300], r.get('tail', '')[-600:])"
