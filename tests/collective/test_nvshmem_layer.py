"""The device layer (`transport/device.py`) over the CPU emulation of the NVSHMEM heap, in the
interpreter.

Topologies 2 nodes x 2 ranks and 3 nodes x 1 (a rank's node is `rank // ranks_per_node`; peers of
other nodes take the put path), plus 2 x 2 with `FORCE_PUT` (every peer, itself included, on the
put path). Each runs put-with-signal exchanges (SET and ADD), fence and quiet, plain stores to
mapped peers, 64-bit atomics, a ping-pong and a bounded wait (`nvshmem_cases.run_cases`). Also:
lifecycle (nothing left in /dev/shm), the environment function, clear errors without NVSHMEM, the
NVSHMEM op codes against NVSHMEM's headers, and sm_90 compilation of every path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest
from small_case import shm_leaks

from tritonep.transport import device

TOPOLOGIES = [(4, 2, False), (3, 1, False), (4, 2, True)]  # (ranks, ranks per node, force put)


@pytest.mark.interpreter
@pytest.mark.parametrize("world,ranks_per_node,force_put", TOPOLOGIES)
def test_device_layer_cases(cpu_pool, world, ranks_per_node, force_put):
    from nvshmem_cases import fetch_add_problems, pool_cases, problems

    pool = cpu_pool(world)
    results = pool.run(pool_cases, ranks_per_node, force_put, timeout=120)
    found = fetch_add_problems(results)
    for rank, result in enumerate(results):
        reach = [j // ranks_per_node == rank // ranks_per_node for j in range(world)]
        direct = [r and not force_put for r in reach]
        found += [f"rank {rank}: {p}" for p in problems(result, direct, reach, rank)]
    assert found == [], "\n".join(found)


@pytest.mark.interpreter
def test_lifecycle_leaves_nothing(cpu_pool):
    from nvshmem_cases import lifecycle_task

    pool = cpu_pool(3)
    results = pool.run(lifecycle_task, 5, timeout=60)
    assert all(r == {"peer_ptrs": [], "local": 0, "route": (0, 3)} for r in results), results
    assert shm_leaks(own_pids=pool.pids) == []


def test_environment_keeps_user_values(monkeypatch):
    from tritonep.transport.nvshmem import nvshmem_environment

    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "0")
    monkeypatch.delenv("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", raising=False)
    assert nvshmem_environment(single_host=True) == {"NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo"}
    assert os.environ["NVSHMEM_DISABLE_NVLS"] == "0"
    monkeypatch.delenv("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")
    monkeypatch.delenv("NVSHMEM_DISABLE_NVLS")
    assert nvshmem_environment(single_host=False) == {"NVSHMEM_DISABLE_NVLS": "1"}
    assert "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME" not in os.environ


class _Group:
    def rank(self):
        return 0

    def size(self):
        return 1


@pytest.mark.skipif(sys.platform != "linux", reason="torch CPU builds on Linux lack NVSHMEM")
def test_missing_nvshmem_is_a_clear_error():
    import torch
    import torch.distributed._symmetric_memory as symm_mem

    from tritonep.errors import EPUnsupported
    from tritonep.transport.bootstrap import Bootstrap
    from tritonep.transport.nvshmem import NvshmemPeerMemory

    if symm_mem.is_nvshmem_available():
        pytest.skip("this torch build has NVSHMEM")
    with pytest.raises(EPUnsupported, match="nvidia-nvshmem"):
        NvshmemPeerMemory(Bootstrap(_Group()), 1024, torch.device("cpu"))


def test_emulation_needs_whole_nodes():
    from tritonep.errors import EPInvalidArgument
    from tritonep.transport.bootstrap import Bootstrap
    from tritonep.transport.nvshmem import EmulatedPeerMemory

    with pytest.raises(EPInvalidArgument, match="ranks_per_node"):
        EmulatedPeerMemory(Bootstrap(_Group()), 1024, ranks_per_node=2)


def _nvshmem_dir() -> str | None:
    candidates = [os.path.join(sysconfig.get_path("purelib"), "nvidia", "nvshmem")]
    if os.environ.get("NVSHMEM_LIB_DIR"):
        candidates.insert(0, os.path.dirname(os.environ["NVSHMEM_LIB_DIR"].rstrip("/")))
    return next(
        (d for d in candidates if os.path.isfile(os.path.join(d, "lib", "libnvshmem_device.bc"))),
        None,
    )


@pytest.mark.skipif(
    _nvshmem_dir() is None, reason="no NVSHMEM wheel (nvidia-nvshmem-cu12/13) or NVSHMEM_LIB_DIR"
)
def test_signal_codes_are_nvshmems():
    import re

    include = os.path.join(_nvshmem_dir(), "include", "device_host_transport")
    with open(os.path.join(include, "nvshmem_common_transport.h")) as f:
        codes = dict(re.findall(r"(NVSHMEM_SIGNAL_(?:SET|ADD))\s*=\s*(\d+)", f.read()))
    assert {k: int(v) for k, v in codes.items()} == {
        "NVSHMEM_SIGNAL_SET": device.SIGNAL_SET.value,
        "NVSHMEM_SIGNAL_ADD": device.SIGNAL_ADD.value,
    }


def _aot(transport: int, force_put: bool, lib: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    libs = {"libnvshmem_device": lib} if lib else None
    code = (
        f"import json, nvshmem_cases; print(json.dumps(nvshmem_cases.aot_compile({transport}, "
        f"{force_put}, {libs!r})))"
    )
    here = os.path.dirname(__file__)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=here, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.aot
def test_store_path_compiles_for_sm90_without_nvshmem():
    report = _aot(device.STORES.value, False, None)
    assert report == {name: [] for name in report} and len(report) == 6, report


@pytest.mark.skipif(
    _nvshmem_dir() is None, reason="no NVSHMEM wheel (nvidia-nvshmem-cu12/13) or NVSHMEM_LIB_DIR"
)
def test_put_path_links_nvshmem_for_sm90():
    lib = os.path.join(_nvshmem_dir(), "lib", "libnvshmem_device.bc")
    report = _aot(device.NVSHMEM.value, True, lib)
    assert set(report) == {"exchange", "fence_quiet", "atomics", "store", "ping_pong"}, report
