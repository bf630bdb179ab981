"""tritonep: DeepEP V1's expert-parallel communication API, every GPU kernel written in Triton.

`import tritonep as deep_ep` runs code written for DeepEP V1. Importing is cheap: no CUDA context,
no process group, no kernel compilation (kernel modules are imported when a Buffer first needs
them).

Shape glossary used across the package:
  R ranks, r this rank, N tokens of this rank, H hidden size, K top-k width, E experts,
  L = E // R local experts, C = num_sms // 2 channels, S scale columns, M received rows.
"""

import sys
import types

import torch

from . import _env
from .errors import EPError, EPInvalidArgument, EPStateError, EPTimeoutError, EPUnsupported

__version__ = "0.1.0"

topk_idx_t: torch.dtype = torch.int64 if _env.topk_idx_bits() == 64 else torch.int32

# Unit of the low-latency wait-cost statistics (reference §13.2): nanoseconds. The kernels read
# `%globaltimer` (the interpreter: a host clock), which counts ns, not SM clock cycles as V1 does.
WAIT_COST_UNIT = "ns"

from . import buffer, deep_ep_cpp, utils  # noqa: E402
from .buffer import Buffer  # noqa: E402
from .config import Config  # noqa: E402
from .event import EventHandle, EventOverlap  # noqa: E402


def as_deep_ep(force: bool = False, register_cpp: bool = True) -> types.ModuleType:
    """Register `deep_ep`, `deep_ep.buffer`, `deep_ep.utils` (and `deep_ep_cpp`) as aliases of
    tritonep.

    Raises `EPStateError` if a different module already holds one of those names (a real DeepEP is
    loaded), unless `force=True`. Idempotent. Returns the tritonep module.
    """
    this = sys.modules[__name__]
    aliases = {"deep_ep": this, "deep_ep.buffer": buffer, "deep_ep.utils": utils}
    if register_cpp:
        aliases["deep_ep_cpp"] = deep_ep_cpp
    if not force:
        for name, module in aliases.items():
            present = sys.modules.get(name)
            if present is not None and present is not module:
                raise EPStateError(
                    f"as_deep_ep: sys.modules[{name!r}] already holds {present!r}; pass force=True "
                    "to replace it"
                )
    sys.modules.update(aliases)
    return this


__all__ = [
    "Buffer",
    "Config",
    "EventHandle",
    "EventOverlap",
    "topk_idx_t",
    "__version__",
    "EPError",
    "EPInvalidArgument",
    "EPUnsupported",
    "EPStateError",
    "EPTimeoutError",
    "as_deep_ep",
    "WAIT_COST_UNIT",
]
