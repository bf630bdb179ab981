"""Low-latency launch sizes on a GPU shared by several rank processes (modes/low_latency.py): every
rank's fused launch must stay resident beside the others', so each takes its share of the SMs."""

import pytest

from tritonep.modes.low_latency import fit_programs, resident_program_budget
from tritonep.protocol import LL_PROGRAMS_PER_SM


@pytest.mark.unit
@pytest.mark.parametrize(
    "ranks_on_gpu, percentage, budget",
    [
        (1, None, 264),  # one rank per GPU: every SM
        (2, None, 132),
        (4, None, 66),
        (2, "25", 66),  # the MPS client limit is lower than the rank share
        (4, "50", 66),  # the rank share is lower than the MPS limit
        (2, "bogus", 132),
        (200, None, 2),  # never below one sender and one receiver
    ],
)
def test_resident_program_budget(ranks_on_gpu, percentage, budget):
    assert LL_PROGRAMS_PER_SM == 2
    assert resident_program_budget(132, ranks_on_gpu, percentage) == budget


@pytest.mark.unit
@pytest.mark.parametrize(
    "programs, budget, fitted",
    [
        ((64, 32), 264, (64, 32)),  # fits: unchanged
        ((64, 32), 96, (64, 32)),
        ((64, 32), 66, (44, 22)),  # 4 ranks on 132 SMs: the dispatch in proportion
        ((48, 48), 66, (33, 33)),  # and the combine
        ((1, 32), 8, (1, 7)),  # each side keeps a program
        ((32, 1), 8, (7, 1)),
        ((64, 32), 2, (1, 1)),
    ],
)
def test_fit_programs(programs, budget, fitted):
    assert fit_programs(*programs, budget) == fitted
    assert sum(fitted) <= max(budget, 2)


@pytest.mark.unit
def test_kernel_launch_reports_its_build():
    # Registers and spills come from the compiled kernel; nothing before the first compiled launch.
    from types import SimpleNamespace

    from tritonep.kernels.common.launch import KernelLaunch

    launch = KernelLaunch(lambda: None)
    assert launch.resources is None
    launch._kernel = SimpleNamespace(n_regs=120, n_spills=0)
    assert launch.resources == (120, 0)
