#!/usr/bin/env bash
# One call on a GPU machine: GPU tests, layout kernel timing, dispatch/combine benchmark.
# Results land in $OUT (the device tool fetches them); the short table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/tritonep-gpu}"
mkdir -p "$OUT"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
echo "== $NGPU GPU(s)"; cat "$OUT/gpus.txt"

echo "== GPU tests"
timeout 420 python3 -m pytest tests -m gpu -q -x -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest-$STAMP.log" | tail -15

echo "== layout kernel"
timeout 120 python3 benchmarks/layout_kernel.py --json "$OUT/layout-$STAMP.json" 2>&1 | tail -6

if [ "$NGPU" -ge 2 ]; then
  echo "== dispatch/combine benchmark, EP$NGPU"
  timeout 420 python3 -m tritonep.bench --sweep ${BENCH_ARGS:-} --json "$OUT/bench-ep$NGPU-$STAMP.json" 2>&1 | tail -40
fi
