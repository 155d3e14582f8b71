"""Whether an autocast region is active, and in which dtype, across torch versions.

``torch.is_autocast_enabled()`` without an argument answers for CUDA only, and
torch < 2.4 has per-device functions instead of the ``device_type`` argument.
"""

from __future__ import annotations

import torch


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """``(enabled, dtype)`` of the autocast region for ``device_type`` here."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def autocast_active(device: torch.device) -> bool:
    """Whether an autocast region is active for ``device``'s type."""
    return autocast_state(device.type)[0]
