"""`Config` of the high-throughput (HT) kernels, V1's buffer size hints, and per-rank-count tables.

What a Config means in tritonep (reference §3):
  * `num_sms` is the program budget of the HT data kernels: their persistent grids never hold
    more than `num_sms` programs, so the remaining SMs stay free for overlapped compute. The work
    is split into `C = num_sms // 2` channels (V1 runs a sender and a receiver block per channel);
    `C` also fixes the width of the channel matrices in handles, so it must match between dispatch
    and a cached dispatch / combine of the same handle.
  * `num_max_nvl_chunked_send_tokens` is how many rows a sender writes before publishing them to
    the receiver (one tail-counter store per chunk); `num_max_nvl_chunked_recv_tokens` is the
    capacity in rows of the queue of one (channel, peer) pair in the NVLink buffer.
  * The two `rdma` values are the same pair for the inter-node queues; intranode calls ignore them.

Size hints reproduce V1's byte formulas exactly (§3.1, §6.5): V1 programs size their buffers with
them, and tritonep guarantees that buffers of at least these sizes run every call.

The tables of §6.3 are V1's tuned entries. V1 rejects other rank counts; tritonep substitutes the
nearest listed count of the same mode (intranode entries for R <= 8, internode entries for R > 8,
ties to the larger count, whose queue capacities are never smaller) and warns once.

Tuned files: V1's entries were tuned on V1's kernels and machines. `tritonep tune` measures chunk
sizes on this machine and writes a JSON file; pointing `TRITONEP_CONFIG_FILE` at it makes
`get_dispatch_config` / `get_combine_config` (and so `dispatch` / `combine` called without a
config) use its entries. The file maps rank count -> SM count -> the four chunk values:

    {"format": "tritonep-config/1",
     "dispatch": {"2": {"24": [nvl_send, nvl_recv, rdma_send, rdma_recv], ...}, ...},
     "combine":  {...}, "measured": {...}}

`num_sms` stays the caller's budget (`Buffer.num_sms`): the entry of that SM count is used, or of
the nearest listed one (ties to the larger) when the file has the rank count but not that SM count;
rank counts the file does not list fall back to V1's tables. The file is read once per process and
path (the hot path must not touch the file system); a malformed file raises `EPInvalidArgument`
naming the file and the entry.
"""

import functools
import json
import operator
import warnings
from dataclasses import dataclass, fields

from . import _env
from .errors import EPInvalidArgument

# V1 constants of the HT buffer layout: top-k and scale columns the hints reserve room for (MAX_TOPK
# is also the largest top-k the HT calls accept), and the byte size of the internode per-token
# source-metadata record.
MAX_TOPK = 128
_MAX_SCALES = 128
_SOURCE_META_BYTES = 8


