"""Every kernel compiles for sm_90 on this CPU-only machine, exactly as a real launch would.

The launchers run against recording stand-ins (`tritonep.testing.aot`), so a GPU-only code path
that no CPU test executes (the `%globaltimer` clock, the acquire/release atomics, the vectorised
copies) still fails CI when it stops compiling.
"""

import json
import os
import subprocess
import sys

import pytest

# Compiles every kernel launch for sm_90 (about a minute with a cold Triton cache).
pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json; from tritonep.testing.aot import compile_all; "
        "print(json.dumps(compile_all()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_profiler_names_are_namespaced(report):
    names = {row["module"]: row["name"] for row in report}
    assert names == {
        "layout": "_ZN8tritonep6layout11route_statsEv",
        "intranode.notify": "_ZN8tritonep9intranode6notifyEv",
        "intranode.dispatch": "_ZN8tritonep9intranode8dispatchEv",
        "intranode.combine": "_ZN8tritonep9intranode7combineEv",
        "low_latency.dispatch": "_ZN8tritonep2ll8dispatchEv",
        "low_latency.combine": "_ZN8tritonep2ll7combineEv",
        "low_latency.clean": "_ZN8tritonep2ll12clean_bufferEv",
        "internode.notify": "_ZN8tritonep9internode6notifyEv",
        "internode.dispatch": "_ZN8tritonep9internode8dispatchEv",
        "internode.combine": "_ZN8tritonep9internode7combineEv",
    }


def test_row_copies_are_16_byte_vectors(report):
    # LogFMT rows are encoded and decoded 8 groups at a time, one word per thread (not copied):
    # whole-row tiles vectorised but took 216 registers (see the next test).
    for row in report:
        if (
            row["module"]
            in (
                "intranode.dispatch",
                "intranode.combine",
                "low_latency.dispatch",
                "low_latency.combine",
            )
            and not row["use_logfmt"]
        ):
            assert row["vector_loads"] > 0 and row["vector_stores"] > 0, row


def test_low_latency_kernels_fit_two_programs_per_sm(report):
    # modes/low_latency.py sizes the launches of ranks sharing a GPU for LL_PROGRAMS_PER_SM = 2
    # resident 8-warp programs per SM: at most 128 registers per thread (64 K per SM).
    from tritonep.protocol import ll_register_cap

    rows = [r for r in report if r["module"].startswith("low_latency.")]
    if all(row["registers"] is None for row in rows):
        pytest.skip("no register counts in this Triton build (its cuobjdump is missing)")
    for row in rows:
        assert row["registers"] <= ll_register_cap(row["num_warps"]), row


def test_low_latency_dispatch_messages_are_not_byte_stores(report):
    # A row stored through a raw address without alignment hints compiles to one store per byte
    # (FP8) or per bf16 element: 32 of them per thread per message at hidden 7168.
    for row in report:
        if row["module"] == "low_latency.dispatch":
            assert row["narrow_stores"] == 0, row


def test_waits_use_the_gpu_clock_and_the_peer_scope(report):
    """Waits acquire at system scope, or at GPU scope only where every rank shares the GPU
    (`PEER_SCOPE`, `common/sync.memory_scope`); both kinds are among the cases."""
    scopes = set()
    for row in report:
        # The layout and an LL send phase (role 1) wait for nothing.
        if row["module"] != "layout" and row["role"] != 1:
            assert row["uses_globaltimer"], row
            if row["peer_scope"] == "gpu":
                assert row["acquire_gpu"] and not row["acquire_sys"], row
            else:
                assert row["acquire_sys"], row
            scopes.add(row["peer_scope"])
    assert {"gpu", "sys"} <= scopes, scopes


def test_every_deadline_is_judged_by_the_whole_program(report):
    # Each warp reads %globaltimer for itself; a wait that let each thread judge its own deadline
    # let warps leave the loop at different trips, and their block barriers then paired up wrongly
    # (the low-latency timeout path faulted on the GPU). `sync.deadline_passed` ORs the verdict.
    for row in report:
        if row["uses_globaltimer"]:
            assert row["uniform_deadlines"] > 0, row


def test_dispatch_does_not_spill(report):
    # A spilled copy loop goes through local memory on every block; 8 ranks used to spill 168-288 B.
    for row in report:
        if row["module"] == "intranode.dispatch" and row["stack"] is not None:
            assert row["stack"] == 0, row


def test_shared_memory_fits_an_sm_and_two_rank_combine_receivers_are_pipelined(report):
    # The two-rank combine receivers load through Triton's cp.async pipeline (3 stages); a plan
    # keeps its stages within 192 KB so every launch fits the 227 KB an sm_90 program may take.
    for row in report:
        assert row["shared_bytes"] <= 227 * 1024, row
    combines = [r for r in report if r["module"] == "intranode.combine"]
    assert [r["async_copies"] > 0 for r in combines if r["num_ranks"] == 2] == [True], combines


def test_low_latency_combine_receivers_drop_dead_rows_from_l2(report):
    # A BF16 combine receiver discards the rows it summed (no write-back of dead lines); the send
    # phase and LogFMT rows have none.
    for row in report:
        if row["module"] == "low_latency.combine" and not row["use_logfmt"]:
            receives = row["role"] != 1
            assert (row["l2_discards"] > 0) == receives, row
