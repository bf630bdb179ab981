#!/usr/bin/env bash
# The GPU tests and benchmarks in one script: GPU tests, internode checks and timings, layout and
# host-path timings, dispatch/combine benchmark, low-latency benchmark, NVSHMEM layer check,
# pressure run. Results land in $OUT (default /tmp/tritonep-gpu); each stage prints its figures and
# the script ends with a one-line-per-record table (scripts/gpu_summary.py).
#
#   STAGES="tests internode layout host scaling bench shapes ll llgrid sanitize nvshmem cli pressure"
#       (default: all but the sweeps shapes and llgrid, sanitize and cli)
#       which parts to run; all of them take 20-25 minutes on 2 GPUs, the tests alone over 9 (2xH200:
#       the first ten, through the low-latency test, ran 545 s; then NVSHMEM layer 64 s, shared GPU
#       25 s, MoE layer 13 s, profiler names 11 s), so a machine with a time limit per command may
#       want them split with PYTEST_K, then "internode nvshmem", then "ll bench", then the rest
#   PYTEST_K="expr"          only the GPU tests whose names match (pytest -k)
#   HOST_ARGS="--profile"    extra arguments of benchmarks/host_overhead.py
#   SANITIZE_K="expr"        the GPU tests the sanitize stage runs (default: low_latency_timeout)
#   SANITIZE_TOOLS="memcheck synccheck"   compute-sanitizer tools, one run each (default: both)
#   TESTS_TIMEOUT=540 / INTERNODE_TIMEOUT / LL_TIMEOUT / LL_PUT_TIMEOUT / NVSHMEM_TIMEOUT   limits (s)
#   TRITONEP_COMMIT=<hash>   recorded in the JSON files (the GPU machine's copy has no .git)
#   PRESSURE_SECONDS=240     time budget of the pressure stage
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/tritonep-gpu}"
STAGES="${STAGES:-tests internode layout host scaling bench ll nvshmem pressure}"
mkdir -p "$OUT"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
echo "== $NGPU GPU(s), stages: $STAGES"; cat "$OUT/gpus.txt"
has() { [[ " $STAGES " == *" $1 "* ]]; }

# sweep VARIABLE "v1;v2;..." PREFIX PATTERN command...: runs the command once per value (empty =
# built-in) with VARIABLE set to it, for at most 120 s, its JSON in $OUT/PREFIX-<value>.json, and
# prints the output lines matching PATTERN.
sweep() {
  local variable=$1 prefix=$3 pattern=$4 value name values
  IFS=';' read -ra values <<< "$2"
  shift 4
  for value in "${values[@]}"; do
    name=$(echo "${value:-built-in}" | tr ',=' '-_')
    echo "== $variable=${value:-built-in}"
    env "$variable=$value" timeout 120 "$@" --json "$OUT/$prefix-$name.json" 2>&1 | grep "$pattern"
  done
}

# Two ranks on one GPU run concurrently only under MPS (otherwise the GPU time-slices between the
# processes and spinning kernels crawl): start the daemon for the shared-GPU benchmark.
mps_start() {
  command -v nvidia-cuda-mps-control >/dev/null || return 1
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/tritonep-mps CUDA_MPS_LOG_DIRECTORY=/tmp/tritonep-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && sleep 1
}
mps_stop() { echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; }

# Under MPS: the tests with ranks sharing GPU 0 spin in their kernels, and time-slicing makes them
# crawl (the low-latency one ran past 150 s without it); NVSHMEM ranks sharing a GPU need it too.
if has tests; then
  echo "== GPU tests"
  mps_start || echo "(no MPS daemon: tests with ranks sharing a GPU time-slice or skip)"
  timeout ${TESTS_TIMEOUT:-540} python3 -m pytest tests -m gpu -v -rs --durations=0 -p no:cacheprovider \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest.log" | tail -40
  mps_stop
fi

# Internode mode: 2 x 1 with one rank per GPU where there are two (cross-node bytes: stores to
# NVSHMEM-mapped peers), and 2 x 2 with 4 ranks sharing GPU 0 under MPS, NVSHMEM puts forced.
if has internode; then
  if [ "$NGPU" -ge 2 ]; then
    echo "== internode 2 nodes x 1 rank, one rank per GPU"
    TRITONEP_TIMEOUT_S=30 timeout ${INTERNODE_TIMEOUT:-200} python3 benchmarks/internode.py --ranks 2 --nodes 2 \
      ${INTERNODE_ARGS:-} --json "$OUT/internode-2x1.json" 2>&1 | grep -v "Warning\|warn" | tail -25
  fi
  mps_start || echo "(no MPS daemon: NVSHMEM ranks sharing a GPU may fail)"
  echo "== internode 2 nodes x 2 ranks, 4 ranks sharing GPU 0, NVSHMEM puts between the nodes"
  CUDA_VISIBLE_DEVICES=0 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25 TRITONEP_TIMEOUT_S=30 TRITONEP_FORCE_PUT=1 \
    timeout ${INTERNODE_TIMEOUT:-200} python3 benchmarks/internode.py --ranks 4 --nodes 2 --no-baseline \
    ${INTERNODE_ARGS:-} --json "$OUT/internode-2x2-shared-put.json" 2>&1 | grep -v "Warning\|warn" | tail -25
  mps_stop
