#!/usr/bin/env bash
# The one 2xH200 call that issue 6 still needs (kind nvidia-h200-x2, carry .whl): the FSDP NCCL tests (SIGTERM
# agreement, wrap_group_size, fused AdamW on local shards included) and the MFU target cases side by side.
# Usage on the GPU machine: OUT=... bash benchmarks/gpu_call_fsdp_target.sh
TAG=h200x2_target MARK="gpu or multi_gpu" PATHS=tests/distributed/test_fsdp.py \
  CASES=model_parallel_eagerloss,effi_fsdp_adamw_compile_group2,model_parallel,effi_fsdp_adamw_compile,effi_fsdp_lamb_compile_group2 \
  bash benchmarks/gpu_call_cases.sh
