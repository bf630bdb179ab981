"""Config validation, V1 size hints and per-rank-count tables (reference §3, §3.1, §6.3, §6.5)."""

import dataclasses
import pickle
import warnings

import numpy as np
import pytest
import torch

import tritonep
from tritonep import config as config_module
from tritonep.config import (
    COMBINE_TABLE,
    DISPATCH_TABLE,
    Config,
    combine_config,
    dispatch_config,
    get_low_latency_rdma_size_hint,
)
from tritonep.errors import EPInvalidArgument

HIDDEN_BYTES = 7168 * 2  # V1 tests' BF16 hidden size in bytes


@pytest.fixture(autouse=True)
def _int64_topk_idx(monkeypatch):
    # Reference hints assume V1's default 64-bit topk_idx_t, whatever TRITONEP_TOPK_IDX_BITS says.
    monkeypatch.setattr(tritonep, "topk_idx_t", torch.int64)


# --- construction -------------------------------------------------------------------------------


def test_defaults_and_attributes():
    cfg = Config()
    assert cfg.num_sms == 20
    assert cfg.num_max_nvl_chunked_send_tokens == 6
    assert cfg.num_max_nvl_chunked_recv_tokens == 256
    assert cfg.num_max_rdma_chunked_send_tokens == 6
    # 256 rounded up to a multiple of 6.
    assert cfg.num_max_rdma_chunked_recv_tokens == 258
    assert cfg.num_channels == 10


def test_positional_calls_of_v1_tests():
    cfg = Config(24, 8, 256)
    assert (cfg.num_sms, cfg.num_max_nvl_chunked_send_tokens) == (24, 8)
    assert cfg.num_max_nvl_chunked_recv_tokens == 256
    assert cfg.num_channels == 12

    cfg = Config(24, 8, 512, 16, 128)
    assert dataclasses.astuple(cfg) == (24, 8, 512, 16, 128)


def test_keyword_call():
    cfg = Config(num_sms=4, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=3)
    assert dataclasses.astuple(cfg) == (4, 2, 3, 6, 258)


@pytest.mark.parametrize(
    "rdma_send, rdma_recv, stored",
    [(6, 128, 132), (20, 128, 140), (8, 128, 128), (128, 129, 256), (1, 2, 2)],
)
def test_rdma_recv_rounded_up_to_send_multiple(rdma_send, rdma_recv, stored):
    cfg = Config(20, 6, 256, rdma_send, rdma_recv)
    assert cfg.num_max_rdma_chunked_send_tokens == rdma_send
    assert cfg.num_max_rdma_chunked_recv_tokens == stored


def test_zero_and_odd_num_sms_accepted_at_construction():
    assert Config(0).num_channels == 0
    assert Config(23).num_channels == 11


@pytest.mark.parametrize(
    "args, match",
    [
        # rule 1, checked before everything else
        ((-1, 0, 0, 0, 0), r"num_sms must be >= 0, got -1"),
        # rule 2
        ((20, 0, 256), r"num_max_nvl_chunked_send_tokens must be > 0, got 0"),
        ((20, -3, 256), r"num_max_nvl_chunked_send_tokens must be > 0, got -3"),
        ((20, 6, 0), r"num_max_nvl_chunked_recv_tokens must be > 0, got 0"),
        ((20, 6, -1, 0, 0), r"num_max_nvl_chunked_recv_tokens must be > 0, got -1"),
        # rule 3, checked before rule 4
        ((20, 256, 256, 0, 0), r"num_max_nvl_chunked_send_tokens must be < .*\(256\), got 256"),
        ((20, 300, 256), r"num_max_nvl_chunked_send_tokens must be < .*\(256\), got 300"),
        # rule 4
        ((20, 6, 256, 0, 128), r"num_max_rdma_chunked_send_tokens must be > 0, got 0"),
        ((20, 6, 256, 6, 0), r"num_max_rdma_chunked_recv_tokens must be > 0, got 0"),
        ((20, 6, 256, 6, -6), r"num_max_rdma_chunked_recv_tokens must be > 0, got -6"),
        # rule 6, after rounding: capacity equal to the chunk, or rounding up to it
        ((20, 6, 256, 128, 128), r"num_max_rdma_chunked_send_tokens .*\(128, rounded up to 128\)"),
        ((20, 6, 256, 129, 128), r"num_max_rdma_chunked_send_tokens .*got 129"),
        ((20, 6, 256, 1, 1), r"num_max_rdma_chunked_send_tokens .*got 1"),
    ],
)
def test_validation_rules_in_order(args, match):
    with pytest.raises(EPInvalidArgument, match=r"^Config: " + match):
        Config(*args)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_sms": 20.0}, "num_sms"),
        ({"num_sms": True}, "num_sms"),
        ({"num_max_nvl_chunked_send_tokens": "6"}, "num_max_nvl_chunked_send_tokens"),
        ({"num_max_nvl_chunked_recv_tokens": None}, "num_max_nvl_chunked_recv_tokens"),
        ({"num_max_rdma_chunked_send_tokens": False}, "num_max_rdma_chunked_send_tokens"),
        ({"num_max_rdma_chunked_recv_tokens": 128.5}, "num_max_rdma_chunked_recv_tokens"),
    ],
)
def test_non_int_rejected(kwargs, name):
    value = next(iter(kwargs.values()))
    with pytest.raises(EPInvalidArgument, match=rf"Config: {name} must be an int, got {value!r}"):
        Config(**kwargs)


