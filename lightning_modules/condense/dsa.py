"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) in plain torch.

One group of the strategy (``color_crop_cutout_flip_scale_rotate`` splits into six) is drawn per
call and applied to the whole batch, with parameters drawn per sample (MTT) or once per batch and
shared between two batches (siamese mode of DC/DSA). Every op is differentiable with respect to
the pixels, so distillation can back-propagate through it into synthetic images. All randomness
comes from an explicit ``torch.Generator``: saving ``generator.get_state()`` before a call and
restoring it replays the same draw.

>>> dsa = DSA("color_crop_cutout_flip_scale_rotate")
>>> g = torch.Generator().manual_seed(0)
>>> y = dsa(x, g)                                      # per-sample parameters
>>> p = dsa.draw(len(x), g, per_sample=False)          # siamese: one draw, two batches
>>> y_real, y_syn = dsa.apply(x_real, p), dsa.apply(x_syn, p)

Parameters (defaults follow the DSA/MTT reference, see REFERENCE.md section A):
scale U[1/1.2, 1.2] per axis; rotate U[-15°, 15°]; flip with p 0.5; brightness + U[-0.5, 0.5);
saturation (x - channel mean)·U[0, 2) + mean; contrast (x - image mean)·U[0.5, 1.5) + mean;
crop: integer shift in [-4, 4] px at 32 px (0.125 of the size), zeros shifted in; cutout: a
16x16 zero square at 32 px (0.5 of the size) with its centre uniform over the image, clipped.
No clamping: inputs are normalised or ZCA-whitened, not in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.errors import UserError

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"

#: the random numbers each group draws; all are U[0, 1) and mapped to ranges in ``apply``
GROUP_DRAWS = {
    "color": ("brightness", "saturation", "contrast"),
    "brightness": ("brightness",),
    "saturation": ("saturation",),
    "contrast": ("contrast",),
    "crop": ("shift_x", "shift_y"),
    "cutout": ("centre_x", "centre_y"),
    "flip": ("flip",),
    "scale": ("scale_x", "scale_y"),
    "rotate": ("angle",),
}

#: range parameters and their reference values (``DSA(strategy, **ranges)`` overrides them)
DEFAULT_RANGES = {
    "scale": 1.2,  # factors in [1/scale, scale], x and y independently
    "rotate": 15.0,  # degrees, angle in [-rotate, rotate]
    "flip": 0.5,  # probability of a horizontal flip
    "brightness": 1.0,  # added offset in [-brightness/2, brightness/2)
    "saturation": 2.0,  # factor in [0, saturation)
    "contrast": 0.5,  # factor in [1 - contrast, 1 + contrast)
    "crop": 0.125,  # largest shift as a fraction of the image size (4 px at 32 px)
    "cutout": 0.5,  # side of the zeroed square as a fraction of the size (16 px at 32 px)
}

_IDENTITY = ("", "none")


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """The groups of an underscore-separated strategy; ``""``/``"none"``/``None`` give none."""
    if strategy is None or str(strategy).strip().lower() in _IDENTITY:
        return ()
    groups = tuple(s for s in str(strategy).strip().lower().split("_") if s)
    unknown = [g for g in groups if g not in GROUP_DRAWS]
    if unknown:
        raise UserError(
            f"unknown DSA group(s) {unknown} in strategy {strategy!r}; use groups from "
            f"{', '.join(GROUP_DRAWS)} joined by '_' (e.g. {DEFAULT_STRATEGY}), or 'none'"
        )
    return groups


@dataclass
class DSAParams:
    """One draw: the chosen group and its U[0, 1) numbers, ``[batch]`` or ``[1]`` (shared)."""

    group: str
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    per_sample: bool = True

    @property
    def size(self) -> int | None:
        return len(next(iter(self.values.values()))) if self.values else None

    def to(self, device) -> DSAParams:
        return DSAParams(
            self.group, {k: v.to(device) for k, v in self.values.items()}, self.per_sample
        )


