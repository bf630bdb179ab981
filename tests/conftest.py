"""Shared pytest setup: markers, GPU auto-skip, and the `cpu_pool` fixture for multi-rank tests.

The harness module is imported lazily, so host-only tests never depend on it.
"""

import sys

import pytest

# Workers of CPU tests: Triton interpreter, CPU peer memory, short device waits (a lost peer fails
# in 30 s, well under the pool's task timeouts), and one intra-op thread per rank because the CI
# box has 2 cores shared by up to 4 ranks.
CPU_POOL_ENV = {
    "TRITON_INTERPRET": "1",
    "TRITONEP_BACKEND": "cpu",
    "TRITONEP_TIMEOUT_S": "30",
    "OMP_NUM_THREADS": "1",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs (skipped without them)")
    config.addinivalue_line("markers", "world_size(n): needs n ranks (n GPUs for gpu tests)")


def pytest_collection_modifyitems(config, items):
    # Tiers: `gpu` (marked by hand), `interpreter` (kernels in the Triton interpreter: rank
    # processes or a fresh interpreter process), `aot` (by hand: compiles for sm_90 without a GPU),
    # `unit` (host-only and quick: the one-minute subset), `slow` (by hand: wider variants of what
    # the default run already covers, skipped unless `-m` names them). The README's test command on
    # this 2-core machine: 1705 s, 1374 s with the slow tier (6fcb26d), 630 s once the interpreter
    # stopped re-patching triton.language per helper call (kernels/common/interpreter.py).
    run_slow = "slow" in (config.getoption("-m") or "")
    for item in items:
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="extended CPU run: select it with -m slow"))
        if any(item.get_closest_marker(m) for m in ("gpu", "interpreter", "aot")):
            continue
        item.add_marker(
            pytest.mark.interpreter if "cpu_pool" in item.fixturenames else pytest.mark.unit
        )
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only now: collecting host-only tests must not touch CUDA

    num_gpus = torch.cuda.device_count()
    for item in gpu_items:
        marker = item.get_closest_marker("world_size")
        needed = marker.args[0] if marker else 1
        if num_gpus < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} GPU(s), found {num_gpus}"))


@pytest.fixture
def cpu_pool():
    """Factory: `cpu_pool(world_size, **env)` -> a cached `RankPool` with `CPU_POOL_ENV` + env."""
    from tritonep.testing.dist import get_pool

    def make(world_size: int, **env):
        return get_pool(world_size, {**CPU_POOL_ENV, **env})

    return make


def pytest_sessionfinish(session, exitstatus):
    dist = sys.modules.get("tritonep.testing.dist")
    if dist is not None:
        dist.close_all_pools()


# GPU pools: one process per GPU, NCCL group, NVLink multicast off (shared machines).
GPU_POOL_ENV = {
    "RANKPOOL_PG_BACKEND": "nccl",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TRITONEP_TIMEOUT_S": "60",
}


@pytest.fixture
def gpu_pool():
    """Factory: `gpu_pool(world_size, **env)` -> a cached NCCL `RankPool`, one rank per GPU."""
    from tritonep.testing.dist import get_pool

    def make(world_size: int, **env):
        return get_pool(world_size, {**GPU_POOL_ENV, **env})

    return make


# Ranks sharing GPU 0: gloo group, CUDA backend, multicast off. Ranks that spin in their kernels
# need MPS to run concurrently (`scripts/gpu_check.sh` starts it); NVSHMEM ranks also need MPS
# shares adding up to at most 100 (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, set per test).
SHARED_GPU_ENV = {
    "TRITONEP_BACKEND": "cuda",
    "TRITON_INTERPRET": "0",
    "CUDA_VISIBLE_DEVICES": "0",
    "TRITONEP_TIMEOUT_S": "60",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@pytest.fixture
def shared_gpu_pool():
    """Factory: `shared_gpu_pool(world_size, **env)` -> a cached `RankPool` whose ranks share GPU
    0."""
    from tritonep.testing.dist import get_pool

    def make(world_size: int, **env):
        return get_pool(world_size, {**SHARED_GPU_ENV, **env})

    return make


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
