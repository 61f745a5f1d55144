#!/usr/bin/env bash
# One 2xH200 call (kind nvidia-h200-x2, carry .whl): LAMB's CUDA tests (incl. the CUDA-graph replay), the sharded
# LAMB NCCL tests (FSDP2 DTensors and ZeRO flat partitions take the fused path's sharded branch), and the step
# benchmark. Usage on the GPU machine: OUT=... bash benchmarks/gpu_call_lamb.sh
source benchmarks/gpu_env.sh
{ date -u; nvidia-smi -L; lscpu | grep "Model name"; } > $OUT/gpu_env.txt 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -p no:cacheprovider -q -rs -m gpu tests/optim > $OUT/optim_gpu_tests.txt 2>&1
tail -3 $OUT/optim_gpu_tests.txt
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/optim_step.py --device cuda --no-compile --blocks 65536:2048:8 \
  --out $OUT/optim_step_h200_v5.json > $OUT/optim_step_h200_v5.txt 2>&1
tail -14 $OUT/optim_step_h200_v5.txt | cut -c1-400
timeout 240 python3 -m pytest -p no:cacheprovider -q -rs -m multi_gpu tests/distributed/test_deepspeed.py \
  tests/distributed/test_fsdp.py -k "lamb or Lamb" > $OUT/lamb_multi_gpu_tests.txt 2>&1
tail -4 $OUT/lamb_multi_gpu_tests.txt
