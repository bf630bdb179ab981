"""The host block: what kernels tell the host, and the host's bounded waits for it
(reference §14.6-§14.7).

Each Buffer owns a small int64 block in host-visible memory (pinned on GPUs; layout in
`protocol.py`). Kernels write into it: the received counts of a counting notify (then `ready`),
the first error record of the buffer (timeout, geometry mismatch, refusal), a worst-case overflow,
the first expert id out of range. The host reads it at the start of every call and while it waits
for counts, so a device-side failure surfaces as an exception at the latest on the next call,
without any host synchronisation on the hot path.

After an error record the buffer is poisoned: every later data-path call raises `EPStateError`
with advice the user can follow (a buffer made without `explicitly_destroy` cannot be destroyed,
only dropped and re-created).
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from .. import protocol
from ..errors import EPInvalidArgument, EPStateError, EPTimeoutError, EPUnsupported


class HostBlock:
    """The host block of one Buffer on rank `rank`, and the state derived from it.

    Attributes:
        address: the block's address, which kernels receive as `host_addr`.
        poison: why the buffer is unusable, or None.
    """

    def __init__(
        self,
        rank: int,
        pinned: bool,
        timeout_s: float,
        explicitly_destroy: bool,
        ranks_per_node: int | None = None,
    ):
        self.rank = rank
        self._on_gpu = pinned  # a pinned block serves GPU kernels; the CPU backend's is plain
        # Across nodes, error records also name the nodes of the two ranks (None: one node).
        self._ranks_per_node = ranks_per_node
        self.timeout_s = timeout_s
        self._explicitly_destroy = explicitly_destroy
        self._tensor = torch.zeros(
            protocol.HOST_SLOTS, dtype=torch.int64, device="cpu", pin_memory=pinned
        )
        self._slots = self._tensor.numpy()
        # Reads of single slots on every call's check: indexing a memoryview gives a Python int
        # directly (0.1 us for the four flags, against 0.4 through numpy scalars).
        self._words = memoryview(self._slots)
        self.address = self._tensor.data_ptr()
        self.poison: str | None = None
        self.num_worst_tokens = 0  # of the latest worst-case dispatch, for the overflow message
        self._ready_token = 0

    def close(self) -> None:
        self._words.release()  # the view exports the block's buffer: released first
        self._tensor = None
        self._slots = None

    # ------------------------------------------------------------------------------- checks
    def check_usable(self, op: str) -> None:
        """Raise if the buffer is poisoned, or what the kernels reported since the last look."""
        if self.poison is not None:
            remedy = (
                "destroy() it and create a new Buffer"
                if self._explicitly_destroy
                else (
                    "drop every reference to it (it is released when garbage-collected) and create "
                    "a new Buffer"
                )
            )
            raise EPStateError(
                f"{op}: buffer is unusable after an earlier device error ({self.poison}); {remedy}"
            )
        self.check(op)

    def after_launch(self, op: str, include_overflow: bool = True) -> None:
        """After a launch: on the CPU backend (the interpreter) the kernels have finished, so what
        they reported belongs to this call and is raised now; on GPUs the next call's
        `check_usable` sees it (no host synchronisation here)."""
        if not self._on_gpu:
            self.check(op, include_overflow)

    def check(self, op: str, include_overflow: bool = True) -> None:
        """Turn a device report into an exception (reference §14.7).

        An error record poisons the buffer, except a refusal (no kernel acted on it). A worst-case
        overflow and an expert id out of range are caller errors that stop nothing: they raise once.
        """
        slots, words = self._slots, self._words
        overflow = words[protocol.HOST_OVERFLOW] if include_overflow else 0
        if overflow:
            slots[protocol.HOST_OVERFLOW] = 0
            raise EPInvalidArgument(
                f"{op}: rank {self.rank}: a worst-case dispatch received {overflow} rows but "
                f"num_worst_tokens was {self.num_worst_tokens}; the rows beyond it were dropped "
                "(raise num_worst_tokens)"
            )
        bad_token = words[protocol.HOST_BAD_EXPERT]
        if bad_token:
            first = protocol.HOST_BAD_EXPERT
            k, value, num_experts = (int(v) for v in slots[first + 1 : first + 4])
            slots[first : first + 4] = 0
            raise EPInvalidArgument(
                f"{op}: rank {self.rank}: an earlier get_dispatch_layout on this buffer got "
                f"topk_idx[{bad_token - 1}, {k}] = {value}, which is not below "
                f"num_experts={num_experts}; it was counted as -1 (no expert)"
            )
        shrunk = words[protocol.HOST_SHRUNK]
        if shrunk:
            slots[protocol.HOST_SHRUNK] = 0
            ranks = [s for s in range(64) if shrunk >> s & 1]
            warnings.warn(
                f"tritonep: {op}: rank {self.rank}: a low-latency wait timed out on rank(s) "
                f"{ranks}, which are now masked (shrink mode); the calls completed without them",
                stacklevel=3,
            )
        code = words[protocol.HOST_ERROR_CODE]
        if code != 0:
            self._raise_record(op, code)

    def _raise_record(self, op: str, code: int) -> None:
        slots = self._slots
        rank, peer, phase, channel, observed, expected = (
            int(v) for v in slots[protocol.HOST_ERROR + 1 : protocol.HOST_ERROR + 7]
        )
        phase_name = protocol.PHASE_NAMES.get(phase, f"phase {phase}")
        where = f"{phase_name} phase" + (
            f", {protocol.channel_word(phase)} {channel}" if channel >= 0 else ""
        )
        if code == protocol.ERR_TIMEOUT:
            # A negative progress: the peer's signal still carried an earlier call's tag.
            behind = "; it had not reached this call" if observed < 0 else ""
            message = (
                f"rank {rank} timed out after {self.timeout_s:g} s in the {where} waiting for rank "
                f"{peer} (progress seen {observed}, needed {expected}{behind}); "
                "TRITONEP_TIMEOUT_S sets the limit"
            )
            error = EPTimeoutError
        elif code == protocol.ERR_LAYOUT_MISMATCH:
            message = (
                f"rank {rank} found in the {where} that rank {peer} made this call with a "
                "different geometry (hidden size, top-k, scales, dtype or config; fingerprint "
                f"{observed} vs {expected})"
            )
            error = EPInvalidArgument
        elif code == protocol.ERR_REFUSED:
            slots[protocol.HOST_ERROR : protocol.HOST_ERROR + protocol.ERROR_SLOTS] = 0
            raise EPUnsupported(
                f"{op}: the CPU backend runs a launch's programs one after another, so a queue "
                f"must hold a whole channel; rank {peer} needs {observed} rows but queues hold "
                f"{expected}: raise num_nvl_bytes, num_max_nvl_chunked_recv_tokens or num_sms"
            )
        else:
            message = f"rank {rank}: device error code {code} in the {where}"
            error = EPStateError
        d = self._ranks_per_node
        if d is not None:
            message += (
                f" [nodes of {d} ranks: rank {rank} is on node {rank // d}, rank {peer} on "
                f"node {peer // d}]"
            )
        self.poison = message
        print(f"tritonep: {op}: {message}", file=sys.stderr)
        raise error(f"{op}: {message}")

    # -------------------------------------------------------------------------- count waits
    def arm_counts(self) -> int:
        """A fresh token for the next counting notify, which writes it to `ready` last.

        The token is chosen by the host per call, so a late write of an earlier call (a worst-case
        dispatch the host did not wait for, a graph replay) can never pass for this call's.
        """
        self._ready_token += 1
        self._slots[protocol.HOST_READY] = 0
        return self._ready_token

    def wait_counts(self, op: str, experts_per_rank: int) -> tuple[int, list[int]]:
        """Block (GIL released between polls) until the armed notify publishes its counts.

        Returns (rows this rank receives, received rows per local expert).
        """
        slots = self._slots
        deadline = time.monotonic() + self.timeout_s
        spins = 0
        while slots[protocol.HOST_READY] != self._ready_token:
            if slots[protocol.HOST_ERROR_CODE] != 0:
                self.check(op)
            spins += 1
            if spins > 1000:
                time.sleep(20e-6)
                if time.monotonic() > deadline:
                    self.poison = f"rank {self.rank}: host wait for the received counts timed out"
                    raise EPTimeoutError(
                        f"{op}: rank {self.rank} timed out after {self.timeout_s:g} s waiting for "
                        "the notify kernel to publish the received token counts (some rank has "
                        "not joined this dispatch)"
                    )
        self.check(op, include_overflow=False)
        first = protocol.HOST_EXPERT_COUNTS
        return int(slots[protocol.HOST_NUM_RECV]), [
            int(v) for v in slots[first : first + experts_per_rank]
        ]
