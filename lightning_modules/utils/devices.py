"""The one device rule of the plain loops (teacher, coreset, evaluate; the Trainer has its own),
and peak-memory readings per device."""

from __future__ import annotations

import resource

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
        raise UserError(
            f"device {accelerator!r} asked for but CUDA is not available; use auto or cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            f"device {accelerator!r} asked for but MPS is not available; use auto or cpu"
        )
    return device


def reset_peak_memory(device: torch.device) -> float:
    """Reset CUDA's peak counter; returns the CPU process's peak resident set so far (MB)."""
    if device.type == "cuda":
        torch.cuda.init()  # the peak counters cannot be reset before CUDA is initialised
        torch.cuda.reset_peak_memory_stats(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: torch.device) -> tuple[float, str]:
    """CUDA: max allocated since the reset; CPU: the process's peak resident set (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
