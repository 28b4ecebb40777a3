#!/usr/bin/env bash
# Every GPU check of hf_lars in one go, under 10 minutes on a machine with one GPU (or more); a short report.
#
#   scripts/gpu_check.sh [REPORT_DIR]             run everything; the report is REPORT_DIR/gpu_check.md
#   scripts/gpu_check.sh --dry-run [REPORT_DIR]   run nothing on a GPU: list every part with its command and
#                                                 time limit, and check on the CPU that each pytest selection
#                                                 collects tests and each benchmark parses its arguments
#
# REPORT_DIR defaults to gpu_check_<UTC time>/ (printed first and last).  Each part runs under its own
# `timeout`; a part that fails or times out is reported as FAILED and the script goes on.  A pytest part
# that ran no test at all (everything skipped: CUDA not visible to it) is FAILED too: a check that did not
# run never passes.  Exit status: 0 when every part passed, 1 otherwise (also when there is no GPU).
#
# Parts (limits in seconds; the first three run side by side, then the benchmarks alone, so that the
# timings see an idle GPU):
#   gpu_tests       240  tests/gpu (sync-free steps, GPU == CPU, bf16, GradScaler, DeepSpeed fp16 overflow skip,
#                        CUDA graph capture refused, CPU partitions under NCCL, fused == eager on CUDA, Triton
#                        kernels generated) and the other gpu-marked tests (Accelerate FSDP2)
#   nccl_exactness  270  1 GPU: tests/test_sharded_exact.py's nccl1 cases (ZeRO-1/2/3, ZeRO-2/3 Offload, FSDP2
#                        and FSDP2 CPU offload, eager and fused, one process); >= 2 GPUs: the nccl cases of
#                        test_sharded_exact, test_sharding_layouts and test_integration_deepspeed (2 processes)
#   launch_counts    60  tests/test_launch_counts.py (kernel-launch counts, on this machine's CPU)
#   bench_fused     150  benchmarks/bench_fused.py on CUDA (eager vs fused vs torch's fastest; compile time)
#   cuda_step       2x40 benchmarks/cuda_step.py, fp32 and bf16 (time and CUDA kernels per step)
#   bench_step       45  a short benchmarks/bench_step.py on the CPU
# Worst case (every part at its limit): 270 + 275 s, plus start-up.
# NOT YET RUN ON A GPU: written on a CPU-only machine; the dry run is what has been checked.
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-gpu_check_$(date -u +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "gpu_check: writing to $OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
REPORT="$OUT/gpu_check.md"
START=$(date +%s)
NGPU=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

if [ "$NGPU" -ge 2 ]; then
  NCCL_TESTS=(tests/test_sharded_exact.py tests/test_sharding_layouts.py tests/test_integration_deepspeed.py)
  NCCL_SELECT="nccl and not nccl1"
else
  NCCL_TESTS=(tests/test_sharded_exact.py)
  NCCL_SELECT="nccl1"
fi
PYTEST=(python -m pytest -q -rfE -p no:cacheprovider)
CPU_BENCH=(python benchmarks/bench_step.py --params-millions 5 --steps 5 --warmup 2 --no-peers --no-progress)

{
  echo "# hf_lars GPU check$([ $DRY -eq 1 ] && echo ' (dry run: nothing ran on a GPU)')"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  python -c "import torch; print(f'- torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {torch.cuda.nccl.version() if torch.cuda.is_available() else None}')"
  python -c "import torch; [print(f'- GPU {i}: {torch.cuda.get_device_name(i)}') for i in range(torch.cuda.device_count())]"
  echo "- CPUs: $(nproc), load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
  echo
} > "$REPORT"

if [ "$NGPU" -lt 1 ] && [ $DRY -eq 0 ]; then
  echo "No CUDA device: nothing to check." >> "$REPORT"
  cat "$REPORT"
  exit 1
fi

# part NAME LIMIT_S CMD...: run CMD under `timeout` (in the background with BG=1), its log in OUT/NAME.log and
# its report section in OUT/NAME.section.  Dry run: record the command, and for pytest collect instead of run.
part() {
  local name=$1 limit=$2; shift 2
  echo "$name" >> "$OUT/parts"
  local fn=run_part
  [ $DRY -eq 1 ] && fn=dry_part
  if [ "${BG:-0}" -eq 1 ]; then
    $fn "$name" "$limit" "$@" &
  else
    $fn "$name" "$limit" "$@"
  fi
}

run_part() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" t0 rc status summary
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1; rc=$?
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)' "$log" | tail -1)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="FAILED (timed out after $limit s)"
  elif [ $rc -ne 0 ]; then
    status="FAILED (rc=$rc)"
  elif [ "$1" = python ] && [ "${3:-}" = pytest ] && ! grep -qE '[0-9]+ passed' <<< "$summary"; then
    status="FAILED (no test ran)"
  else
    status=ok
  fi
  {
    echo "## $name: $status in $(( $(date +%s) - t0 )) s"
    echo
    echo "\`$*\`"
    echo
    [ -n "$summary" ] && echo "$summary" && echo
    if [ "$status" != ok ]; then echo '```'; tail -n 30 "$log"; echo '```'; echo; fi
  } > "$OUT/$name.section"
}