class DSA:
    """Differentiable Siamese Augmentation with an explicit generator.

    Args:
        strategy: groups joined by ``_``; one is chosen uniformly per call. ``""`` or ``"none"``
            is the identity.
        **ranges: overrides of ``DEFAULT_RANGES`` (``scale``, ``rotate``, ``flip``,
            ``brightness``, ``saturation``, ``contrast``, ``crop``, ``cutout``).
    """

    def __init__(self, strategy: str | None = DEFAULT_STRATEGY, **ranges: float):
        unknown = sorted(set(ranges) - set(DEFAULT_RANGES))
        if unknown:
            raise UserError(f"unknown DSA range(s) {unknown}; valid: {', '.join(DEFAULT_RANGES)}")
        self.strategy = "none" if strategy is None else str(strategy)
        self.groups = parse_strategy(strategy)
        self.ranges = {**DEFAULT_RANGES, **{k: float(v) for k, v in ranges.items()}}

    @property
    def is_identity(self) -> bool:
        return not self.groups

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r})"

    # -- randomness ---------------------------------------------------------------------------
    def draw(
        self, batch: int, generator: torch.Generator, per_sample: bool = True, device=None
    ) -> DSAParams:
        """Choose one group and draw its parameters: ``batch`` values each, or one if shared."""
        if not self.groups:
            return DSAParams("none", {}, per_sample)
        gen_device = generator.device
        if len(self.groups) == 1:
            group = self.groups[0]
        else:
            pick = torch.randint(len(self.groups), (1,), generator=generator, device=gen_device)
            group = self.groups[int(pick)]
        n = batch if per_sample else 1
        names = GROUP_DRAWS[group]
        draws = to_device(torch.rand(len(names), n, generator=generator, device=gen_device), device)
        return DSAParams(group, dict(zip(names, draws)), per_sample)

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator, per_sample: bool = True
    ) -> torch.Tensor:
        """Draw and apply in one go (per-sample parameters by default)."""
        if not self.groups:
            return x
        return self.apply(x, self.draw(len(x), generator, per_sample, device=x.device))

    # -- the ops ------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Augment ``x`` [N, C, H, W] with ``params``; differentiable in ``x``."""
        if params.group == "none":
            return x
        if x.dim() != 4:
            raise ValueError(f"DSA expects images [N, C, H, W], got shape {tuple(x.shape)}")
        size = params.size
        if params.per_sample and size != len(x):
            raise ValueError(
                f"DSA parameters were drawn for {size} samples, the batch has {len(x)}"
            )
        v = {
            k: t.to(device=x.device, dtype=x.dtype if t.is_floating_point() else t.dtype)
            for k, t in params.values.items()
        }
        r = self.ranges
        g = params.group
        if g in ("color", "brightness", "saturation", "contrast"):
            if g in ("color", "brightness"):
                x = x + _b(v["brightness"] - 0.5) * r["brightness"]
            if g in ("color", "saturation"):
                mean = x.mean(dim=1, keepdim=True)
                x = (x - mean) * _b(v["saturation"] * r["saturation"]) + mean
            if g in ("color", "contrast"):
                mean = x.mean(dim=(1, 2, 3), keepdim=True)
                x = (x - mean) * _b(
                    1.0 - r["contrast"] + 2.0 * r["contrast"] * v["contrast"]
                ) + mean
            return x
        if g == "flip":
            flip = _b(v["flip"] < r["flip"]).expand(len(x), 1, 1, 1)
            return torch.where(flip, x.flip(3), x)
        if g == "crop":
            return _shift(x, v["shift_x"], v["shift_y"], r["crop"])
        if g == "cutout":
            return _cutout(x, v["centre_x"], v["centre_y"], r["cutout"])
        if g == "scale":
            lo, hi = 1.0 / r["scale"], r["scale"]
            sx, sy = lo + (hi - lo) * v["scale_x"], lo + (hi - lo) * v["scale_y"]
            zero = torch.zeros_like(sx)
            theta = torch.stack(
                [torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)], 1
            )
            return _warp(x, theta)
        if g == "rotate":
            angle = (2.0 * v["angle"] - 1.0) * math.radians(r["rotate"])
            cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
            theta = torch.stack(
                [torch.stack([cos, sin, zero], -1), torch.stack([-sin, cos, zero], -1)], 1
            )
            return _warp(x, theta)
        raise ValueError(f"unknown DSA group {g!r}")


def make_dsa(strategy: str | None) -> DSA | None:
    """``DSA(strategy)``, or None when augmentation is off (None, ``""`` or ``"none"``)."""
    if strategy is None or str(strategy).lower() in ("", "none"):
        return None
    return DSA(strategy)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Move a small CPU draw to ``device`` without a stream sync (pinned, non-blocking) on CUDA."""
    device = torch.device(device) if device is not None else t.device
    if device == t.device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _b(v: torch.Tensor) -> torch.Tensor:
    """A per-sample (or shared, length 1) vector shaped to broadcast over [N, C, H, W]."""
    return v.view(-1, 1, 1, 1)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Affine resampling (bilinear, zeros outside) as in the DSA reference (align_corners)."""
    theta = theta.to(x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _shift(x: torch.Tensor, u_x: torch.Tensor, u_y: torch.Tensor, ratio: float) -> torch.Tensor:
    """Translate every image by an integer shift, zeros shifted in (one gather, no loop)."""
    n, c, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = ((u_y * (2 * sh + 1)).floor().long() - sh).expand(n)
    dx = ((u_x * (2 * sw + 1)).floor().long() - sw).expand(n)
    padded = F.pad(x, (sw, sw, sh, sh))
    rows = torch.arange(h, device=x.device)[None, :] + (dy + sh)[:, None]  # [N, H] in padded rows
    cols = torch.arange(w, device=x.device)[None, :] + (dx + sw)[:, None]  # [N, W]
    index = (
        (rows[:, :, None] * (w + 2 * sw) + cols[:, None, :])
        .reshape(n, 1, h * w)
        .expand(n, c, h * w)
    )
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


def _cutout(x: torch.Tensor, u_x: torch.Tensor, u_y: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero a square of side ``ratio``·size whose centre is uniform over the image, clipped."""
    n, _, h, w = x.shape
    side_h, side_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # centres are integers in [0, size]: the square [c - side/2, c + side/2) may hang over an edge
    top = (u_y * (h + 1)).floor().long() - side_h // 2
    left = (u_x * (w + 1)).floor().long() - side_w // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side_h)  # [n, H]
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side_w)  # [n, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


class DSAAugment(nn.Module):
    """DSA as a batch augmentation that owns its generator (e.g. ClassifierModule's ``augment``).

    The generator state travels in the module's ``state_dict`` (extra state), so a checkpointed
    run resumes with the same augmentation stream.

    Args:
        strategy: DSA strategy string; ``"none"`` makes this the identity.
        seed: seeds the private generator (derive it from ``cfg.seed``).
        per_sample: per-sample parameters (MTT) or one draw per batch.
        **ranges: overrides of the DSA ranges.
    """

    def __init__(
        self,
        strategy: str | None = DEFAULT_STRATEGY,
        seed: int = 0,
        per_sample: bool = True,
        **ranges,
    ):
        super().__init__()
        self.dsa = DSA(strategy, **ranges)
        self.per_sample = per_sample
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dsa(x, self.generator, per_sample=self.per_sample)

    def extra_repr(self) -> str:
        return f"strategy={self.dsa.strategy!r}, per_sample={self.per_sample}"

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        if state and "generator" in state:
            self.generator.set_state(state["generator"])