def test_integer_like_values_stored_as_int():
    cfg = Config(np.int64(24), np.int32(8), 256)
    assert cfg == Config(24, 8, 256)
    assert type(cfg.num_sms) is int and type(cfg.num_max_nvl_chunked_send_tokens) is int


def test_error_is_v1_compatible():
    # V1 raised AssertionError / RuntimeError; old except clauses must still catch it.
    with pytest.raises(AssertionError):
        Config(-2)
    with pytest.raises(RuntimeError):
        Config(-2)
    with pytest.raises(ValueError):
        Config(-2)


# --- value semantics ----------------------------------------------------------------------------


def test_read_only():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_sms = 24


def test_eq_hash_repr():
    assert Config(24, 8, 256) == Config(24, 8, 256, 6, 256)
    assert Config(20, 6, 256, 6, 128) == Config(20, 6, 256, 6, 132)  # equal once rounded
    assert Config(24, 8, 256) != Config(22, 8, 256)
    assert len({Config(24, 8, 256), Config(24, 8, 256), Config()}) == 2
    assert repr(Config(24, 8, 512, 16, 128)) == (
        "Config(num_sms=24, num_max_nvl_chunked_send_tokens=8, "
        "num_max_nvl_chunked_recv_tokens=512, num_max_rdma_chunked_send_tokens=16, "
        "num_max_rdma_chunked_recv_tokens=128)"
    )


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_keeps_rounded_value(protocol):
    cfg = Config(20, 6, 256, 20, 128)
    copy = pickle.loads(pickle.dumps(cfg, protocol=protocol))
    assert copy == cfg and hash(copy) == hash(cfg)
    assert copy.num_max_rdma_chunked_recv_tokens == 140


def test_replace_does_not_round_twice():
    cfg = dataclasses.replace(Config(20, 6, 256, 20, 128), num_sms=24)
    assert dataclasses.astuple(cfg) == (24, 6, 256, 20, 140)


# --- size hints (§3.1) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, num_ranks, expected",
    [
        # Every intranode table entry has nvl_recv = 256, so dispatch and combine agree.
        ("dispatch", 2, 83_927_552),
        ("combine", 2, 83_927_552),
        ("dispatch", 4, 167_854_976),
        ("combine", 4, 167_854_976),
        ("dispatch", 8, 335_709_824),
        ("combine", 8, 335_709_824),
        ("dispatch", 16, 377_673_984),
    ],
)
def test_nvl_hint_reference_values(kind, num_ranks, expected):
    cfg = {"dispatch": dispatch_config, "combine": combine_config}[kind](num_ranks, 20)
    assert cfg.get_nvl_buffer_size_hint(HIDDEN_BYTES, num_ranks) == expected


