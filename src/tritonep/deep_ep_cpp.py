"""Stand-in for V1's compiled extension module `deep_ep_cpp` (reference §1.1).

V1 code imports a few names from it directly; `as_deep_ep()` also registers this module as
`deep_ep_cpp`. `is_sm90_compiled` lives in `tritonep._device` so `Buffer` shares it.
"""

# The package defines `topk_idx_t` before importing its submodules, and importing this module
# directly first runs the package `__init__`, so this import never sees a half-built package.
from . import topk_idx_t
from ._device import is_sm90_compiled
from .config import Config, get_low_latency_rdma_size_hint
from .event import EventHandle

__all__ = [
    "Config",
    "EventHandle",
    "topk_idx_t",
    "get_low_latency_rdma_size_hint",
    "is_sm90_compiled",
]