def _align128(value: int) -> int:
    return -(-value // 128) * 128


def _topk_idx_bytes() -> int:
    # topk_idx_t is fixed at package import; reading it (not the environment) keeps the hints in
    # step with the dtype tensors actually use. Lazy import: the package imports this module.
    from . import topk_idx_t

    return topk_idx_t.itemsize


def _as_int(where: str, name: str, value: object) -> int:
    # bool is an int subclass, but Config(True, ...) is a caller bug, not num_sms=1.
    if isinstance(value, bool):
        raise EPInvalidArgument(f"{where}: {name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise EPInvalidArgument(
            f"{where}: {name} must be an int, got {value!r} ({type(value).__name__})"
        ) from None


@dataclass(frozen=True)
class Config:
    """Tuning of one HT dispatch or combine; V1's positional order, validated at construction.

    Args:
        num_sms: program budget of the HT data kernels, `>= 0` here (must be even and `>= 2`
            where it is used); `num_channels = num_sms // 2`.
        num_max_nvl_chunked_send_tokens: rows per queue publish, `> 0` and `< ..._recv_tokens`.
        num_max_nvl_chunked_recv_tokens: queue capacity in rows per (channel, peer), `> 0`.
        num_max_rdma_chunked_send_tokens: same as the nvl send chunk for inter-node queues, `> 0`.
        num_max_rdma_chunked_recv_tokens: inter-node queue capacity, `> 0`; stored rounded up to a
            multiple of the rdma send chunk, which must then be at most half of it.

    Raises `EPInvalidArgument` naming the first argument that breaks a rule (reference §3 order).
    Instances are immutable, hashable, comparable and picklable.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for param in fields(self):
            value = _as_int("Config", param.name, getattr(self, param.name))
            object.__setattr__(self, param.name, value)
        if self.num_sms < 0:
            raise EPInvalidArgument(f"Config: num_sms must be >= 0, got {self.num_sms}")
        for name in ("num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens"):
            if getattr(self, name) <= 0:
                raise EPInvalidArgument(f"Config: {name} must be > 0, got {getattr(self, name)}")
        nvl_send = self.num_max_nvl_chunked_send_tokens
        nvl_recv = self.num_max_nvl_chunked_recv_tokens
        if nvl_send >= nvl_recv:
            raise EPInvalidArgument(
                "Config: num_max_nvl_chunked_send_tokens must be < "
                f"num_max_nvl_chunked_recv_tokens ({nvl_recv}), got {nvl_send}"
            )
        for name in ("num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            if getattr(self, name) <= 0:
                raise EPInvalidArgument(f"Config: {name} must be > 0, got {getattr(self, name)}")
        rdma_send = self.num_max_rdma_chunked_send_tokens
        rdma_recv = self.num_max_rdma_chunked_recv_tokens
        # Idempotent, so a Config rebuilt from stored values (dataclasses.replace) keeps them.
        rounded = -(-rdma_recv // rdma_send) * rdma_send
        if not (rdma_send < rounded and rdma_send <= rounded // 2):
            raise EPInvalidArgument(
                "Config: num_max_rdma_chunked_send_tokens must be < and at most half of "
                f"num_max_rdma_chunked_recv_tokens ({rdma_recv}, rounded up to {rounded}), got "
                f"{rdma_send}"
            )
        object.__setattr__(self, "num_max_rdma_chunked_recv_tokens", rounded)

    @property
    def num_channels(self) -> int:
        """`C = num_sms // 2`: HT channels, and the width of the handles' channel matrices."""
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of `num_nvl_bytes` that V1 asks for HT calls with this config (reference §3.1).

        Args:
            hidden_bytes: bytes of one token row, `H * element_size` (V1 tests pass `H * 2`).
            num_ranks: `R`; must be `< 8` or a multiple of 8, and `num_sms` must be even if `R > 8`.
        """
        if not (num_ranks < 8 or num_ranks % 8 == 0):
            raise EPInvalidArgument(
                "get_nvl_buffer_size_hint: num_ranks must be < 8 or a multiple of 8, got "
                f"{num_ranks}"
            )
        if not (num_ranks <= 8 or self.num_sms % 2 == 0):
            raise EPInvalidArgument(
                f"get_nvl_buffer_size_hint: num_sms must be even when num_ranks ({num_ranks}) > 8, "
                f"got {self.num_sms}"
            )
        tb = _topk_idx_bytes()
        rd, nv, c = max(num_ranks // 8, 1), min(num_ranks, 8), self.num_sms // 2
        rows = c * nv * self.num_max_nvl_chunked_recv_tokens
        row_bytes = (
            hidden_bytes + _SOURCE_META_BYTES + MAX_TOPK * tb + MAX_TOPK * 4 + _MAX_SCALES * 4
        )
        return _align128(c * nv * (2 * rd + 3) * 4 + rows * row_bytes)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of `num_rdma_bytes` that V1 asks for HT calls with this config (reference §3.1).

        Args:
            hidden_bytes: bytes of one token row, `H * element_size`.
            num_ranks: `R`; `0` is returned for `R <= 8`, otherwise `R` must be a multiple of 8 and
                `num_sms` even.
        """
        if num_ranks <= 8:
            return 0
        if num_ranks % 8 != 0:
            raise EPInvalidArgument(
                "get_rdma_buffer_size_hint: num_ranks must be a multiple of 8 when > 8, got "
                f"{num_ranks}"
            )
        if self.num_sms % 2 != 0:
            raise EPInvalidArgument(
                f"get_rdma_buffer_size_hint: num_sms must be even when num_ranks ({num_ranks}) > "
                f"8, got {self.num_sms}"
            )
        tb = _topk_idx_bytes()
        rd, c = num_ranks // 8, self.num_sms // 2
        rows = c * rd * self.num_max_rdma_chunked_recv_tokens
        # + 16: V1 reserves one int4 per row beyond the NVL row layout; the factor 2 below counts
        # its send and receive halves.
        row_bytes = (
            hidden_bytes + _SOURCE_META_BYTES + MAX_TOPK * tb + MAX_TOPK * 4 + _MAX_SCALES * 4 + 16
        )
        return _align128(c * rd * (8 * 2 + 2) * 2 * 4 + 2 * rows * row_bytes)


def get_low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of `num_rdma_bytes` that V1 asks for low-latency mode (reference §6.5).

    Two buffer sets, each with a send half, a receive half and a signal half. A dispatch message is
    a 16-byte header plus the larger of a BF16 row and an FP8 row with one float scale per 128
    columns. `num_ranks` does not enter the formula (kept for V1's signature).
    """
    tokens = num_max_dispatch_tokens_per_rank
    num_scales = hidden // 128
    dispatch_msg = 16 + max(2 * hidden, hidden + 4 * num_scales)
    combine_msg = 4 * num_scales + 2 * hidden
    send_half = max(tokens * dispatch_msg, num_experts * tokens * combine_msg)
    recv_half = max(num_experts * tokens * dispatch_msg, num_experts * tokens * combine_msg)
    signal_half = _align128(4 * num_experts)
    total = 2 * send_half + 2 * recv_half + 2 * signal_half
    # V1 adds a whole 128-byte unit even when total is already aligned.
    return (total // 128 + 1) * 128


# num_ranks -> (nvl_send, nvl_recv, rdma_send, rdma_recv), V1's tuned entries (reference §6.3).
DISPATCH_TABLE: dict[int, tuple[int, int, int, int]] = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (32, 288, 8, 128),
    32: (32, 288, 8, 128),
    48: (32, 288, 8, 128),
    64: (32, 288, 8, 128),
    96: (20, 480, 12, 128),
    128: (20, 560, 12, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
COMBINE_TABLE: dict[int, tuple[int, int, int, int]] = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    48: (1, 288, 8, 128),
    64: (1, 288, 8, 128),
    96: (1, 480, 8, 128),
    128: (1, 560, 8, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}

# (kind, num_ranks) pairs already warned about, so a training loop warns once, not every step.
_warned: set[tuple[str, int]] = set()


CONFIG_FILE_FORMAT = "tritonep-config/1"
_KINDS = ("dispatch", "combine")


@functools.lru_cache(maxsize=4)
def load_config_file(path: str) -> dict[str, dict[int, dict[int, tuple[int, int, int, int]]]]:
    """The tuned entries of a `tritonep tune` file: kind -> num_ranks -> num_sms -> chunk values.

    Every entry is validated by building its `Config`, so a bad file fails here, naming the entry,
    and never inside a collective call. Cached per path: call `load_config_file.cache_clear()` after
    rewriting a file in the same process.
    """
    where = f"TRITONEP_CONFIG_FILE={path}"
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise EPInvalidArgument(f"{where}: cannot read the file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise EPInvalidArgument(f"{where}: not JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != CONFIG_FILE_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise EPInvalidArgument(
            f"{where}: expected a {CONFIG_FILE_FORMAT!r} file from `tritonep tune`, got {found!r}"
        )
    tables: dict[str, dict[int, dict[int, tuple[int, int, int, int]]]] = {}
    for kind in _KINDS:
        tables[kind] = {}
        by_ranks = raw.get(kind, {})
        if not isinstance(by_ranks, dict):
            raise EPInvalidArgument(f"{where}: {kind} must map rank counts to entries")
        for ranks_key, by_sms in by_ranks.items():
            if not isinstance(by_sms, dict):
                raise EPInvalidArgument(
                    f"{where}: {kind}[{ranks_key}] must map SM counts to entries"
                )
            for sms_key, values in by_sms.items():
                entry = f"{where}: {kind}[{ranks_key}][{sms_key}]"
                try:
                    num_ranks, num_sms = int(ranks_key), int(sms_key)
                    chunks = tuple(values)
                    if len(chunks) != 4:
                        raise EPInvalidArgument(f"4 chunk values expected, got {len(chunks)}")
                    Config(num_sms, *chunks)
                except (TypeError, ValueError) as e:  # EPInvalidArgument is a ValueError
                    raise EPInvalidArgument(f"{entry}: {e}") from None
                if num_ranks < 1 or num_sms < 2 or num_sms % 2:
                    raise EPInvalidArgument(
                        f"{entry}: needs num_ranks >= 1 and an even num_sms >= 2"
                    )
                tables[kind].setdefault(num_ranks, {})[num_sms] = chunks
    return tables


def _tuned_entry(kind: str, num_ranks: int, num_sms: int) -> tuple[int, int, int, int] | None:
    """The tuned file's entry for (num_ranks, num_sms), nearest SM count; None without one."""
    path = _env.config_file()
    if path is None:
        return None
    by_sms = load_config_file(path)[kind].get(num_ranks)
    if not by_sms:
        return None
    return by_sms[min(by_sms, key=lambda sms: (abs(sms - num_sms), -sms))]


def v1_rank_count(table: dict, num_ranks: int) -> int:
    """The rank count whose V1 entry serves `num_ranks`: itself if listed, else the nearest of the
    same mode (ties to the larger)."""
    if num_ranks in table:
        return num_ranks
    same_mode = [n for n in table if (n <= 8) == (num_ranks <= 8)]
    return min(same_mode, key=lambda n: (abs(n - num_ranks), -n))


def v1_entry(table: dict, num_ranks: int) -> tuple[int, int, int, int]:
    """V1's chunk values for `num_ranks` (nearest listed count), whatever a tuned file says."""
    return table[v1_rank_count(table, num_ranks)]


def _table_config(kind: str, table: dict, num_ranks: int, num_sms: int) -> Config:
    num_ranks = _as_int(f"{kind}_config", "num_ranks", num_ranks)
    if num_ranks < 1:
        raise EPInvalidArgument(f"{kind}_config: num_ranks must be >= 1, got {num_ranks}")
    tuned = _tuned_entry(kind, num_ranks, num_sms)
    if tuned is not None:
        return Config(num_sms, *tuned)
    listed = v1_rank_count(table, num_ranks)
    config = Config(num_sms, *table[listed])
    if listed != num_ranks and (kind, num_ranks) not in _warned:
        _warned.add((kind, num_ranks))
        warnings.warn(
            f"tritonep: no tuned {kind} config for num_ranks={num_ranks}; using the entry of "
            f"num_ranks={listed}: {config}",
            stacklevel=3,
        )
    return config


def dispatch_config(num_ranks: int, num_sms: int) -> Config:
    """A new dispatch `Config(num_sms, ...)`: the tuned file's entry if `TRITONEP_CONFIG_FILE`
    lists `num_ranks`, else the §6.3 table (nearest entry if unlisted)."""
    return _table_config("dispatch", DISPATCH_TABLE, num_ranks, num_sms)


def combine_config(num_ranks: int, num_sms: int) -> Config:
    """A new combine `Config(num_sms, ...)`: the tuned file's entry if `TRITONEP_CONFIG_FILE`
    lists `num_ranks`, else the §6.3 table (nearest entry if unlisted)."""
    return _table_config("combine", COMBINE_TABLE, num_ranks, num_sms)
