"""Low-latency launch sizes on a GPU shared by several rank processes (modes/low_latency.py): every
rank's fused launch must stay resident beside the others', so each takes its share of the SMs;
their signals are ordered at GPU scope."""

import pytest

from tritonep.kernels.common.sync import memory_scope
from tritonep.modes.low_latency import program_counts, resident_program_budget
from tritonep.protocol import LL_PROGRAMS_PER_SM


@pytest.mark.unit
@pytest.mark.parametrize(
    "ranks_on_gpu, percentage, sms, budget",
    [
        # `sms` as the device reports it: under an MPS client limit, the limit (132 SMs x p %).
        (1, None, 132, 264),  # one rank per GPU: every SM
        (2, None, 132, 128),  # sharing: 2 SMs of each share left spare
        (4, None, 132, 31),  # more than 2 ranks: one program per SM (measured safe)
        (3, None, 132, 42),
        (4, "25", 33, 31),  # the limit is the rank share: not divided again
        (2, "25", 33, 62),  # the MPS client limit is lower than the rank share
        (4, "50", 66, 31),  # the rank share is lower than the MPS limit
        (1, "50", 66, 128),
        (2, "bogus", 132, 128),
        (200, None, 132, 2),  # never below one sender and one receiver
    ],
)
def test_resident_program_budget(ranks_on_gpu, percentage, sms, budget):
    assert LL_PROGRAMS_PER_SM == 2
    assert resident_program_budget(sms, ranks_on_gpu, percentage) == budget


@pytest.mark.unit
@pytest.mark.parametrize(
    "items, programs, budget, counts",
    [
        # DeepEP's decode shape, 2 ranks sharing an H200: dispatch (128 tokens, 144 local experts)
        ((128, 144), (132, 132), 132, (128, 132)),
        # its combine (36864 rows at most, 128 tokens)
        ((288 * 128, 128), (132, 132), 132, (132, 128)),
        ((128, 144), (64, 300), 132, (64, 132)),  # an override lowers, the budget caps
        ((0, 0), (8, 8), None, (1, 1)),  # each side keeps a program
        ((10, 10), (8, 8), None, (8, 8)),  # no budget: the interpreter's counts
    ],
)
def test_program_counts(items, programs, budget, counts):
    assert program_counts(*items, programs, budget) == counts


@pytest.mark.unit
def test_kernel_launch_reports_its_build():
    # Registers and spills come from the compiled kernel; nothing before the first compiled launch.
    from types import SimpleNamespace

    from tritonep.kernels.common.launch import KernelLaunch

    launch = KernelLaunch(lambda: None)
    assert launch.resources is None
    launch._kernel = SimpleNamespace(n_regs=120, n_spills=0)
    assert launch.resources == (120, 0)


@pytest.mark.unit
@pytest.mark.parametrize(
    "all_ranks_on_gpu, force_put, scope",
    [
        (True, False, "gpu"),  # ranks sharing one GPU, peers written with this GPU's stores
        (True, True, "sys"),  # the forced NVSHMEM put path may deliver through other agents
        (False, False, "sys"),  # peers on other GPUs
        (False, True, "sys"),
    ],
)
def test_signal_scope_follows_the_topology(all_ranks_on_gpu, force_put, scope):
    assert memory_scope(all_ranks_on_gpu, force_put) == scope
