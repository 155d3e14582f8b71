"""Mixed precision of a run: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast
and a GradScaler), in one object that the training step and the optimizer step use."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["Precision"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How one step computes: autocast region, loss scaling, optimizer step.

    Parameters
    ----------
    name : {"fp32", "bf16", "fp16"}
    device : torch.device

    Examples
    --------
    >>> import torch
    >>> p = Precision("bf16", torch.device("cpu"))
    >>> with p.autocast():
    ...     y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    >>> y.dtype
    torch.bfloat16
    """

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {name!r}")
        self.name, self.device = name, device
        self.dtype = DTYPES.get(name)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    @property
    def autocast_kwargs(self) -> dict[str, Any] | None:
        """``torch.autocast``'s arguments (for GradCache), or None in fp32."""
        return None if self.dtype is None else {"device_type": self.device.type, "dtype": self.dtype}

    def autocast(self):
        kw = self.autocast_kwargs
        return torch.autocast(**kw) if kw else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, through the scaler in fp16 (which skips steps with inf/NaN gradients)."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
