"""The `tritonep` command: options and help, what each subcommand prints on the CPU backend, the
config file `tune` writes, and the environment report.

Host-only except `test_tune_writes_a_file_the_buffer_uses` (two interpreter rank processes, about
ten seconds), which runs the whole measure path once at the smallest geometry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tritonep
from tritonep import cli, envcheck
from tritonep._console import table
from tritonep.config import CONFIG_FILE_FORMAT, Config, load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _subcommands(parser):
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_option_has_help_text():
    missing = []
    for name, sub in _subcommands(cli.build_parser()).items():
        for action in sub._actions:
            if action.dest != "help" and not action.help:
                missing.append(f"{name} {action.option_strings or action.dest}")
    assert missing == []


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "tritonep check" in capsys.readouterr().out


def test_aot_help_compiles_nothing(monkeypatch, capsys):
    from tritonep.testing import aot

    def fail():
        raise AssertionError("aot --help must not compile")

    monkeypatch.setattr(aot, "compile_all", fail)
    with pytest.raises(SystemExit) as info:
        cli.main(["aot", "--help"])
    assert info.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_aot_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="interpreter compiles nothing"):
        cli.main(["aot"])


def test_pressure_zero_rounds_claims_nothing(capsys):
    assert cli.main(["pressure", "--rounds", "0", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "nothing was checked" in out and "exact" not in out


def test_bench_sweep_is_refused_on_cpu():
    with pytest.raises(SystemExit, match="tritonep tune"):
        cli.main(["bench", "--backend", "cpu", "--sweep"])


def test_python_dash_m_runs_the_same_command():
    out = subprocess.run(
        [sys.executable, "-m", "tritonep", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"tritonep {tritonep.__version__}"


def test_demangle():
    assert cli._demangle("_ZN8tritonep2ll8dispatchEv") == "tritonep::ll::dispatch()"
    assert cli._demangle("_route_stats_kernel") == "_route_stats_kernel"


def test_table_aligns_text_left_and_numbers_right():
    text = table(["op", "ms"], [["layout", 1.25], ["dispatch", 12.0], ["none", None]])
    assert text.splitlines() == [
        "op          ms",
        "--------  ----",
        "layout     1.2",
        "dispatch  12.0",
        "none         -",
    ]


def _record(gpu: bool) -> dict:
    points = []
    for op in cli.OPS:
        point = dict(op=op, num_sms=4, chunk=24, capacity=256, kind="default", recv_rows=70)
        point.update(us=500.0, bytes=1e6)
        if gpu:
            name = "combine" if op == "combine" else "dispatch"
            point.update(GBps=300.0, kernel_us={name: 200.0}, kernel_GBps=400.0)
        points.append(point)
    return {
        "rank": 0,
        "checks": {"dispatches": 2, "combines": 3, "seconds": 1.0},
        "layout_us": 40.0,
        "points": points,
        "nccl": None,
    }


def _plan(backend: str) -> cli.Plan:
    return cli.Plan(
        backend,
        cli.Shape(64, 256, 4, 16),
        1 << 24,
        0,
        "quick",
        (4, 24, 256),
        (),
        backend == "cuda",
        False,
    )


def _meta(backend: str) -> dict:
    return dict(
        tritonep="0",
        device="x",
        ranks=2,
        commit="abc",
        backend=backend,
        gpus_shared_by_ranks=False,
        configs_from="V1's tables",
    )


def test_cpu_bench_report_prints_no_gpu_columns():
    text = cli._bench_report(_meta("cpu"), _plan("cpu"), [_record(gpu=False)])
    assert "ms per call" in text and "matched the reference exactly" in text
    assert "GB/s" not in text and "SMs" not in text
    assert "CUDA-event" not in cli._method("cpu") and "wall-clock" in cli._method("cpu")


def test_gpu_bench_report_has_deepep_columns():
    text = cli._bench_report(_meta("cuda"), _plan("cuda"), [_record(gpu=True)])
    assert "GB/s (NVL)" in text and "kernel us" in text and "SMs" in text
    assert "CUDA-event" in cli._method("cuda")


def test_best_chunks_pick_the_fastest_and_ties_to_the_smaller():
    points = [
        dict(op="dispatch_bf16", num_sms=4, chunk=8, us=2.0),
        dict(op="dispatch_bf16", num_sms=4, chunk=4, us=2.0),
        dict(op="dispatch_bf16", num_sms=4, chunk=16, us=3.0),
        dict(op="combine", num_sms=4, chunk=2, us=1.0),
    ]
    assert cli._best_chunks(points) == {"dispatch_bf16": {4: 4}, "combine": {4: 2}}


def test_config_file_round_trip_keeps_other_rank_counts(tmp_path, monkeypatch):
    path = str(tmp_path / "tuned.json")
    cli._write_config_file(path, 2, {"dispatch": {4: [8, 256, 6, 128]}, "combine": {}}, {})
    cli._write_config_file(path, 4, {"dispatch": {4: [6, 256, 6, 128]}, "combine": {}}, {})
    with open(path) as f:
        assert json.load(f)["format"] == CONFIG_FILE_FORMAT
    load_config_file.cache_clear()
    monkeypatch.setenv("TRITONEP_CONFIG_FILE", path)
    monkeypatch.setattr(tritonep.Buffer, "num_sms", 4)
    try:
        assert tritonep.Buffer.get_dispatch_config(2) == Config(4, 8, 256, 6, 128)
        assert tritonep.Buffer.get_dispatch_config(4) == Config(4, 6, 256, 6, 128)
    finally:
        load_config_file.cache_clear()


def test_check_on_this_machine_ends_with_a_verdict(capsys, monkeypatch, tmp_path):
    for name in [n for n in os.environ if n.startswith("TRITONEP_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = str(tmp_path / "check.json")
    status = envcheck.report(json_path=path)
    out = capsys.readouterr().out
    last = [line for line in out.splitlines() if line.startswith("verdict:")]
    assert len(last) == 1
    with open(path) as f:
        report = json.load(f)
    assert report["verdict"] in last[0]
    assert status == (1 if report["problems"] else 0)


def test_check_names_typos_and_bad_values(capsys, monkeypatch):
    monkeypatch.setenv("TRITONEP_TIMEOUT", "5")
    monkeypatch.setenv("TRITONEP_FORCE_PUT", "yes")
    assert envcheck.report() == 1
    out = capsys.readouterr().out
    assert "did you mean TRITONEP_TIMEOUT_S?" in out
    assert "TRITONEP_FORCE_PUT must be an integer" in out
    assert "verdict: NOT READY" in out


def test_host_overhead_on_cpu_ends_with_a_message():
    if __import__("torch").cuda.is_available():
        pytest.skip("CPU behaviour")
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "host_overhead.py")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.interpreter
def test_tune_writes_a_file_the_buffer_uses(tmp_path, monkeypatch, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("the CPU backend's smallest run")
    monkeypatch.delenv("TRITONEP_CONFIG_FILE", raising=False)
    output = str(tmp_path / "tuned.json")
    args = ["tune", "--backend", "cpu", "--tokens", "8", "--hidden", "64", "--topk", "2"]
    args += ["--experts", "4", "--sms", "2", "--dispatch-chunks", "4", "--combine-chunks", "2"]
    assert cli.main(args + ["--output", output, "--quiet", "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "export TRITONEP_CONFIG_FILE=" in out and "GB/s" not in out
    tables = load_config_file(output)
    load_config_file.cache_clear()
    # V1's chunks (24 dispatch, 10 combine at 2 ranks) are always timed beside the requested ones.
    assert tables["dispatch"][2][2][0] in (4, 24) and tables["combine"][2][2][0] in (2, 10)
