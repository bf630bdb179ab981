"""The whole intranode API under a default device and dtype, as DeepEP's own tests run it.

DeepEP-style scripts call `torch.set_default_device('cuda')` (and sometimes
`torch.set_default_dtype(torch.bfloat16)`) before building the Buffer. Every tensor tritonep
allocates must therefore name its device and dtype. On the CPU the default device is `meta`: a
tensor allocated without naming its device then has no storage, so the first kernel or copy that
touches it fails instead of passing by accident.
"""

import pytest
import torch

from conftest import gpu_count
from tritonep.testing import checks

# A buffer size no other test uses: `checks.get_buffer` caches Buffers per size in the worker, and
# the construction itself must happen under the defaults.
NVL_BYTES_UNDER_DEFAULTS = (8 << 20) + 4096


def intranode_under_defaults(ctx, default_device: str, default_dtype: torch.dtype, **case) -> dict:
    torch.set_default_device(default_device)
    torch.set_default_dtype(default_dtype)
    try:
        return checks.check_intranode(ctx, **case)
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(torch.float32)


def test_intranode_under_default_device_and_dtype_cpu(cpu_pool):
    results = cpu_pool(2).run(
        intranode_under_defaults,
        "meta",
        torch.bfloat16,
        num_tokens=12,
        hidden=64,
        num_topk=3,
        num_experts=8,
        num_nvl_bytes=NVL_BYTES_UNDER_DEFAULTS,
        matrix="quick",
        timeout=300,
    )
    assert all(r["dispatches"] == 2 and r["combines"] == 3 for r in results), results


@pytest.mark.gpu
def test_intranode_under_default_cuda_device_gpu(gpu_pool):
    results = gpu_pool(gpu_count()).run(
        intranode_under_defaults,
        "cuda",
        torch.bfloat16,
        num_tokens=1024,
        hidden=2048,
        num_topk=8,
        num_experts=64,
        num_sms=24,
        chunk=6,
        recv_capacity=256,
        num_nvl_bytes=int(1e9),
        matrix="full",
        timeout=400,
    )
    assert all(r["dispatches"] >= 48 for r in results), results
