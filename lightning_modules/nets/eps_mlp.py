"""ResNet-like MLP noise model ε_θ(x_t, t) for vector data (the draft's eq. 6).

Eq. 6: x' = x_t + posenc(t); z_0 = A1 x' (expand to ``width``); L blocks
u = B2 σ(B1 z), z = LayerNorm(u) (here with a skip, z = LayerNorm(z + u), unless
``residual=false``); output A2 z_L. The authors' baseline code instead adds a time embedding to
the hidden state inside every block (``time_in_blocks=true``, the default): in 2-D the eq. 6
encoding posenc(t) = (sin t, cos t) cannot tell many time steps apart.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from lightning_modules.errors import UserError
from lightning_modules.nets.time_embedding import sinusoidal_embedding

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def linear_flops(module: nn.Module) -> int:
    """2 · in · out per ``nn.Linear`` (each applied once per sample); elementwise ops omitted."""
    return sum(
        2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)
    )


class ResidualBlock(nn.Module):
    """u = B2 σ(B1 (z + e_t)); z ← LayerNorm(z + u) (or LayerNorm(u) without the skip)."""

    def __init__(
        self, width: int, hidden: int, activation: str, time_dim: int | None, residual: bool
    ):
        super().__init__()
        self.b1 = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.b2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self.time = nn.Linear(time_dim, width) if time_dim else None
        self.residual = residual

    def forward(self, z: Tensor, temb: Tensor | None) -> Tensor:
        h = z + self.time(temb) if self.time is not None else z
        u = self.b2(self.act(self.b1(h)))
        return self.norm(z + u if self.residual else u)


class ResNetMLP(nn.Module):
    """ε_θ(x_t, t) for data of any shape, flattened to D coordinates.

    Args:
        data_shape: shape of one sample, e.g. ``(2,)``.
        timesteps: T (the time index t is in ``0..T-1``).
        data_bounds: accepted for the common eps-net signature; unused.
        width: hidden width D1 after the expansion A1.
        depth: number of blocks L.
        hidden: inner width of a block (default ``width``).
        activation: silu | relu | gelu | tanh.
        time_in_blocks: add a learned time embedding in every block (authors' baseline code);
            false = eq. 6 literally, posenc(t) of width D added to x_t.
        time_dim: width of the sinusoidal features behind the block time embedding.
        residual: skip connection around every block.
        name: the config's name (ignored).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...] = (2,),
        timesteps: int = 1000,
        data_bounds=None,
        width: int = 64,
        depth: int = 3,
        hidden: int | None = None,
        activation: str = "silu",
        time_in_blocks: bool = True,
        time_dim: int = 64,
        residual: bool = True,
        name: str = "resnet",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"eps_net.activation={activation!r}: use one of {sorted(ACTIVATIONS)}")
        if width < 1 or depth < 0:
            raise UserError(
                f"eps_net.width={width}, eps_net.depth={depth}: need width >= 1, depth >= 0"
            )
        self.data_shape = tuple(data_shape)
        self.dim = math.prod(self.data_shape)
        self.timesteps = timesteps
        self.time_in_blocks = time_in_blocks
        self.time_dim = time_dim
        self.expand = nn.Linear(self.dim, width)
        if time_in_blocks:
            self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), ACTIVATIONS[activation]())
        blocks_time = width if time_in_blocks else None
        self.blocks = nn.ModuleList(
            ResidualBlock(width, hidden or width, activation, blocks_time, residual)
            for _ in range(depth)
        )
        self.contract = nn.Linear(width, self.dim)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        x = x_t.reshape(len(x_t), self.dim)
        temb = None
        if self.time_in_blocks:
            temb = self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(x))
        else:
            x = x + sinusoidal_embedding(t, self.dim).to(x)  # eq. 6: x' = x_t + posenc(t)
        z = self.expand(x)
        for block in self.blocks:
            z = block(z, temb)
        return self.contract(z).view(x_t.shape)

    def flops_per_sample(self) -> int:
        return linear_flops(self)