fi

if has layout; then
  echo "== layout kernel"
  timeout 120 python3 benchmarks/layout_kernel.py --json "$OUT/layout.json" 2>&1 | tail -6
fi

if has host; then
  echo "== host path of layout / dispatch / combine"
  timeout 240 python3 benchmarks/host_overhead.py --num-sms 24 ${HOST_ARGS:-} --json "$OUT/host-overhead.json" 2>&1 \
    | tee "$OUT/host-overhead.txt" | grep -v "^$\|Warning" | sed -n 1,40p
fi

if has scaling; then
  echo "== kernel time against SM count (one rank, local copy path)"
  timeout 200 python3 benchmarks/sm_scaling.py --json "$OUT/sm-scaling.json" 2>&1 | grep -v "Warning\|warn"
fi

if has bench; then
  if [ "$NGPU" -ge 2 ]; then
    echo "== dispatch/combine benchmark, EP$NGPU"
    timeout 420 python3 -m tritonep bench --sweep --quiet ${BENCH_ARGS:-} --json "$OUT/bench-ep$NGPU.json" 2>&1 | tail -45
  else
    echo "== one GPU: local copy path (EP1)"
    timeout 200 python3 -m tritonep bench --ranks 1 --check none --quiet ${BENCH_ARGS:-} --json "$OUT/bench-ep1.json" 2>&1 | tail -40
    if mps_start; then
      echo "== one GPU, two ranks under MPS (queue protocol over HBM; not an NVLink figure)"
      TRITONEP_TIMEOUT_S=30 timeout 240 python3 -m tritonep bench --ranks 2 --quiet ${BENCH_ARGS:-} --json "$OUT/bench-ep2-mps.json" 2>&1 | tail -40
      mps_stop
    else
      echo "(no MPS daemon: skipping the two-ranks-on-one-GPU benchmark)"
    fi
  fi
fi

# Program shapes of the intranode kernels (warps, register tile, prefetch) at the default configs:
# one benchmark per TRITONEP_PROGRAM_SHAPE value of SHAPES (';'-separated; empty = built-in).
if has shapes; then
  TRITONEP_TIMEOUT_S=30 sweep TRITONEP_PROGRAM_SHAPE \
    "${SHAPES:-;dispatch_warps=16;dispatch_tile_words=16384;dispatch_tile_words=4096;combine_tile=4;combine_tile=16;prefetch=0;combine_receiver_stages=1}" \
    shape "^dispatch\|^combine" \
    python3 -m tritonep bench --check none --quiet ${BENCH_ARGS:-}
fi

# Low-latency mode: ranks sharing GPU 0 under MPS (the one-GPU acceptance setting), one rank per
# GPU where there are several, and every peer through NVSHMEM puts (MPS shares must add up to 100).
if has ll; then
  mps_start || echo "(no MPS daemon: ranks sharing a GPU time-slice)"
  echo "== low-latency, 2 ranks sharing GPU 0"
  CUDA_VISIBLE_DEVICES=0 TRITONEP_TIMEOUT_S=30 timeout ${LL_TIMEOUT:-150} python3 benchmarks/low_latency.py --ranks 2 \
    ${LL_ARGS:-} --json "$OUT/ll-shared-ep2.json" 2>&1 | tail -4
  if [ "$NGPU" -ge 2 ]; then
    echo "== low-latency, one rank per GPU (EP$NGPU)"
    TRITONEP_TIMEOUT_S=30 timeout ${LL_TIMEOUT:-150} python3 benchmarks/low_latency.py --ranks "$NGPU" ${LL_ARGS:-} \
      --json "$OUT/ll-ep$NGPU.json" 2>&1 | tail -4
  fi
  echo "== low-latency, 2 ranks sharing GPU 0, forced NVSHMEM put path"
  # NVSHMEM-linked kernels compile slowly: 100 s was not enough for this run (2026-11-30).
  CUDA_VISIBLE_DEVICES=0 TRITONEP_FORCE_PUT=1 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 TRITONEP_TIMEOUT_S=30 \
    timeout ${LL_PUT_TIMEOUT:-220} python3 benchmarks/low_latency.py --ranks 2 --replays 20 ${LL_ARGS:-} \
    --json "$OUT/ll-shared-ep2-put.json" 2>&1 | tail -4
  echo "== low-latency, 4 ranks sharing GPU 0"
  CUDA_VISIBLE_DEVICES=0 TRITONEP_TIMEOUT_S=30 timeout ${LL_TIMEOUT:-150} python3 benchmarks/low_latency.py --ranks 4 \
    --replays 20 ${LL_ARGS:-} --json "$OUT/ll-shared-ep4.json" 2>&1 | tail -6
  mps_stop
