"""Tuned config files (`TRITONEP_CONFIG_FILE`, written by `tritonep tune`) and their fallbacks.

Unset, the V1 tables answer; set, the file's entries replace them for the rank counts it lists
(nearest SM count), and a malformed file fails with the file and the entry named.
"""

import json

import pytest

import tritonep
from tritonep import config as config_module
from tritonep.config import CONFIG_FILE_FORMAT, DISPATCH_TABLE, Config, load_config_file
from tritonep.errors import EPInvalidArgument


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("TRITONEP_CONFIG_FILE", raising=False)
    monkeypatch.setattr(tritonep.Buffer, "num_sms", 20)
    load_config_file.cache_clear()
    yield
    load_config_file.cache_clear()


def _write(tmp_path, content) -> str:
    path = tmp_path / "tuned.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _tuned(dispatch=None, combine=None) -> dict:
    return {"format": CONFIG_FILE_FORMAT, "dispatch": dispatch or {}, "combine": combine or {}}


def test_unset_keeps_v1_tables():
    assert tritonep.Buffer.get_dispatch_config(2) == Config(20, *DISPATCH_TABLE[2])


def test_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("TRITONEP_CONFIG_FILE", "  ")
    assert tritonep.Buffer.get_combine_config(8) == Config(20, *config_module.COMBINE_TABLE[8])


def test_file_entry_replaces_table(monkeypatch, tmp_path):
    path = _write(
        tmp_path,
        _tuned(dispatch={"2": {"20": [16, 256, 6, 128]}}, combine={"2": {"20": [3, 128, 6, 128]}}),
    )
    monkeypatch.setenv("TRITONEP_CONFIG_FILE", path)
    assert tritonep.Buffer.get_dispatch_config(2) == Config(20, 16, 256, 6, 128)
    assert tritonep.Buffer.get_combine_config(2) == Config(20, 3, 128, 6, 128)
    # Rank counts the file does not list keep V1's entries.
    assert tritonep.Buffer.get_dispatch_config(4) == Config(20, *DISPATCH_TABLE[4])


def test_nearest_sm_count_and_num_sms_is_the_callers(monkeypatch, tmp_path):
    path = _write(
        tmp_path, _tuned(dispatch={"2": {"16": [8, 256, 6, 128], "32": [20, 256, 6, 128]}})
    )
    monkeypatch.setenv("TRITONEP_CONFIG_FILE", path)
    tritonep.Buffer.set_num_sms(28)
    assert tritonep.Buffer.get_dispatch_config(2) == Config(28, 20, 256, 6, 128)
    tritonep.Buffer.set_num_sms(24)  # equally far from 16 and 32: the larger count wins
    assert tritonep.Buffer.get_dispatch_config(2) == Config(24, 20, 256, 6, 128)
    tritonep.Buffer.set_num_sms(10)
    assert tritonep.Buffer.get_dispatch_config(2) == Config(10, 8, 256, 6, 128)


def test_file_without_a_kind_falls_back_for_that_kind(monkeypatch, tmp_path):
    monkeypatch.setenv(
        "TRITONEP_CONFIG_FILE", _write(tmp_path, _tuned(dispatch={"2": {"20": [16, 256, 6, 128]}}))
    )
    assert tritonep.Buffer.get_combine_config(2) == Config(20, *config_module.COMBINE_TABLE[2])


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not JSON"),
        ({"format": "other"}, "expected a 'tritonep-config/1' file"),
        (_tuned(dispatch={"2": {"20": [16, 256, 6]}}), r"dispatch\[2\]\[20\]: 4 chunk values"),
        (_tuned(dispatch={"2": {"20": [300, 256, 6, 128]}}), r"dispatch\[2\]\[20\]: Config"),
        (_tuned(combine={"x": {"20": [1, 256, 6, 128]}}), r"combine\[x\]\[20\]"),
        (_tuned(combine={"2": {"7": [1, 256, 6, 128]}}), r"combine\[2\]\[7\]: needs .* even"),
        (_tuned(combine={"2": [1, 256, 6, 128]}), r"combine\[2\] must map SM counts"),
    ],
)
def test_malformed_file_names_the_file_and_entry(monkeypatch, tmp_path, content, match):
    path = _write(tmp_path, content)
    monkeypatch.setenv("TRITONEP_CONFIG_FILE", path)
    with pytest.raises(EPInvalidArgument, match=match) as info:
        tritonep.Buffer.get_combine_config(2)
    assert f"TRITONEP_CONFIG_FILE={path}" in str(info.value)


def test_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONEP_CONFIG_FILE", str(tmp_path / "absent.json"))
    with pytest.raises(EPInvalidArgument, match="cannot read the file"):
        tritonep.Buffer.get_dispatch_config(2)


def test_read_once_per_path(monkeypatch, tmp_path):
    path = _write(tmp_path, _tuned(dispatch={"2": {"20": [16, 256, 6, 128]}}))
    monkeypatch.setenv("TRITONEP_CONFIG_FILE", path)
    tritonep.Buffer.get_dispatch_config(2)
    _write(tmp_path, _tuned(dispatch={"2": {"20": [4, 256, 6, 128]}}))
    assert tritonep.Buffer.get_dispatch_config(2).num_max_nvl_chunked_send_tokens == 16
    load_config_file.cache_clear()
    assert tritonep.Buffer.get_dispatch_config(2).num_max_nvl_chunked_send_tokens == 4


def _config_resolver(group_size: int) -> tritonep.Buffer:
    """A Buffer shell with just what `_resolve_config` reads (no group, no memory)."""
    buffer = tritonep.Buffer.__new__(tritonep.Buffer)
    buffer.group_size = group_size
    buffer.num_nvl_bytes = 1 << 20
    buffer._default_configs = {}
    return buffer


def test_a_calls_default_config_is_built_once_and_follows_sms_and_the_file(monkeypatch, tmp_path):
    """A dispatch or combine without `config` reuses one default Config (building and validating
    it was a third of a cached dispatch's host path), until `Buffer.num_sms`, the config file or
    the file's tables (rewritten, then `load_config_file.cache_clear()`) change."""
    buffer = _config_resolver(2)
    default = tritonep.Buffer.get_dispatch_config
    first = buffer._resolve_config("dispatch", None, default)
    assert first == Config(20, *DISPATCH_TABLE[2])
    assert buffer._resolve_config("dispatch", None, default) is first
    tritonep.Buffer.set_num_sms(24)
    assert buffer._resolve_config("dispatch", None, default) == Config(24, *DISPATCH_TABLE[2])
    path = _write(tmp_path, _tuned(dispatch={"2": {"24": [16, 256, 6, 128]}}))
    monkeypatch.setenv("TRITONEP_CONFIG_FILE", path)
    assert buffer._resolve_config("dispatch", None, default) == Config(24, 16, 256, 6, 128)
    _write(tmp_path, _tuned(dispatch={"2": {"24": [12, 256, 6, 128]}}))
    load_config_file.cache_clear()
    assert buffer._resolve_config("dispatch", None, default) == Config(24, 12, 256, 6, 128)
    # A caller's own Config is checked, never cached.
    with pytest.raises(EPInvalidArgument, match="num_sms must be even"):
        buffer._resolve_config("dispatch", Config(3, 6, 256, 6, 128), default)
