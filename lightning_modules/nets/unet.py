"""The Ho et al. (2020) DDPM UNet for images, with a width that can be made CPU-sized.

Structure (the CIFAR-10 model of the paper, ``conf/eps_net/unet_ho.yaml``: ch 128,
multipliers 1-2-2-2, 2 residual blocks per level, self-attention at 16x16, dropout 0.1, about
35.7M parameters): a 3x3 stem; per level ``num_res_blocks`` residual blocks (GroupNorm, swish,
3x3 conv, plus a projection of the time embedding, GroupNorm, swish, dropout, 3x3 conv,
1x1 skip when channels change), self-attention after each block at the chosen resolutions,
a stride-2 conv between levels; a middle of block-attention-block; the mirrored up path with
skip concatenations, nearest upsampling + 3x3 conv; GroupNorm, swish, 3x3 conv out. The time
step enters as a sinusoidal embedding of width ch through a 2-layer MLP of width 4 ch. The
last conv of every residual block, attention projection and output conv start at zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.errors import UserError
from lightning_modules.nets.time_embedding import sinusoidal_embedding


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # the largest group count <= groups that divides the channels
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return x + self.proj(out.transpose(1, 2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ε_θ(x_t, t) for images ``[N, C, H, W]``.

    Args:
        data_shape: ``(C, H, W)``; H and W divisible by 2^(levels - 1).
        timesteps: T (accepted for the common eps-net signature).
        data_bounds: accepted for the common signature; unused.
        ch: base width (128 in Ho et al.).
        ch_mult: width multiplier per resolution level.
        num_res_blocks: residual blocks per level on the way down.
        attn_resolutions: spatial sizes (e.g. ``[16]``) that get self-attention.
        dropout: dropout inside residual blocks.
        norm_groups: GroupNorm groups (32 in Ho et al.; reduced to divide small widths).
        name: the config's name (ignored).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...] = (3, 32, 32),
        timesteps: int = 1000,
        data_bounds=None,
        ch: int = 16,
        ch_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (8,),
        dropout: float = 0.1,
        norm_groups: int = 8,
        name: str = "unet",
    ):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise UserError(
                f"eps_net=unet needs image data [C, H, W]; this dataset gives vectors of shape "
                f"{data_shape}: use eps_net=resnet or eps_net=ftt"
            )
        c_img, height, width = data_shape
        ch_mult = tuple(int(m) for m in ch_mult)
        factor = 2 ** (len(ch_mult) - 1)
        if height % factor or width % factor:
            raise UserError(
                f"eps_net=unet with {len(ch_mult)} levels needs H and W divisible by {factor}; "
                f"images are {height}x{width}: use fewer eps_net.ch_mult entries"
            )
        self.data_shape = data_shape
        self.ch = ch
        attn_resolutions = {int(r) for r in attn_resolutions}
        temb_dim = 4 * ch
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        self.conv_in = nn.Conv2d(c_img, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [ch]
        c, res = ch, height
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * mult, temb_dim, dropout, norm_groups))
                c = ch * mult
                if res in attn_resolutions:
                    self.down.append(AttnBlock(c, norm_groups))
                skip_channels.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(c))
                skip_channels.append(c)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, temb_dim, dropout, norm_groups),
                AttnBlock(c, norm_groups),
                ResBlock(c, c, temb_dim, dropout, norm_groups),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    ResBlock(c + skip_channels.pop(), ch * mult, temb_dim, dropout, norm_groups)
                )
                c = ch * mult
                if res in attn_resolutions:
                    self.up.append(AttnBlock(c, norm_groups))
            if level != 0:
                self.up.append(Upsample(c))
                res *= 2

        self.norm_out = _norm(c, norm_groups)
        self.conv_out = _zero(nn.Conv2d(c, c_img, 3, padding=1))
        self._flops: int | None = None

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        temb = self.time_mlp(sinusoidal_embedding(t, self.ch).to(x_t))
        h = self.conv_in(x_t)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, temb)
                skips.append(h)
            elif isinstance(layer, AttnBlock):
                h = layer(h)
                skips[-1] = h  # the skip is taken after the attention that follows a block
            else:
                h = layer(h)
                skips.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def flops_per_sample(self) -> int:
        """Forward FLOPs for one image, counted once by torch's FLOP counter (convs, matmuls)."""
        if self._flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            p = next(self.parameters())
            x = torch.zeros(1, *self.data_shape, device=p.device, dtype=p.dtype)
            t = torch.zeros(1, dtype=torch.long, device=p.device)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                self(x, t)
            self._flops = int(counter.get_total_flops())
        return self._flops
