"""`deep_ep.utils` surface: `EventOverlap`, `EventHandle`, `check_nvlink_connections` (§5.4)."""

import socket

import torch
import torch.distributed as dist

from ._device import cuda_available
from .errors import EPUnsupported
from .event import EventHandle, EventOverlap

__all__ = ["EventOverlap", "EventHandle", "check_nvlink_connections"]


def _device_key(index: int) -> str:
    # Ranks may see different CUDA_VISIBLE_DEVICES, so indices are not comparable across processes;
    # the UUID is. Fall back to the index where device properties carry no UUID.
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else f"index:{index}"


def check_nvlink_connections(group: dist.ProcessGroup | None) -> None:
    """Check that every pair of GPUs used by the ranks of `group` on one node has peer access.

    Collective over `group` (one `all_gather_object`) when CUDA is usable, whatever the group's
    backend (ranks sharing a GPU use gloo). Each rank contributes its hostname, device and which
    local devices its device can reach peer-to-peer; every rank then evaluates the same table, so
    all ranks raise the same error. Devices a rank cannot see (per-rank `CUDA_VISIBLE_DEVICES`) are
    not checked. V1 checks only PCIe GPUs in groups of <= 2; tritonep checks all intra-node pairs
    (host = node).

    Args:
        group: the communication group; None means the default group.

    Raises:
        EPUnsupported: two GPUs of one node lack peer access; names both device indices.
    """
    if not cuda_available() or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size(group) <= 1:
        return  # a single rank has no pairs

    me = torch.cuda.current_device()
    reach = {
        _device_key(j): torch.cuda.can_device_access_peer(me, j)
        for j in range(torch.cuda.device_count())
        if j != me
    }
    info = (socket.gethostname(), me, _device_key(me), reach)
    table: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(table, info, group=group)
    message = _missing_peer_access(table)
    if message is not None:
        raise EPUnsupported(message)


def _missing_peer_access(table: list) -> str | None:
    """Describe the first same-host pair without peer access in a gathered table, or None.

    `table[rank] = (hostname, device_index, device_key, {device_key: can_access_peer})`.
    Rank order makes the first failing pair, hence the message, identical on every rank.
    """
    for rank_a, (host_a, index_a, _, reach_a) in enumerate(table):
        for rank_b, (host_b, index_b, key_b, _) in enumerate(table):
            # A key missing from `reach_a` is a device rank a cannot see: unknown, not a failure.
            if host_a == host_b and reach_a.get(key_b, True) is False:
                return (
                    f"check_nvlink_connections: on host {host_a}, GPU {index_a} (rank {rank_a}) "
                    f"cannot access GPU {index_b} (rank {rank_b}) peer-to-peer; the cuda backend "
                    "needs peer access between all GPUs of a node"
                )
    return None