fi

# Low-latency programs per launch: one unchecked timing run (2 ranks sharing GPU 0) per
# TRITONEP_LL_PROGRAMS value of LL_GRIDS (';'-separated; empty = built-in).
if has llgrid; then
  mps_start || echo "(no MPS daemon: ranks sharing a GPU time-slice)"
  CUDA_VISIBLE_DEVICES=0 TRITONEP_TIMEOUT_S=20 sweep TRITONEP_LL_PROGRAMS \
    "${LL_GRIDS:-;dispatch_senders=128;dispatch_receivers=64;combine_senders=96;combine_receivers=96}" \
    llgrid "^rank" \
    python3 benchmarks/low_latency.py --ranks 2 --no-check --replays 10
  mps_stop
fi

# Device faults on an error path, located by compute-sanitizer: the GPU tests matching SANITIZE_K
# (default: the LL timeout test, whose peer makes no GPU calls, so its ranks need no MPS, which the
# sanitizer does not support). memcheck finds bad addresses; synccheck finds block barriers that
# the threads of a program reach on different paths (kernels/common/sync.py, "Uniform branches").
# One log per tool and process; the summary prints the first findings.
if has sanitize; then
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in ${SANITIZE_TOOLS:-memcheck synccheck}; do
    echo "== compute-sanitizer $tool: ${SANITIZE_K:-low_latency_timeout}"
    timeout ${SANITIZE_TIMEOUT:-240} "$SANITIZER" --tool "$tool" --target-processes all --print-limit 4 \
      --log-file "$OUT/sanitizer-$tool-%p.txt" python3 -m pytest tests -m gpu -v -p no:cacheprovider \
      -k "${SANITIZE_K:-low_latency_timeout}" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -8
    grep -h -A8 "Invalid\|Illegal\|Misaligned\|Barrier\|divergent" "$OUT"/sanitizer-"$tool"-*.txt 2>/dev/null \
      | grep -v "Host Frame" | head -40
  done
fi

if has nvshmem; then
  mps_start || true
  echo "== NVSHMEM layer, 2 and 4 ranks sharing GPU 0"
  CUDA_VISIBLE_DEVICES=0 timeout ${NVSHMEM_TIMEOUT:-200} python3 scripts/nvshmem_check.py --json "$OUT/nvshmem.json" \
    2>&1 | tail -12
  mps_stop
fi

# The `tritonep` command as a newcomer meets it on one GPU: the environment report, the benchmark
# with charts (two ranks sharing GPU 0 under MPS where there is one GPU), and a short tuning sweep
# whose config file a Buffer then reads.
if has cli; then
  CLI_RANKS=$(( NGPU >= 2 ? NGPU : 2 ))
  echo "== tritonep check --ranks $CLI_RANKS"
  timeout 90 python3 -m tritonep check --ranks "$CLI_RANKS" --json "$OUT/check.json" 2>&1 | tail -40
  [ "$NGPU" -ge 2 ] || mps_start || true
  echo "== tritonep bench --plot, $CLI_RANKS ranks"
  TRITONEP_TIMEOUT_S=30 timeout 240 python3 -m tritonep bench --ranks "$CLI_RANKS" --sweep --sweep-sms 24 48 \
    --sweep-dispatch-chunks 16 32 --sweep-combine-chunks 8 16 --plot "$OUT/plots" \
    --json "$OUT/cli-bench.json" 2>&1 | tail -40
  echo "== tritonep tune, $CLI_RANKS ranks"
  TRITONEP_TIMEOUT_S=30 timeout 240 python3 -m tritonep tune --ranks "$CLI_RANKS" --sms 24 48 --dispatch-chunks 16 32 \
    --combine-chunks 8 16 --output "$OUT/tuned-config.json" --json "$OUT/cli-tune.json" 2>&1 | tail -30
  [ "$NGPU" -ge 2 ] || mps_stop
fi

if has pressure; then
  RANKS=$(( NGPU >= 2 ? NGPU : 2 ))
  echo "== pressure, $RANKS ranks"
  [ "$NGPU" -ge 2 ] || mps_start || true
  timeout $(( ${PRESSURE_SECONDS:-240} + 60 )) python3 -m tritonep pressure --quiet --ranks "$RANKS" --rounds 10000 \
    --seconds "${PRESSURE_SECONDS:-240}" --json "$OUT/pressure.json" 2>&1 | tail -8
  [ "$NGPU" -ge 2 ] || mps_stop
fi
python3 scripts/gpu_summary.py "$OUT"
