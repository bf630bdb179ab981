"""NVSHMEM heap and device layer on one GPU: `scripts/nvshmem_check.py` with 2 ranks sharing GPU 0.

Every case of `nvshmem_cases.py` on the store path, NVSHMEM-linked stores and the forced put path,
the ping-pong, create/close cycles without device-memory growth, and the backend-order error. The
ranks share one GPU, so NVSHMEM needs the MPS daemon: the test runs only where
`CUDA_MPS_PIPE_DIRECTORY` names a running one (see the script's docstring).
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "nvshmem_check.py")


@pytest.mark.gpu
@pytest.mark.skipif(
    not os.environ.get("CUDA_MPS_PIPE_DIRECTORY"), reason="needs a running MPS daemon"
)
def test_nvshmem_layer_on_one_gpu(tmp_path):
    pytest.importorskip("nvidia.nvshmem", reason="needs the nvidia-nvshmem wheel")
    report_path = tmp_path / "nvshmem.json"
    env = {
        **os.environ,
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NCCL_NVLS_ENABLE": "0",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    out = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--ranks",
            "2",
            "--rounds",
            "1000",
            "--cycles",
            "20",
            "--budget",
            "300",
            "--json",
            str(report_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert report_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["passed"], "\n".join(report["summary"])
