"""Randomized rounds (tritonep.testing.pressure): exact against the reference, reproducible per
seed."""

import pytest

from tritonep.testing import pressure


def test_pressure_rounds_are_exact_and_reproducible_cpu(cpu_pool):
    pool = cpu_pool(2)
    first = pool.run(pressure.run_rounds, 0, 4, pressure.CPU_SPACE, timeout=600)
    again = pool.run(pressure.run_rounds, 0, 4, pressure.CPU_SPACE, timeout=600)
    for result in first + again:
        assert result["failures"] == [] and result["rounds"] == 4, result
    assert [r["digest"] for r in first] == [r["digest"] for r in again]


@pytest.mark.slow
def test_pressure_rounds_three_ranks_cpu(cpu_pool):
    results = cpu_pool(3).run(pressure.run_rounds, 500, 8, pressure.CPU_SPACE, timeout=600)
    assert all(r["failures"] == [] and r["rounds"] == 8 for r in results), results
