"""The one device rule of the plain loops (teacher, coreset, evaluate; the Trainer has its own)."""

from __future__ import annotations

import torch

from lightning_modules.errors import UserError


def resolve_device(accelerator: str | None = "auto") -> torch.device:
    """The torch device for Lightning's ``trainer.accelerator`` values (or a torch device string).

    ``auto`` (or None): CUDA when available, else CPU. ``cpu``: CPU. ``gpu``/``cuda``: the
    current CUDA device, ``cuda:<i>``: that one. ``mps``: Apple's GPU. Asking for a device that
    is not there is a ``UserError`` (never a silent fallback to the CPU).
    """
    name = str(accelerator or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "gpu":
        name = "cuda"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"unknown device {accelerator!r}; use auto, cpu, gpu, cuda, cuda:<index> or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {accelerator!r} asked for but CUDA is not available; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {accelerator!r} asked for but MPS is not available; use auto or cpu")
    return device
