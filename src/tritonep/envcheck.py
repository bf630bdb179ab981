"""`tritonep check`: what this machine offers tritonep, what a Buffer would choose, and a verdict.

A newcomer's first question is whether tritonep will run here and how. The answer depends on
facts spread over several places: torch's build (CUDA or CPU), Triton's version (the CPU
interpreter needs >= 3.8 with numpy >= 2.3), the driver, how GPUs reach each other (peer access;
NVLink from `nvidia-smi topo -m`), whether NVSHMEM and MPS are there, and the `TRITONEP_*`
variables. This module gathers them in one report, derives what a `Buffer` of R ranks would do
with the same rules the Buffer applies (`select_backend`, `nvl_domain_size`, one GPU per rank or
shared GPUs), and sorts what it found into problems (a run would fail: exit status 1) and warnings
(a run works, but slowly or without some feature), each with the fix.

Nothing here allocates GPU memory or starts a process group: the report is safe on a busy node.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ._console import has_module, table

# Every variable tritonep reads (src/tritonep/_env.py); others starting with TRITONEP_ are typos.
KNOWN_VARIABLES = (
    "TRITONEP_TOPK_IDX_BITS",
    "TRITONEP_TIMEOUT_S",
    "TRITONEP_NVL_DOMAIN_SIZE",
    "TRITONEP_BACKEND",
    "TRITONEP_FORCE_PUT",
    "TRITONEP_CONFIG_FILE",
    "TRITONEP_COMMIT",
)


@dataclasses.dataclass
class Findings:
    """What `check` found: facts per section, plus problems (blocking) and warnings, each with
    what to do about it."""

    sections: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, section: str, key: str, value: Any) -> None:
        self.sections.setdefault(section, {})[key] = value


def _run(command: list[str], timeout: float = 10.0) -> tuple[int, str]:
    """(exit status, stdout + stderr) of a short external command; (-1, reason) if it cannot run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, str(e)
    return done.returncode, (done.stdout + done.stderr).strip()


def _version_of(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cuda_driver_api() -> str | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion), without torch."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _check_versions(found: Findings) -> None:
    import numpy
    import torch

    from . import __version__

    section = "versions"
    found.add(section, "tritonep", __version__)
    found.add(
        section, "python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"
    )
    cuda_build = torch.version.cuda
    found.add(
        section,
        "torch",
        f"{torch.__version__} ({'CUDA ' + cuda_build if cuda_build else 'CPU build, no CUDA'})",
    )
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = None
        found.problems.append((f"triton cannot be imported ({e})", "pip install 'triton>=3.8'"))
    found.add(section, "triton", triton_version)
    found.add(section, "numpy", numpy.__version__)
    pinned = [r for r in _torch_requirements() if r.startswith("triton")]
    if pinned:
        found.add(section, "torch expects", ", ".join(pinned))
    driver = None
    if shutil.which("nvidia-smi"):
        status, out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = out.splitlines()[0].strip() if status == 0 and out else None
    found.add(section, "NVIDIA driver", driver or "not found (no nvidia-smi)")
    found.add(section, "CUDA (driver API)", _cuda_driver_api() or "no libcuda")
    extras = [name for name in ("tqdm", "rich", "matplotlib", "mpi4py") if has_module(name)]
    found.add(section, "optional", ", ".join(extras) or "none of tqdm, rich, matplotlib, mpi4py")
    if (
        triton_version is not None
        and _older(triton_version, (3, 8))
        and not _older(numpy.__version__, (2, 3))
    ):
        found.warnings.append(
            (
                f"triton {triton_version} with numpy {numpy.__version__}: the Triton interpreter "
                "(CPU backend) fails on loops over runtime bounds",
                "for the CPU backend use triton >= 3.8 (GPU runs are not affected)",
            )
        )


def _torch_requirements() -> list[str]:
    from importlib import metadata

    try:
        return [r.replace(" ", "") for r in metadata.requires("torch") or []]
    except metadata.PackageNotFoundError:
        return []


def _older(version: str, than: tuple[int, int]) -> bool:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) < than


