"""What a model of the CIFAR PCA latent must capture to reach the floor band: samples built from
the training split with some structure kept and the rest destroyed, scored like a model's samples
(SW / Sinkhorn / MMD against the held-out reference, median of draws, beside the floor band).

    python benchmarks/pca_oracles.py --data-dir ../shared/data --dims 32 128

Rows (each draw is as large as the reference sample):
* train subset: the training distribution itself (a perfect model of the train split);
* spherical: uniform directions with the norms of training points (keeps only the radial law);
* random rotation: training points under a random orthogonal map (keeps the radial law and the
  dependence, loses the axes);
* independent marginals: each coordinate drawn from its own training values, independently (the
  best any model whose coordinates are independent can do; PCA latents are uncorrelated, so this
  is also the best Gaussian-copula model);
* Gaussian: the training mean and covariance (what a Gaussian / PCA skip samples);
* radial denoiser: a trained noise model of the form ``ε̂ = x_t · (σ_t + φ(log |x_t|², t))``
  (the unit-variance Gaussian skip plus a small MLP ``φ`` of the norm and time: 4,417
  parameters, 2,000 Adam steps), sampled by the project's ancestral chain at 200 and 1000 steps:
  what a model that captures the radial law and nothing else achieves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.cifar_pca import CIFARPCADataModule  # noqa: E402
from lightning_modules.diffusion.metrics import floor_bands, vector_sample_metrics  # noqa: E402
from lightning_modules.diffusion.schedules import NoiseSchedule  # noqa: E402


class RadialDenoiser(torch.nn.Module):
    """``ε̂ = x_t · (σ_t + φ(log mean(x_t²), t / T))`` for standardised data (module docstring)."""

    def __init__(self, schedule: NoiseSchedule, hidden: int = 64):
        super().__init__()
        self.register_buffer("sigma", (1 - schedule.alpha_bar).sqrt().float())
        self.timesteps = schedule.timesteps
        self.phi = torch.nn.Sequential(
            torch.nn.Linear(2, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        features = torch.stack([x_t.square().mean(1).log(), t.float() / self.timesteps], 1)
        return x_t * (self.sigma[t][:, None] + self.phi(features))


def radial_samples(train: torch.Tensor, n: int, steps_list, draws: int, seed: int) -> dict:
    """Train a :class:`RadialDenoiser` on ``train`` and sample ``draws`` x ``n`` per step count."""
    torch.manual_seed(seed)
    schedule = NoiseSchedule.from_config("linear", 1000)
    net = RadialDenoiser(schedule)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    x = train.float()
    for _ in range(2000):
        loss = schedule.loss(net, x[torch.randint(len(x), (256,), generator=g)], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    box = (x.min(0).values, x.max(0).values)  # the task's clip for vector data
    return {
        f"radial denoiser, {steps} ancestral steps": lambda steps=steps: [
            schedule.sample(net, n, (x.shape[1],), g, steps=steps, clip=box)[0].double()
            for _ in range(draws)
        ]
        for steps in steps_list
    }


def surrogates(train: torch.Tensor, n: int, g: torch.Generator) -> dict:
    """Name → a function drawing ``n`` surrogate samples from ``train [N, D]`` (float64)."""
    N, D = train.shape

    def subset():
        return train[torch.randperm(N, generator=g)[:n]]

    def spherical():
        norms = subset().norm(dim=1, keepdim=True)
        d = torch.randn(n, D, generator=g, dtype=train.dtype)
        return d / d.norm(dim=1, keepdim=True) * norms

    def rotation():
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=train.dtype))
        return subset() @ q

    def marginals():
        return torch.stack([train[torch.randint(N, (n,), generator=g), j] for j in range(D)], 1)

    chol = torch.linalg.cholesky(torch.cov(train.T))

    def gaussian():
        return torch.randn(n, D, generator=g, dtype=train.dtype) @ chol.T + train.mean(0)

    return {
        "train subset": subset,
        "spherical (train norms)": spherical,
        "random rotation of train": rotation,
        "independent marginals": marginals,
        "Gaussian (train covariance)": gaussian,
    }


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--cache-dir", default=str(ROOT / "cache"))
    parser.add_argument("--dims", type=int, nargs="+", default=[32])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lines = [
        f"## pca_oracles (CIFAR-10 PCA latent; median of {args.draws} draws [floor band 5-95 %]; "
        f"threads={torch.get_num_threads()})",
        "",
        "| dim | samples | SW [floor band] | Sinkhorn [floor band] | MMD [floor band] |",
        "|---|---|---|---|---|",
    ]
    for dim in args.dims:
        dm = CIFARPCADataModule(
            dim=dim, data_dir=args.data_dir, download=False, cache_dir=args.cache_dir
        )
        dm.setup()
        train, ref = dm.train_x.double(), dm.reference_x.double()
        floors = floor_bands(ref, train, len(ref), seed=args.seed)
        g = torch.Generator().manual_seed(args.seed)
        rows = {
            name: lambda draw=draw: [draw() for _ in range(args.draws)]
            for name, draw in surrogates(train, len(ref), g).items()
        }
        rows |= radial_samples(train, len(ref), (200, 1000), args.draws, args.seed)
        for name, draws in rows.items():
            start = time.perf_counter()
            m = vector_sample_metrics(draws(), ref, train, floors=floors, seed=args.seed)
            cells = [
                f"{m[k]:.4g} [{m[k + '_floor_lo']:.4g}, {m[k + '_floor_hi']:.4g}]"
                for k in ("sw", "sinkhorn", "mmd")
            ]
            lines.append(f"| {dim} | {name} | " + " | ".join(cells) + " |")
            spread = statistics.pstdev(m["sw_draws"]) if len(m["sw_draws"]) > 1 else 0.0
            print(f"d={dim} {name}: sw {m['sw']:.4f} (sd {spread:.4f}) "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
