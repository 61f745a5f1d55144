python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
timeout 570 python3 benchmarks/train_throughput.py --steps 20 --warmup 6 --timeout 200 \
  --cases model_parallel,effi_fsdp_adamw,effi_fsdp_adamw_compile,effi_fsdp_lamb_compile,effi_fsdp_adamw_compile_bf16_reduce \
  --out $OUT/train_throughput_h200x2_v4.jsonl > $OUT/train_throughput_h200x2_v4.log 2>&1
cut -c1-700 $OUT/train_throughput_h200x2_v4.jsonl; tail -5 $OUT/train_throughput_h200x2_v4.log
