#!/usr/bin/env bash
# The GPU checks, as ONE prepared script for a lent H100/H200.
#   bash tests/benchmarks/gpu_check.sh OUT [all|tests|gradient_guard|l1|oom|guards|sharded]  (default: all, about 8 minutes)
#   tests:          the `gpu`-marked tests (CUDA GradScaler under 16-mixed, fused AdamW under bf16-mixed, FSDP on one
#                   GPU, rollback from pinned asynchronous snapshots, torchao int4 weight-only quantise + export, all guards
#                   together under 16-mixed / bf16-mixed, single device and FSDP on one GPU)
#   gradient_guard: step-time overhead of GradientGuard on a ~135M-parameter transformer LM, bf16-mixed
#   l1:             step-time overhead of L1Penalty (subgradient, proximal) vs the loss-term idiom, same model
#   guards:         all step-path guards together vs bare and vs Lightning's gradient_clip_val + SpikeDetection,
#                   ~134M LM, bf16-mixed and 16-mixed (target <= 3% over bare)
#   sharded:        FSDP2 (ModelParallelStrategy + fully_shard) and FSDP1 (strategy="fsdp") on one GPU, bf16-mixed,
#                   GradientGuard, L1Penalty, OverfitGuard, WarmupCosine with a NaN loss and NaN gradients on rank 0,
#                   FSDP2 also OOMGuard with simulated OOMs in forward and backward (FSDP2 reset on CUDA)
#                   (tests/sharded/run_guards.py -> OUT/sharded_<strategy>/result.json; events printed)
#   oom:            OOMGuard against a real CUDA out-of-memory under a 2.5 GiB cap: completes, matches a micro-batched
#                   reference, recovery time (tests/callbacks/test_oom_guard_gpu.py -> OUT/oom_guard_gpu.json)
# Uses the machine's python3 (which holds torch + lightning); writes logs and JSON/markdown tables into OUT.
set -uo pipefail
OUT=${1:-gpu_out}
PART=${2:-all}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true LG_GPU_OUT=$OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"
FILTER='Warning|warn|LOCAL_RANK|GPU available|TPU|Tip'
if [[ $PART == all || $PART == tests ]]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="--strict-markers" -m gpu \
    tests/callbacks/test_gradient_guard_gpu.py tests/callbacks/test_compress_export_gpu.py tests/test_all_guards_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $PART == all || $PART == gradient_guard ]]; then
  timeout 300 python3 -m tests.benchmarks.overhead --device cuda --precision bf16-mixed --rounds 4 --warmup 10 \
    --steps 40 --out "$OUT" 2>&1 | grep -vE "$FILTER" | tail -20
fi
if [[ $PART == all || $PART == l1 ]]; then
  timeout 200 python3 -m tests.benchmarks.overhead --suite l1 --device cuda --precision bf16-mixed --rounds 4 \
    --warmup 10 --steps 40 --out "$OUT" 2>&1 | grep -vE "$FILTER" | tail -12
fi
if [[ $PART == all || $PART == oom ]]; then
  timeout 120 python3 -m pytest -q -s -p no:cacheprovider -o addopts="--strict-markers" -m gpu \
    tests/callbacks/test_oom_guard_gpu.py 2>&1 | grep -vE "$FILTER" | tee "$OUT/oom_gpu_tests.log" | tail -30
fi
if [[ $PART == all || $PART == guards ]]; then
  for P in bf16-mixed 16-mixed; do
    timeout 150 python3 -m tests.benchmarks.overhead --suite all --device cuda --precision $P --rounds 3 --warmup 10 \
      --steps 30 --out "$OUT/$P" 2>&1 | grep -vE "$FILTER" | tail -8
  done
fi
if [[ $PART == all || $PART == sharded ]]; then
  for S in fsdp2 fsdp1; do
    G=wc,gg,l1,of,cx; [[ $S == fsdp2 ]] && G=wc,gg,l1,of,oom,cx  # FSDP2: OOMGuard's reset after a failed attempt
    timeout 150 python3 -m tests.sharded.run_guards --strategy $S --accelerator gpu --devices 1 --fault-rank 0 \
      --precision bf16-mixed --guards $G --out "$OUT/sharded_$S" 2>&1 | grep -vE "$FILTER" | tail -4
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['global_step'], r['val_loss'], \
      [(e['guard'], e['kind'], e['step']) for e in r['events']])" "$OUT/sharded_$S/result.json" $S
  done
fi
