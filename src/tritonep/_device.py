"""Device queries shared by `Buffer` and `deep_ep_cpp` (reference §1.2, §6.1).

Nothing here runs at import time: `import tritonep` must not touch the CUDA driver.
"""

import torch

from . import _env


def cuda_available() -> bool:
    """True when this process can use CUDA.

    `is_initialized()` is a flag read; `is_available()` asks the driver. Checking the flag first
    keeps the per-call host cost of event creation low once CUDA is up.
    """
    return torch.cuda.is_initialized() or torch.cuda.is_available()


def is_sm90_compiled() -> bool:
    """True iff FP8 / Hopper-class paths are usable: CUDA present, current device capability >= 9.0.

    False without CUDA and when `TRITONEP_BACKEND=cpu` (V1 tests then skip FP8 inputs, reference
    §1.2). Never raises on a machine without CUDA; on a CUDA machine an invalid `TRITONEP_BACKEND`
    raises `EPInvalidArgument`, as Buffer construction would.
    """
    if not cuda_available():
        return False
    if _env.backend() == "cpu":
        return False
    try:
        return torch.cuda.get_device_capability() >= (9, 0)
    except (RuntimeError, AssertionError):  # broken driver or no visible device: no FP8 paths
        return False
