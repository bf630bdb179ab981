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

# Program-shape variants compared in the same run (see Buffer._tuning).
VARIANTS=${VARIANTS:-'[{"prefetch": false}, {"dispatch_warps": 4, "combine_warps": 4}, {"dispatch_warps": 16, "combine_warps": 16, "dispatch_tile_words": 16384, "combine_tile_words": 16384}, {"dispatch_tile_words": 16384, "combine_tile_words": 16384}, {"combine_tile": 16}]'}
if [ "$NGPU" -ge 2 ]; then
  echo "== dispatch/combine benchmark, EP$NGPU"
  timeout 420 python3 -m tritonep.bench --sweep --variants "$VARIANTS" ${BENCH_ARGS:-} --json "$OUT/bench-ep$NGPU-$STAMP.json" 2>&1 | tail -45
else
  echo "== one GPU: local copy path (EP1) and copy patterns"
  timeout 200 python3 -m tritonep.bench --ranks 1 --no-check --variants "$VARIANTS" --json "$OUT/bench-ep1-$STAMP.json" 2>&1 | tail -20
  timeout 300 python3 benchmarks/copy_patterns.py --json "$OUT/copy-patterns-$STAMP.json" 2>&1 | tail -12
fi
