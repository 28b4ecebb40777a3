#!/usr/bin/env bash
# Every GPU check of hf_lars in one go (under 10 minutes on one or more GPUs); a short Markdown report.
#
#   scripts/gpu_check.sh REPORT_DIR
#
# Runs, each under its own time limit, and records pass/fail counts and the tail of each log:
#   1. tests/gpu (one GPU: sync-free steps, GPU == CPU to 1e-5, bf16, GradScaler and DeepSpeed fp16 overflow
#      skips, CUDA graph capture refused, CPU partitions all-reduced under NCCL) and the other gpu-marked tests
#      (Accelerate FSDP2); with >= 2 GPUs also the NCCL variants of tests/test_sharded_exact.py (ZeRO-1/2/3,
#      ZeRO-2/3 Offload, FSDP2 exactness);
#   2. the launch-count test on this machine's CPU (tests/test_launch_counts.py);
#   3. benchmarks/cuda_step.py (time and CUDA kernels per step, fp32 and bf16) and a short
#      benchmarks/bench_step.py (the CPU step benchmark).
# NOT YET RUN ON A GPU: written on a CPU-only machine.
set -u
OUT=${1:?usage: scripts/gpu_check.sh REPORT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
REPORT="$OUT/gpu_check.md"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
START=$(date +%s)

{
  echo "# hf_lars GPU check"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  python -c "import torch; print(f'- torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {torch.cuda.nccl.version() if torch.cuda.is_available() else None}')"
  python -c "import torch; [print(f'- GPU {i}: {torch.cuda.get_device_name(i)}') for i in range(torch.cuda.device_count())]"
  echo
} > "$REPORT"

run() {  # run NAME LIMIT_S CMD...: append a result line and the log tail to the report
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1; rc=$?
  local summary
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -1)
  {
    echo "## $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc=$rc)") in $(( $(date +%s) - t0 )) s"
    echo
    [ -n "$summary" ] && echo "$summary" && echo
    echo '```'
    tail -n 25 "$log"
    echo '```'
    echo
  } >> "$REPORT"
}

if [ "$NGPU" -lt 1 ]; then
  echo "No CUDA device: nothing to check." >> "$REPORT"
  cat "$REPORT"
  exit 1
fi

run gpu_tests 200 python -m pytest -q -m gpu tests/gpu tests/test_gpu_fsdp2_accelerate.py -rfE
if [ "$NGPU" -ge 2 ]; then
  run nccl_exactness 200 python -m pytest -q -m gpu tests/test_sharded_exact.py -k nccl -rfE
else
  echo "## nccl_exactness: not run (1 GPU; the NCCL variants need 2)" >> "$REPORT"; echo >> "$REPORT"
fi
run launch_counts 40 python -m pytest -q tests/test_launch_counts.py -rfE
run cuda_step_fp32 45 python benchmarks/cuda_step.py --dtype fp32 --markdown "$OUT/cuda_step_fp32.md"
run cuda_step_bf16 45 python benchmarks/cuda_step.py --dtype bf16 --markdown "$OUT/cuda_step_bf16.md"
run bench_step_cpu 45 python benchmarks/bench_step.py --params-millions 5 --steps 5 --warmup 2 --no-peers --no-progress \
  --markdown "$OUT/bench_step_cpu.md"
for f in "$OUT"/cuda_step_*.md; do [ -f "$f" ] && cat "$f" >> "$REPORT" && echo >> "$REPORT"; done
echo "Total: $(( $(date +%s) - START )) s" >> "$REPORT"
cat "$REPORT"
! grep -q "FAILED" "$REPORT"
