#!/usr/bin/env bash
# The GPU checks of GradientGuard, as ONE prepared script for a lent H100/H200 (about 3-4 minutes):
#   1. the `gpu`-marked tests (CUDA GradScaler under 16-mixed, fused AdamW under bf16-mixed, FSDP on one GPU,
#      rollback from pinned asynchronous snapshots);
#   2. the step-time overhead benchmark on a ~134M-parameter transformer LM, bf16-mixed, interleaved rounds.
# Usage there: bash tests/benchmarks/gpu_check.sh "$OUT"   (uses the machine's python3, which holds torch+lightning)
set -uo pipefail
OUT=${1:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true LG_GPU_OUT=$OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="--strict-markers" -m gpu \
  tests/callbacks/test_gradient_guard_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout 300 python3 -m tests.benchmarks.overhead --device cuda --precision bf16-mixed --rounds 4 --warmup 10 \
  --steps 40 --out "$OUT" 2>&1 | grep -vE "Warning|warn|LOCAL_RANK|GPU available|TPU|Tip" | tail -20
