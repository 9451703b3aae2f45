#!/usr/bin/env bash
# One GPU check of mmard_jax on one H100/H200, in at most ~8 minutes, with nothing installed beyond the device image.
#
#   scripts/gpu_check.sh OUT_DIR          # on the GPU machine
#   scripts/gpu_check.sh --dry OUT_DIR    # the same parts with tiny cases on the CPU (tests/test_gpu_check.py)
#
# Parts, each under its own time cap (seconds; override with GPU_CHECK_CAP_A .. _D), so one slow part cannot eat
# the others; each part's status, output and log go to a work folder, and the last step writes OUT_DIR/summary.md,
# OUT_DIR/results.json and OUT_DIR/logs.txt (three files: the device tool returns at most 8 from $OUT):
#   (a) 45 s   scripts/gpu_check.py smoke: a tiny MMARD train step (jit + shard_map) and an evaluation (clean,
#              PGD-20) on the GPU, checked against the same on the CPU at float32 precision 'highest'.
#   (b) 240 s  scripts/benchmark.py --match_dtype: MMARD RN-18 <- WRN-34-10, RSLAD RN-18 <- WRN-34-10, MMARD MNV2
#              <- WRN-34-10, batch 128, each in bfloat16 (vs PyTorch bf16 + channels_last + compile) and float32
#              (vs PyTorch eager float32), in that order of priority; rows that cannot start before the cap are
#              recorded as skipped (benchmark.py --deadline_s), every row's JSON is kept as it lands.
#   (c) 80 s   scripts/benchmark.py --impls=jax on RN-18 <- WRN-16-2 (batch 128, 32x32, bf16, PGD-10): rolled vs
#              fully unrolled PGD loop (--unroll=1,full) x our conv2d input gradient vs the library's
#              (--conv_grad=custom,lax).
#   (d) 80 s   scripts/benchmark_autoattack.py on 1000 CIFAR-shaped examples, batch 500: ours vs the reference
#              implementation on the same ResNet-18 weights (its --peer=original where the script has that flag).
#   (e)        peak device memory of every case above, from their rows (summary.md).
#
# Packages: the image has jax, flax, optax, chex, orbax, torch and triton, not robustbench (its architecture files),
# torchattacks, pyautoattack or ml_collections. Carry them as plain source, prepared on the CPU machine with
#   scripts/gpu_prepare.sh                 # copies them from the local environment into .gpu_site/ (git-ignored)
# and name `.gpu_site` in the device tool's `carry`; this script puts .gpu_site on PYTHONPATH when it exists.
set -u

DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
OUT=${1:?usage: scripts/gpu_check.sh [--dry] OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$ROOT/.gpu_site" ]; then export PYTHONPATH="$ROOT/.gpu_site:$PYTHONPATH"; fi

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  # The dry run checks the parts' paths, not speed: XLA:CPU compiles with less LLVM effort (2.5x faster here).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  CAP_A=${GPU_CHECK_CAP_A:-150}; CAP_B=${GPU_CHECK_CAP_B:-150}; CAP_C=${GPU_CHECK_CAP_C:-100}
  CAP_D=${GPU_CHECK_CAP_D:-0}  # 0: skipped (the dry AutoAttack compiles four attacks: too slow for a test)
  BENCH_CASES=tiny; BENCH_FORMS=eager; LOOP_CASE=tiny; LOOP_UNROLL=1; LOOP_CONV=lax; BENCH_UNROLL=1
  # Part (b)'s JAX row is part (c)'s (unroll=1, conv_grad=lax): with one compilation cache (c) loads its program.
  BENCH_CONV=lax; CACHE="$WORK/xla_cache"
  AA_ARGS="--n_examples=16 --batch_size=16 --n_iter=2 --targets=1 --queries=5"
  STEPS="--warmup=1 --steps=1"
else
  CAP_A=${GPU_CHECK_CAP_A:-45}; CAP_B=${GPU_CHECK_CAP_B:-240}; CAP_C=${GPU_CHECK_CAP_C:-80}
  CAP_D=${GPU_CHECK_CAP_D:-80}
  BENCH_CASES=mmard_rn18_wrn34_10,mmard_rn18_wrn34_10_f32,rslad_rn18_wrn34_10,rslad_rn18_wrn34_10_f32
  BENCH_CASES=$BENCH_CASES,mmard_mnv2_wrn34_10,mmard_mnv2_wrn34_10_f32
  BENCH_FORMS=eager,cl+compile+bf16; LOOP_CASE=probe_mmard_rn18_wrn16_2_bf16; LOOP_UNROLL=1,full
  LOOP_CONV=custom,lax; BENCH_UNROLL=auto
  BENCH_CONV=""; CACHE=off  # the measured compile times are real compilations
  AA_ARGS="--n_examples=1000 --batch_size=500"
  STEPS="--warmup=2 --steps=5"
fi

"$PY" - "$WORK/env.json" "$DRY" <<'EOF'
import json, subprocess, sys, time
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    smi = ""
json.dump({"mode": "dry (CPU)" if sys.argv[2] == "1" else "GPU", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "nvidia_smi": smi or "no nvidia-smi"}, open(sys.argv[1], "w"))
EOF

# part NAME CAP COMMAND...: runs COMMAND under `timeout CAP` with its output in WORK/NAME.log, and writes
# WORK/NAME.status.json ({status: ok | failed (exit N) | timed out | skipped, seconds, cap_s}).
part() {
  local name=$1 cap=$2; shift 2
  if [ "$cap" -le 0 ]; then
    printf '{"status": "skipped (cap 0)", "seconds": 0, "cap_s": 0}\n' > "$WORK/$name.status.json"
    return
  fi
  local start=$SECONDS
  timeout -k 10 "$cap" "$@" > "$WORK/$name.log" 2>&1
  local rc=$? status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out"; elif [ $rc -ne 0 ]; then status="failed (exit $rc)"; fi
  printf '{"status": "%s", "seconds": %d, "cap_s": %d}\n' "$status" $((SECONDS - start)) "$cap" > "$WORK/$name.status.json"
  echo "[gpu_check] $name: $status after $((SECONDS - start)) s (cap $cap s)"
}

part a_smoke "$CAP_A" "$PY" scripts/gpu_check.py smoke "$WORK/a_smoke.json"
# benchmark.py stops starting rows 10 s before the part's cap and writes its JSON after every row.
part b_bench "$CAP_B" "$PY" scripts/benchmark.py --cases="$BENCH_CASES" --torch_forms="$BENCH_FORMS" --match_dtype \
  --unroll="$BENCH_UNROLL" --conv_grad="$BENCH_CONV" --compilation_cache="$CACHE" \
  $STEPS --deadline_s=$((CAP_B - 10)) --json="$WORK/b_bench.json" --append="$WORK/b_bench.md" --title="gpu_check (b)"
part c_settings "$CAP_C" "$PY" scripts/benchmark.py --cases="$LOOP_CASE" --impls=jax --unroll="$LOOP_UNROLL" \
  --conv_grad="$LOOP_CONV" --compilation_cache="$CACHE" $STEPS --deadline_s=$((CAP_C - 10)) --json="$WORK/c_settings.json" \
  --append="$WORK/c_settings.md" --title="gpu_check (c)"
PEER=""
if "$PY" scripts/benchmark_autoattack.py --help 2>/dev/null | grep -q -- "--peer"; then PEER="--peer=original"; fi
# shellcheck disable=SC2086
part d_autoattack "$CAP_D" "$PY" scripts/benchmark_autoattack.py $AA_ARGS $PEER --output="$WORK/d_autoattack.jsonl"

"$PY" scripts/gpu_check.py summary "$WORK" "$OUT"
