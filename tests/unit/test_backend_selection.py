"""Backend selection in a fresh process: the data decides (CUDA usable -> `cuda`, else `cpu`), not
the group's backend; `TRITONEP_BACKEND` overrides and accepts only backends that exist. The CPU
backend switches the Triton interpreter on by itself, but never overrides a TRITON_INTERPRET value
the user set."""

import os
import subprocess
import sys
import textwrap

import pytest

import tritonep
from tritonep import _env

SCRIPT = textwrap.dedent(
    """
    import os, torch, torch.distributed as dist
    if os.environ.get("IMPORT_TRITON_FIRST"):
        import triton.language
    import tritonep
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0,
    world_size=1)
    try:
        buffer = tritonep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20)
        topk = torch.tensor([[0, 1], [1, -1]])
        ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk, 2)
        print("OK", ntr.tolist(), os.environ.get("TRITON_INTERPRET"))
    except tritonep.EPStateError as e:
        print("STATE", e)
    dist.destroy_process_group()
    """
)


def _run(env_update):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITONEP_BACKEND")}
    env.update(env_update, PORT=str(port), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_triton_imported_before_the_interpreter_is_a_clear_error():
    line = _run({"IMPORT_TRITON_FIRST": "1"})
    assert line.startswith("STATE") and "TRITON_INTERPRET=1 before importing triton" in line, line


def test_no_cuda_selects_the_cpu_backend_and_the_interpreter_by_itself():
    assert _run({}) == "OK [2] 1"


@pytest.mark.parametrize("value", ["nccl", "gpu"])
def test_backend_override_accepts_only_existing_backends(monkeypatch, value):
    monkeypatch.setenv("TRITONEP_BACKEND", value)
    with pytest.raises(
        tritonep.EPInvalidArgument, match=f"TRITONEP_BACKEND must be one of .*got '{value}'"
    ):
        _env.backend()
    monkeypatch.delenv("TRITONEP_BACKEND")
    assert _env.backend() == "auto"


def test_a_user_set_triton_interpret_is_not_overridden():
    line = _run({"TRITON_INTERPRET": "0"})
    assert line.startswith("STATE") and "TRITON_INTERPRET='0'" in line, line
