"""Intranode high-throughput kernels: `notify`, `dispatch`, `combine` over ring queues in NVL
memory."""