@pytest.mark.parametrize(
    "kind, num_ranks, expected",
    [
        ("dispatch", 16, 91_887_744),  # rdma (20, 128) stored as (20, 140)
        ("combine", 16, 86_637_184),  # rdma (12, 128) stored as (12, 132)
        ("dispatch", 32, 168_023_680),
        ("combine", 32, 168_023_680),
        ("dispatch", 64, 336_047_360),
        ("combine", 64, 336_047_360),
    ],
)
def test_rdma_hint_reference_values(kind, num_ranks, expected):
    cfg = {"dispatch": dispatch_config, "combine": combine_config}[kind](num_ranks, 20)
    assert cfg.get_rdma_buffer_size_hint(HIDDEN_BYTES, num_ranks) == expected


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 7, 8])
def test_rdma_hint_zero_intranode(num_ranks):
    assert Config(23).get_rdma_buffer_size_hint(HIDDEN_BYTES, num_ranks) == 0


def test_nvl_hint_intranode_accepts_odd_num_sms():
    # c = 11, nv = 2, rd = 1: 11*2*5*4 + 11*2*256*16392 = 92_320_184 -> aligned 92_320_256.
    assert Config(23).get_nvl_buffer_size_hint(HIDDEN_BYTES, 2) == 92_320_256


def test_hints_follow_topk_idx_t(monkeypatch):
    monkeypatch.setattr(tritonep, "topk_idx_t", torch.int32)
    # 128 top-k slots of 4 instead of 8 bytes per row: 10*2*5*4 + 5120*15880 = 81_306_000.
    assert Config().get_nvl_buffer_size_hint(HIDDEN_BYTES, 2) == 81_306_112
    # 10*4*144 + 2*5120*(16408 - 512) = 162_780_800, already aligned.
    assert dispatch_config(32, 20).get_rdma_buffer_size_hint(HIDDEN_BYTES, 32) == 162_780_800


@pytest.mark.parametrize("num_ranks", [9, 12, 15, 20])
def test_nvl_hint_rejects_partial_node(num_ranks):
    with pytest.raises(
        EPInvalidArgument,
        match=rf"get_nvl_buffer_size_hint: num_ranks must be < 8 .*, got {num_ranks}",
    ):
        Config().get_nvl_buffer_size_hint(HIDDEN_BYTES, num_ranks)


def test_nvl_hint_rejects_odd_num_sms_internode():
    with pytest.raises(
        EPInvalidArgument,
        match=r"get_nvl_buffer_size_hint: num_sms must be even when num_ranks \(16\) > 8, got 21",
    ):
        Config(21).get_nvl_buffer_size_hint(HIDDEN_BYTES, 16)


@pytest.mark.parametrize("num_ranks", [9, 12, 20])
def test_rdma_hint_rejects_partial_node(num_ranks):
    with pytest.raises(
        EPInvalidArgument,
        match=rf"get_rdma_buffer_size_hint: num_ranks must be a multiple of 8 .*got {num_ranks}",
    ):
        Config().get_rdma_buffer_size_hint(HIDDEN_BYTES, num_ranks)


def test_rdma_hint_rejects_odd_num_sms():
    with pytest.raises(
        EPInvalidArgument,
        match=r"get_rdma_buffer_size_hint: num_sms must be even when num_ranks \(32\) > 8, got 21",
    ):
        Config(21).get_rdma_buffer_size_hint(HIDDEN_BYTES, 32)


# --- low-latency hint (§6.5) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        ((128, 7168, 2, 288), 2_146_961_792),
        ((128, 7168, 8, 256), 1_908_410_496),
        ((256, 7168, 8, 256), 3_816_818_816),
        ((128, 4096, 2, 64), 272_630_400),
    ],
)
def test_low_latency_hint_reference_values(args, expected):
    assert get_low_latency_rdma_size_hint(*args) == expected


def test_low_latency_hint_ignores_num_ranks():
    assert get_low_latency_rdma_size_hint(128, 7168, 2, 256) == 1_908_410_496


def test_low_latency_hint_adds_unit_when_aligned():
    # T=0: only the signal halves, 2 * align128(4 * 32) = 256 bytes, already aligned -> 384.
    assert get_low_latency_rdma_size_hint(0, 7168, 8, 32) == 384


