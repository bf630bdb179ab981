"""The short table `scripts/gpu_check.sh` prints last: one line per result file in its folder.

    python3 scripts/gpu_summary.py /tmp/tritonep-gpu

Each line names the record and its headline: pass/fail of the checks and tests, DeepEP-convention
event times and GB/s of the default config, best kernel times. The files hold everything else.
"""

from __future__ import annotations

import json
import os
import re
import sys


def _rank0(record: dict) -> dict:
    return record["ranks"][0] if record.get("ranks") else {}


def _bench(record: dict) -> str:
    rank = _rank0(record)
    defaults = {p["op"]: p for p in rank.get("points", []) if p.get("kind") == "default"}
    if not defaults:
        return "no default-config points"
    parts = [
        f"{op} {point['GBps']:.0f} GB/s ({point['us']:.0f} us)" for op, point in defaults.items()
    ]
    layout = f", layout {rank['layout_us']:.0f} us" if "layout_us" in rank else ""
    return "default config: " + ", ".join(parts) + layout


def _internode(record: dict) -> str:
    rank = _rank0(record)
    checked = "checks passed" if "check" in rank else "unchecked"
    best = {}
    for row in rank.get("dispatch", []):
        kind = f"dispatch {row['input']}"
        best[kind] = min(best.get(kind, float("inf")), row["us"])
    for row in rank.get("combine", []):
        best["combine"] = min(best.get("combine", float("inf")), row["us"])
    return f"{checked}; best kernel: " + ", ".join(f"{k} {v:.0f} us" for k, v in best.items())


def _low_latency(record: dict) -> str:
    ranks = record.get("ranks", [])
    wrong = sum(r.get("graph_replays_wrong", 0) for r in ranks)
    replays = sum(r.get("graph_replays", 0) for r in ranks)
    pair = max((r.get("dispatch_combine_event_us", 0.0) for r in ranks), default=0.0)
    graph = max((r.get("graph_replay_us", 0.0) for r in ranks), default=0.0)
    pair_graph = max((r.get("dispatch_combine_graph_us", 0.0) for r in ranks), default=0.0)
    return (
        f"graph replays wrong {wrong}/{replays}; pair {pair:.0f} us (events), "
        f"{pair_graph:.0f} us (graph); hooked step graph {graph:.0f} us"
    )


def _layout(record: dict) -> str:
    return ", ".join(
        f"{row['tokens']}x{row['experts']} R={row['ranks']}: {row['us']:.1f} us"
        for row in record.get("rows", [])
    )


def _host(record: dict) -> str:
    rows = [row for row in record.get("rows", []) if "event_us" in row and "host_us" in row]
    return ", ".join(
        f"{row['op']}: events {row['event_us']:.0f} us, host {row['host_us']:.0f} us"
        for row in rows
    )


def _nvshmem(record: dict) -> str:
    if record.get("passed"):
        return "passed"
    bad = [line[:80] for line in record.get("summary", []) if re.search(r"FAIL|lost|error", line)]
    return "FAILED: " + "; ".join(bad[:3])


def _pressure(record: dict) -> str:
    per_rank = record.get("per_rank", [])
    failures = sum(len(r.get("failures", [])) for r in per_rank)
    rounds = min((r.get("rounds", 0) for r in per_rank), default=0)
    return f"{rounds} rounds, {failures} failures"


SUMMARIES = [
    (r"^bench-", _bench),
    (r"^internode-", _internode),
    (r"^ll-", _low_latency),
    (r"^layout", _layout),
    (r"^host-overhead", _host),
    (r"^nvshmem", _nvshmem),
    (r"^pressure", _pressure),
]


def _pytest(path: str) -> str:
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    finals = [line for line in lines if re.search(r"\d+ (passed|failed)", line)]
    return finals[-1] if finals else "no final line (the stage was cut short)"


def main(argv: list[str]) -> int:
    folder = argv[1] if len(argv) > 1 else "/tmp/tritonep-gpu"
    lines = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == "pytest.log":
            lines.append((name, _pytest(path)))
            continue
        summary = next((fn for pattern, fn in SUMMARIES if re.match(pattern, name)), None)
        if summary is None or not name.endswith(".json"):
            continue
        try:
            with open(path) as f:
                lines.append((name, summary(json.load(f))))
        except (KeyError, TypeError, ValueError) as e:  # a partial file: say so, keep going
            lines.append((name, f"unreadable ({type(e).__name__}: {e})"))
    width = max((len(name) for name, _ in lines), default=0)
    print("== summary")
    for name, text in lines:
        print(f"{name.ljust(width)}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