def _nvlink_matrix() -> dict[tuple[int, int], str]:
    """Link type per GPU pair from `nvidia-smi topo -m` (NV<n> = NVLink), empty if unavailable."""
    if not shutil.which("nvidia-smi"):
        return {}
    status, out = _run(["nvidia-smi", "topo", "-m"])
    if status != 0:
        return {}
    links = {}
    for line in out.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("GPU") or not fields[0][3:].isdigit():
            continue
        i = int(fields[0][3:])
        for j, link in enumerate(fields[1:]):
            if link.startswith(("NV", "PIX", "PXB", "PHB", "NODE", "SYS", "X")):
                links[(i, j)] = link
            else:
                break
    return links


def _check_gpus(found: Findings) -> int:
    """GPUs, their peer access and link types; returns the GPU count."""
    import warnings

    import torch

    section = "GPUs"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        reason = (
            "this torch is a CPU build"
            if torch.version.cuda is None
            else "; ".join(str(w.message) for w in caught) or "no device or driver"
        )
        found.add(section, "CUDA", f"not usable ({reason})")
        return 0
    count = torch.cuda.device_count()
    found.add(section, "count", count)
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        found.add(
            section,
            f"GPU {index}",
            f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB",
        )
        if (props.major, props.minor) < (9, 0):
            found.warnings.append(
                (
                    f"GPU {index} is sm_{props.major}{props.minor}: Buffer.is_sm90_compiled() is "
                    "False, so DeepEP-style scripts skip FP8",
                    "FP8 dispatch needs an sm_90 (Hopper) or newer GPU",
                )
            )
    if count > 1:
        links = _nvlink_matrix()
        rows = []
        for i in range(count):
            rows.append(
                [f"GPU {i}"]
                + [
                    "-"
                    if i == j
                    else ("P2P" if torch.cuda.can_device_access_peer(i, j) else "no P2P")
                    + (f" {links[(i, j)]}" if (i, j) in links else "")
                    for j in range(count)
                ]
            )
        found.add(
            section,
            "peer access",
            table(["from \\ to"] + [f"GPU {j}" for j in range(count)], rows, indent="    "),
        )
    return count


def _check_nvshmem_and_mps(found: Findings, num_gpus: int) -> None:
    section = "NVSHMEM and MPS"
    try:
        import torch.distributed._symmetric_memory as symm_mem

        available = (
            symm_mem.is_nvshmem_available() if hasattr(symm_mem, "is_nvshmem_available") else None
        )
    except ImportError:
        available = None
    found.add(
        section,
        "torch NVSHMEM backend",
        {True: "available", False: "not available", None: "unknown (torch too old)"}[available],
    )
    wheels = [
        f"{name} {v}"
        for name in ("nvidia-nvshmem-cu12", "nvidia-nvshmem-cu13")
        if (v := _version_of(name))
    ]
    found.add(section, "nvidia-nvshmem wheel", ", ".join(wheels) or "not installed")
    binary = shutil.which("nvidia-cuda-mps-control")
    found.add(section, "MPS control", binary or "not on PATH")
    if binary:
        status, _ = _mps_query(binary)
        found.add(section, "MPS daemon", "running" if status == 0 else "not reachable")
    elif num_gpus:
        found.add(section, "MPS daemon", "unknown (no nvidia-cuda-mps-control)")