# --- tables (§6.3) ------------------------------------------------------------------------------

EXPECTED_TABLE = {
    # num_ranks: (dispatch entry, combine entry), copied from reference §6.3
    2: ((24, 256, 6, 128), (10, 256, 6, 128)),
    4: ((6, 256, 6, 128), (9, 256, 6, 128)),
    8: ((6, 256, 6, 128), (4, 256, 6, 128)),
    16: ((36, 288, 20, 128), (4, 288, 12, 128)),
    24: ((32, 288, 8, 128), (1, 288, 8, 128)),
    32: ((32, 288, 8, 128), (1, 288, 8, 128)),
    48: ((32, 288, 8, 128), (1, 288, 8, 128)),
    64: ((32, 288, 8, 128), (1, 288, 8, 128)),
    96: ((20, 480, 12, 128), (1, 480, 8, 128)),
    128: ((20, 560, 12, 128), (1, 560, 8, 128)),
    144: ((32, 720, 12, 128), (2, 720, 8, 128)),
    160: ((28, 720, 12, 128), (2, 720, 8, 128)),
}


def test_tables_list_exactly_the_spec_counts():
    assert sorted(DISPATCH_TABLE) == sorted(COMBINE_TABLE) == sorted(EXPECTED_TABLE)


@pytest.mark.parametrize("num_ranks", sorted(EXPECTED_TABLE))
def test_table_entries(num_ranks):
    dispatch_entry, combine_entry = EXPECTED_TABLE[num_ranks]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # listed counts never warn
        assert dispatch_config(num_ranks, 24) == Config(24, *dispatch_entry)
        assert combine_config(num_ranks, 24) == Config(24, *combine_entry)


def test_table_configs_are_new_and_use_num_sms():
    a, b = dispatch_config(8, 20), dispatch_config(8, 20)
    assert a == b and a is not b
    assert combine_config(8, 32).num_sms == 32
    assert dispatch_config(16, 20).num_max_rdma_chunked_recv_tokens == 140


@pytest.mark.parametrize(
    "num_ranks, listed",
    [
        # intranode counts use intranode entries; ties go to the larger count
        (1, 2), (3, 4), (5, 4), (6, 8), (7, 8),
        # internode counts use internode entries (never the R=8 one)
        (9, 16), (10, 16), (12, 16), (17, 16), (20, 24), (33, 32), (40, 48),
        (80, 96), (100, 96), (112, 128), (136, 144), (152, 160), (200, 160), (1024, 160),
    ],
)  # fmt: skip
def test_unlisted_count_uses_nearest_entry_and_warns_once(monkeypatch, num_ranks, listed):
    monkeypatch.setattr(config_module, "_warned", set())
    for kind, make, table in [
        ("dispatch", dispatch_config, DISPATCH_TABLE),
        ("combine", combine_config, COMBINE_TABLE),
    ]:
        expected = Config(20, *table[listed])
        with pytest.warns(UserWarning) as record:
            assert make(num_ranks, 20) == expected
        assert len(record) == 1
        message = str(record[0].message)
        assert f"{kind} config for num_ranks={num_ranks};" in message
        assert f"entry of num_ranks={listed}: {expected!r}" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # second call is silent
            assert make(num_ranks, 20) == expected


@pytest.mark.parametrize("make", [dispatch_config, combine_config])
@pytest.mark.parametrize("num_ranks", [0, -8])
def test_table_rejects_num_ranks_below_one(make, num_ranks):
    with pytest.raises(EPInvalidArgument, match=rf"num_ranks must be >= 1, got {num_ranks}"):
        make(num_ranks, 20)


@pytest.mark.parametrize("make", [dispatch_config, combine_config])
def test_table_rejects_non_int_num_ranks(make):
    with pytest.raises(EPInvalidArgument, match=r"num_ranks must be an int, got 8.0"):
        make(8.0, 20)


def test_table_validates_num_sms():
    with pytest.raises(EPInvalidArgument, match=r"Config: num_sms must be >= 0, got -2"):
        dispatch_config(8, -2)
