"""Every environment variable tritonep reads, parsed in one place.

| variable | default | read | meaning |
|---|---|---|---|
| `TRITONEP_TOPK_IDX_BITS` | 64 | at import | width of `topk_idx_t` (32 or 64) |
| `TRITONEP_TIMEOUT_S` | 100 | at Buffer construction | limit of every host and device wait |
| `TRITONEP_NVL_DOMAIN_SIZE` | min(R, 8) | at Buffer construction | ranks per node (NVLink domain) |
| `TRITONEP_BACKEND` | auto | at Buffer construction | `cuda` or `cpu` (interpreter); auto: `cuda` where CUDA is usable |
| `TRITONEP_FORCE_PUT` | 0 | at Buffer construction | 1: RDMA-memory traffic takes the put path (NVSHMEM, or its CPU emulation) even to peers that stores reach (tests the remote path on one host) |
| `TRITONEP_CONFIG_FILE` | unset | at the first `get_dispatch_config` / `get_combine_config` (also `dispatch` / `combine` without `config`) | JSON file written by `tritonep tune`: its entries replace V1's tuned tables for the rank and SM counts it lists; unset: V1's tables |
| `TRITONEP_PROGRAM_SHAPE` | unset | at Buffer construction | GPU backend, intranode mode: `field=value,...` overrides of the data kernels' program shape (`dispatch_warps`, `dispatch_rows_only_warps`, `dispatch_tile_words`, `combine_warps`, `combine_tile_words`, `combine_tile`, `prefetch`, `combine_receiver_stages`), for tuning sweeps |
| `TRITONEP_LL_PROGRAMS` | unset | at Buffer construction | GPU, low-latency mode: `field=value,...` programs per launch (`dispatch_senders`, `dispatch_receivers`, `combine_senders`, `combine_receivers`; built in: as many as the rank's share of the GPU holds, 2 programs per SM), for tuning sweeps; never above that share |
| `NVSHMEM_QP_DEPTH` | 1024 | at Buffer construction | only fills `Buffer.nvshmem_qp_depth` |

Variables tritonep sets itself: `TRITON_INTERPRET=1` when the CPU backend is selected before any
kernel module was imported (the Triton interpreter needs it before kernels are defined).
"""

import os

from .errors import EPInvalidArgument, EPUnsupported


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise EPInvalidArgument(f"environment: {name} must be an integer, got {raw!r}") from None


def topk_idx_bits() -> int:
    bits = _int("TRITONEP_TOPK_IDX_BITS", 64)
    if bits not in (32, 64):
        raise EPInvalidArgument(f"environment: TRITONEP_TOPK_IDX_BITS must be 32 or 64, got {bits}")
    return bits


def timeout_s() -> float:
    raw = os.environ.get("TRITONEP_TIMEOUT_S")
    if raw is None or raw == "":
        return 100.0
    try:
        value = float(raw)
    except ValueError:
        raise EPInvalidArgument(
            f"environment: TRITONEP_TIMEOUT_S must be a number, got {raw!r}"
        ) from None
    if not value > 0:
        raise EPInvalidArgument(f"environment: TRITONEP_TIMEOUT_S must be > 0, got {raw!r}")
    return value


def nvl_domain_size(num_ranks: int) -> int:
    if not os.environ.get("TRITONEP_NVL_DOMAIN_SIZE") and num_ranks > 8 and num_ranks % 8 != 0:
        raise EPUnsupported(
            "Buffer: more than 8 ranks must be a multiple of 8 (V1's nodes of 8 GPUs), got "
            f"{num_ranks}; TRITONEP_NVL_DOMAIN_SIZE sets another node size"
        )
    size = _int("TRITONEP_NVL_DOMAIN_SIZE", min(num_ranks, 8))
    if size <= 0 or num_ranks % size != 0:
        raise EPInvalidArgument(
            "environment: TRITONEP_NVL_DOMAIN_SIZE must be a positive divisor of the rank count "
            f"{num_ranks}, got {size}"
        )
    return size


def backend() -> str:
    value = os.environ.get("TRITONEP_BACKEND", "").strip().lower()
    if value not in ("", "auto", "cuda", "cpu"):
        raise EPInvalidArgument(
            f"environment: TRITONEP_BACKEND must be one of auto, cuda, cpu, got {value!r}"
        )
    return "auto" if value == "" else value


def force_put() -> bool:
    """`TRITONEP_FORCE_PUT=1`: RDMA-memory traffic takes the put path (NVSHMEM on GPUs, its
    emulation on the CPU) even between peers plain stores reach, so the remote path runs on one
    host."""
    return _int("TRITONEP_FORCE_PUT", 0) != 0


def config_file() -> str | None:
    """`TRITONEP_CONFIG_FILE`: path of a `tritonep tune` config file, or None when unset/empty."""
    path = os.environ.get("TRITONEP_CONFIG_FILE", "").strip()
    return path or None


def _field_overrides(variable: str, fields: tuple[str, ...]) -> dict[str, int]:
    """`field=integer,...` entries of `variable`, each naming one of `fields`."""
    raw = os.environ.get(variable, "").strip()
    overrides = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition("=")
        try:
            overrides[name.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep:
            raise EPInvalidArgument(
                f"environment: {variable} entries must be field=integer, got {item!r}"
            )
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise EPInvalidArgument(
            f"environment: {variable} names unknown fields {unknown}; fields: {list(fields)}"
        )
    return overrides


def program_shape_overrides(fields: tuple[str, ...]) -> dict[str, int]:
    """`TRITONEP_PROGRAM_SHAPE=dispatch_warps=16,combine_tile_words=8192`: integer overrides of the
    intranode program shape's `fields`."""
    return _field_overrides("TRITONEP_PROGRAM_SHAPE", fields)


LL_PROGRAM_FIELDS = (
    "dispatch_senders",
    "dispatch_receivers",
    "combine_senders",
    "combine_receivers",
)


def ll_program_overrides() -> dict[str, int]:
    """`TRITONEP_LL_PROGRAMS=dispatch_senders=128,combine_receivers=64`: programs per low-latency
    launch on the GPU (at least 1 each)."""
    overrides = _field_overrides("TRITONEP_LL_PROGRAMS", LL_PROGRAM_FIELDS)
    for name, value in overrides.items():
        if value < 1:
            raise EPInvalidArgument(f"environment: TRITONEP_LL_PROGRAMS {name} must be >= 1")
    return overrides


def nvshmem_qp_depth() -> int:
    return _int("NVSHMEM_QP_DEPTH", 1024)


def interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
