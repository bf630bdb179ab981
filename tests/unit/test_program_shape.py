"""`TRITONEP_PROGRAM_SHAPE` and `TRITONEP_LL_PROGRAMS`: GPU tuning overrides (intranode program
shape, low-latency programs per launch); the interpreter's shape stays fixed and bad entries fail
with the entry named."""

import pytest

from tritonep.errors import EPInvalidArgument
from tritonep.modes.intranode import program_shape

pytestmark = pytest.mark.unit


def test_unset_gives_the_built_in_shapes(monkeypatch):
    monkeypatch.delenv("TRITONEP_PROGRAM_SHAPE", raising=False)
    assert program_shape("cuda", 2).combine_warps == 16
    assert program_shape("cuda", 8).combine_warps == 8


def test_two_ranks_give_a_dispatch_of_bare_rows_more_warps(monkeypatch):
    # A cached BF16 dispatch fits 16 warps (128 registers) without spilling; rows that carry
    # top-k, FP8 scales or handle entries keep 8 (their field tiles spill at 128 registers).
    monkeypatch.delenv("TRITONEP_PROGRAM_SHAPE", raising=False)
    two, eight = program_shape("cuda", 2), program_shape("cuda", 8)
    assert two.warps_of_dispatch(rows_only=True) == 16
    assert two.warps_of_dispatch(rows_only=False) == 8
    assert eight.warps_of_dispatch(rows_only=True) == eight.warps_of_dispatch(rows_only=False) == 8
    assert program_shape("cpu", 2).warps_of_dispatch(rows_only=True) == 1
    monkeypatch.setenv("TRITONEP_PROGRAM_SHAPE", "dispatch_rows_only_warps=4")
    assert program_shape("cuda", 2).warps_of_dispatch(rows_only=True) == 4


def test_overrides_replace_named_fields_with_their_types(monkeypatch):
    monkeypatch.setenv(
        "TRITONEP_PROGRAM_SHAPE", "dispatch_warps=16, dispatch_tile_words=4096,prefetch=0"
    )
    shape = program_shape("cuda", 4)
    assert (shape.dispatch_warps, shape.dispatch_tile_words) == (16, 4096)
    assert shape.prefetch is False
    assert shape.combine_warps == program_shape("cuda", 8).combine_warps
    assert program_shape("cpu", 4).dispatch_warps == 1  # the interpreter ignores GPU tuning


@pytest.mark.parametrize(
    "value, words",
    [
        ("dispatch_warps", "field=integer"),
        ("dispatch_warps=x", "field=integer"),
        ("warps=4", "unknown"),
    ],
)
def test_bad_entries_are_named(monkeypatch, value, words):
    monkeypatch.setenv("TRITONEP_PROGRAM_SHAPE", value)
    with pytest.raises(EPInvalidArgument, match=words):
        program_shape("cuda", 2)


def test_low_latency_program_overrides(monkeypatch):
    from tritonep import _env

    monkeypatch.setenv("TRITONEP_LL_PROGRAMS", "dispatch_senders=128, combine_receivers=64")
    assert _env.ll_program_overrides() == {"dispatch_senders": 128, "combine_receivers": 64}
    for value, words in [("senders=4", "unknown"), ("dispatch_senders=0", ">= 1")]:
        monkeypatch.setenv("TRITONEP_LL_PROGRAMS", value)
        with pytest.raises(EPInvalidArgument, match=words):
            _env.ll_program_overrides()