dry_part() {  # the command, and what can be checked of it without a GPU
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" check status=ok
  if [ "$1" = python ] && [ "${3:-}" = pytest ]; then
    "$@" --collect-only > "$log" 2>&1 || status="FAILED (collection)"
    check="$(grep -cE '::' "$log") tests collected"
    [ "${check%% *}" -gt 0 ] || status="FAILED (nothing collected)"
  else
    local script
    for script in "$@"; do [[ $script == *.py ]] && break; done
    timeout 60 python "$script" --help > "$log" 2>&1 || status="FAILED (--help)"
    check="$script --help parses"
  fi
  {
    echo "## $name: would run (limit $limit s): $status"
    echo
    echo "\`$*\`"
    echo
    echo "$check"
    if [ "$status" != ok ]; then echo '```'; tail -n 30 "$log"; echo '```'; fi
    echo
  } > "$OUT/$name.section"
}

rm -f "$OUT/parts"
BG=1 part gpu_tests 240 "${PYTEST[@]}" -m gpu tests/gpu tests/test_gpu_fsdp2_accelerate.py
BG=1 part nccl_exactness 270 "${PYTEST[@]}" -m gpu "${NCCL_TESTS[@]}" -k "$NCCL_SELECT"
BG=1 part launch_counts 60 "${PYTEST[@]}" tests/test_launch_counts.py
wait
part bench_fused 150 python benchmarks/bench_fused.py --steps 15 --threads 4 --markdown "$OUT/bench_fused.md"
part cuda_step_fp32 40 python benchmarks/cuda_step.py --dtype fp32 --markdown "$OUT/cuda_step_fp32.md"
part cuda_step_bf16 40 python benchmarks/cuda_step.py --dtype bf16 --markdown "$OUT/cuda_step_bf16.md"
part bench_step_cpu 45 "${CPU_BENCH[@]}" --markdown "$OUT/bench_step_cpu.md"

FAILED=()
while read -r name; do
  grep -q "FAILED" "$OUT/$name.section" && FAILED+=("$name")
done < "$OUT/parts"
{
  echo "**Summary: $(wc -l < "$OUT/parts") parts, ${#FAILED[@]} failed${FAILED[*]:+: ${FAILED[*]}}** (total $(( $(date +%s) - START )) s)"
  echo
  while read -r name; do cat "$OUT/$name.section"; done < "$OUT/parts"
  for f in "$OUT"/bench_fused.md "$OUT"/cuda_step_*.md; do
    [ -f "$f" ] && echo "### $(basename "$f" .md)" && echo && cat "$f" && echo
  done
} >> "$REPORT"
cat "$REPORT"
echo "gpu_check: report in $REPORT"
[ ${#FAILED[@]} -eq 0 ]
