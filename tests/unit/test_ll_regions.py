"""The low-latency layout fits V1's size hint for every geometry (reference §6.5): a V1 user who
sizes `num_rdma_bytes` with `Buffer.get_low_latency_rdma_size_hint` can run every call of that
geometry, lifted hidden sizes and top-k included."""

import pytest

from tritonep import Buffer
from tritonep.kernels.low_latency.regions import LowLatencyRegions


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 8, 128, 511])
@pytest.mark.parametrize("hidden", [128, 256, 384, 512, 640, 896, 2048, 7168, 8192])
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 8, 16])
def test_regions_fit_the_v1_hint(max_tokens, hidden, num_ranks):
    for experts_per_rank in (1, 2, 3, 9, 144):
        num_experts = experts_per_rank * num_ranks
        regions = LowLatencyRegions(max_tokens, hidden, num_experts, num_ranks)
        hint = Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, num_ranks, num_experts)
        assert regions.num_bytes <= hint, (max_tokens, hidden, num_experts, num_ranks)
        # Regions do not overlap and every signal word is 8-byte aligned.
        assert regions.barrier + 8 * num_ranks <= regions.signals0
        assert (
            regions.signals0 % 16 == 0
            and regions.recv0 == regions.signals(1) + regions.signals_stride
        )
        assert regions.send0 == regions.recv(1) + regions.recv_stride


def test_slots_are_16_byte_aligned_when_hidden_is_a_multiple_of_512():
    for hidden in (512, 1024, 7168):
        assert LowLatencyRegions(128, hidden, 288, 2).slot_bytes % 16 == 0