def _mps_query(binary: str) -> tuple[int, str]:
    """Ask the MPS control daemon for its servers; status 0 iff a daemon answered."""
    try:
        done = subprocess.run(
            [binary], input="get_server_list\n", capture_output=True, text=True, timeout=5.0
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, str(e)
    return done.returncode, done.stdout.strip()


def _check_environment(found: Findings) -> None:
    from . import _env, config
    from .errors import EPError

    section = "environment"
    for name in sorted(n for n in os.environ if n.startswith("TRITONEP_")):
        found.add(section, name, os.environ[name])
        if name not in KNOWN_VARIABLES:
            close = difflib.get_close_matches(name, KNOWN_VARIABLES, n=1)
            found.warnings.append(
                (
                    f"{name} is not a variable tritonep reads",
                    f"did you mean {close[0]}?" if close else "see docs/user-guide.md for the list",
                )
            )
    interpret = os.environ.get("TRITON_INTERPRET")
    if interpret is not None:
        found.add(section, "TRITON_INTERPRET", interpret)
    if not any(n.startswith("TRITONEP_") for n in os.environ):
        found.add(section, "TRITONEP_*", "none set (defaults)")
    for parse in (_env.topk_idx_bits, _env.timeout_s, _env.backend, _env.force_put):
        try:
            parse()
        except EPError as e:
            found.problems.append((str(e), "fix or unset the variable"))
    path = _env.config_file()
    if path:
        try:
            tables = config.load_config_file(path)
            listed = sorted({r for kind in tables.values() for r in kind})
            found.add(section, "tuned configs", f"{path}: rank counts {listed}")
        except EPError as e:
            found.problems.append((str(e), "rerun `tritonep tune`, or unset TRITONEP_CONFIG_FILE"))


def _check_choice(found: Findings, num_ranks: int, num_gpus: int) -> tuple[str, str]:
    """Which backend and mode a Buffer of `num_ranks` ranks would take here, and why."""
    from . import _env
    from .errors import EPError
    from .runtime.topology import select_backend

    section = f"what a Buffer of {num_ranks} ranks would do"
    try:
        backend = select_backend()
    except EPError:
        return "none", "invalid TRITONEP_BACKEND"
    requested = _env.backend()
    why = (
        f"TRITONEP_BACKEND={requested}"
        if requested != "auto"
        else ("CUDA is usable" if num_gpus else "no usable CUDA device")
    )
    interpret = _env.interpret_enabled()
    if backend == "cpu":
        found.add(
            section,
            "backend",
            f"cpu ({why}): the same Triton kernels in the interpreter, one process per rank",
        )
        found.add(section, "peer memory", "/dev/shm files mapped by every rank process; gloo group")
        if "TRITON_INTERPRET" in os.environ and not interpret:
            found.problems.append(
                (
                    f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} but the CPU backend needs "
                    "the interpreter",
                    "unset TRITON_INTERPRET (tritonep sets it to 1 itself)",
                )
            )
        _check_shm(found, section)
    else:
        found.add(section, "backend", f"cuda ({why}): compiled Triton kernels on the GPUs")
        if interpret:
            found.problems.append(
                (
                    "TRITON_INTERPRET=1 is set: kernels would run in the CPU interpreter",
                    "unset TRITON_INTERPRET for the cuda backend, or set TRITONEP_BACKEND=cpu",
                )
            )
        if not num_gpus:
            found.problems.append(
                ("TRITONEP_BACKEND=cuda but no CUDA device is usable", "unset TRITONEP_BACKEND")
            )
        elif num_ranks > num_gpus:
            found.add(
                section,
                "peer memory",
                f"{num_ranks} ranks on {num_gpus} GPU(s): ranks share GPUs through CUDA IPC (use a "
                "gloo group: NCCL refuses two ranks on one GPU); correctness runs, timings are not "
                "NVLink's",
            )
            if found.sections.get("NVSHMEM and MPS", {}).get("MPS daemon") != "running":
                found.warnings.append(
                    (
                        "ranks sharing a GPU without an MPS daemon time-slice and crawl",
                        "start MPS: nvidia-cuda-mps-control -d",
                    )
                )
        else:
            found.add(
                section, "peer memory", "torch symmetric memory, one GPU per rank (NVLink P2P)"
            )
            import torch

            missing = [
                (i, j)
                for i in range(num_ranks)
                for j in range(num_ranks)
                if i != j and not torch.cuda.can_device_access_peer(i, j)
            ]
            if missing:
                i, j = missing[0]
                found.problems.append(
                    (
                        f"GPU {i} cannot access GPU {j} peer-to-peer (Buffer raises EPUnsupported)",
                        "use GPUs joined by NVLink or PCIe P2P (nvidia-smi topo -m)",
                    )
                )
    try:
        per_node = _env.nvl_domain_size(num_ranks)
    except EPError as e:
        found.problems.append(
            (str(e), "set TRITONEP_NVL_DOMAIN_SIZE to a divisor of the rank count")
        )
        return backend, "none"
    nodes = num_ranks // per_node
    if nodes == 1:
        mode = "intranode"
        found.add(
            section,
            "high-throughput mode",
            f"intranode: {num_ranks} ranks in one node"
            + (" (NVLink domain)" if backend == "cuda" else ""),
        )
        found.add(
            section,
            "low-latency mode",
            "every peer mapped: plain stores, no NVSHMEM needed"
            + ("; TRITONEP_FORCE_PUT=1 sends through puts" if _safe(_env.force_put) else ""),
        )
    else:
        mode = "internode"
        # Builds without the internode mode refuse its calls (Buffer._refuse_internode).
        from .buffer import Buffer

        if has_module("tritonep.modes.internode") and not hasattr(Buffer, "_refuse_internode"):
            found.add(
                section,
                "high-throughput mode",
                f"internode: {nodes} nodes of {per_node}, NVLink inside a node, NVSHMEM between",
            )
        else:
            found.add(
                section, "high-throughput mode", f"internode ({nodes} nodes of {per_node}): absent"
            )
            found.problems.append(
                (
                    f"{nodes} nodes of {per_node} ranks: this build has no internode mode, so "
                    "dispatch/combine raise EPUnsupported",
                    "run at most one NVLink domain (TRITONEP_NVL_DOMAIN_SIZE >= rank count) or "
                    "use the low-latency mode",
                )
            )
        found.add(
            section,
            "low-latency mode",
            "peers of other nodes through NVSHMEM puts"
            + (" (emulated over /dev/shm)" if backend == "cpu" else ""),
        )
    needs_nvshmem = nodes > 1 or _safe(_env.force_put)
    nvshmem = found.sections.get("NVSHMEM and MPS", {}).get("torch NVSHMEM backend")
    if backend == "cuda" and needs_nvshmem and nvshmem != "available":
        found.problems.append(
            (
                "traffic between nodes (or forced puts) needs NVSHMEM, which this torch cannot use",
                "a CUDA build of torch >= 2.8 and pip install nvidia-nvshmem-cu12 (or -cu13)",
            )
        )
    return backend, mode


def _safe(parse: Callable[[], Any]) -> Any:
    from .errors import EPError

    try:
        return parse()
    except EPError:
        return None


def _check_shm(found: Findings, section: str) -> None:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        found.problems.append(("/dev/shm is missing", "the CPU backend needs a tmpfs at /dev/shm"))
        return
    free = stats.f_bavail * stats.f_frsize
    found.add(section, "/dev/shm free", f"{free / 2**20:.0f} MiB")
    if not os.access("/dev/shm", os.W_OK):
        found.problems.append(("/dev/shm is not writable", "run where /dev/shm is writable"))
    elif free < 64 << 20:
        found.warnings.append(
            (
                f"/dev/shm has {free >> 20} MiB free",
                "each rank maps num_nvl_bytes there: free space",
            )
        )


def report(ranks: int = 0, json_path: str | None = None) -> int:
    """Print the report; write it to `json_path` too. Returns 1 when a problem blocks a run."""
    found = Findings()
    _check_versions(found)
    num_gpus = _check_gpus(found)
    _check_nvshmem_and_mps(found, num_gpus)
    _check_environment(found)
    num_ranks = ranks or max(num_gpus, 2)
    backend, mode = _check_choice(found, num_ranks, num_gpus)
    print(f"tritonep check ({datetime.now().strftime('%Y-%m-%d %H:%M')}, host {platform.node()})")
    for section, facts in found.sections.items():
        print(f"\n{section}")
        width = max(len(k) for k in facts)
        for key, value in facts.items():
            text = str(value)
            print(f"  {key:<{width}}  {text}" if "\n" not in text else f"  {key}:\n{text}")
    for what, fix in found.warnings:
        print(f"\nwarning: {what}\n  -> {fix}")
    for what, fix in found.problems:
        print(f"\nproblem: {what}\n  -> fix: {fix}")
    if found.problems:
        verdict = f"NOT READY: {len(found.problems)} problem(s) above to fix"
    elif backend == "cpu":
        verdict = (
            f"ready: CPU backend, {mode} mode with {num_ranks} ranks (the interpreter is for tests "
            "and development, not speed); next: tritonep bench"
        )
    else:
        verdict = f"ready: cuda backend, {mode} mode with {num_ranks} ranks; next: tritonep bench"
    print(f"\nverdict: {verdict}")
    _write_json(
        json_path,
        {
            "sections": found.sections,
            "warnings": [{"what": w, "fix": f} for w, f in found.warnings],
            "problems": [{"what": w, "fix": f} for w, f in found.problems],
            "backend": backend,
            "mode": mode,
            "ranks": num_ranks,
            "verdict": verdict,
        },
    )
    return 1 if found.problems else 0


def _write_json(path: str | None, payload: dict) -> None:
    import json

    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")
