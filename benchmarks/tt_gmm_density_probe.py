"""How fast does Adam bring the density-form FTT to the exact noise predictor? (``dataset=gmm``)

Trains ``DensityTT`` (``eps_net.param=density``) by Adam on the DDPM loss (batch 256, gradient
norm clipped to 1, as ``task=ddpm``) and reports the excess over the exact predictor
``E‖ε_θ − ε*‖²`` per coordinate on 4,096 held-out (x_t, t) pairs of the reference sample,
overall and by noise level, at step 0 (the initialisation alone) and every quarter of the run.
Each spec is ``bumps:rank:init:init_noise:steps:lr`` (``init`` auto | identity; ``lr`` is the
step of every parameter, i.e. ``ddpm.lr × eps_net.core_lr_scale``).

    python benchmarks/tt_gmm_density_probe.py --dim 10 --components 4 \\
        32:8:identity:0.01:1000:2e-3 32:8:auto:0.1:1000:2e-3 32:8:auto:0.1:1000:1e-2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.gmm import GaussianMixtureDataModule  # noqa: E402
from lightning_modules.diffusion.schedules import NoiseSchedule  # noqa: E402
from lightning_modules.tt.density import DensityTT  # noqa: E402


def probe(dm, alpha_bar, spec: str, test=4096, seed=0) -> list[dict]:
    bumps, rank, init, noise, steps, lr = spec.split(":")
    x, dim = dm.train_x, dm.train_x.shape[1]
    g = torch.Generator().manual_seed(seed + 5)
    t_test = torch.randint(0, len(alpha_bar), (test,), generator=g)
    x0 = dm.reference_x[torch.randint(0, len(dm.reference_x), (test,), generator=g)]
    a = alpha_bar[t_test][:, None].float().sqrt()
    x_test = a * x0 + (1 - a * a).sqrt() * torch.randn(test, dim, generator=g)
    star = dm.exact_eps(alpha_bar)(x_test, t_test).float()
    net = DensityTT(
        data_shape=(dim,), timesteps=len(alpha_bar), data_bounds=(x.amin(0), x.amax(0)),
        num_basis=int(bumps), rank=int(rank), init=init, init_noise=float(noise), seed=seed,
        alpha_bar=alpha_bar, train_data=x, core_lr_scale=1.0,
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=float(lr))
    g = torch.Generator().manual_seed(seed)
    rows, start, steps = [], time.perf_counter(), int(steps)

    def report(step: int) -> None:
        with torch.no_grad():
            excess = ((net(x_test, t_test) - star) ** 2).mean(1)
        bands = {"t<100": t_test < 100, "100-500": (t_test >= 100) & (t_test < 500)}
        bands["t>=500"] = t_test >= 500
        row = {"spec": spec, "step": step, "excess": float(excess.mean())}
        row.update({k: float(excess[m].mean()) for k, m in bands.items()})
        row.update(params=net.num_parameters(), seconds=time.perf_counter() - start)
        rows.append(row)
        print(
            f"{spec} step {step}: excess {row['excess']:.4f} (t<100 {row['t<100']:.4f}, "
            f"100-500 {row['100-500']:.4f}, >=500 {row['t>=500']:.4f}), "
            f"{row['params']:,} params, {row['seconds']:.0f} s",
            flush=True,
        )

    report(0)  # the initialisation alone (init=auto: the k-means start)
    for i in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=g)
        t = torch.randint(0, len(alpha_bar), (256,), generator=g)
        eps = torch.randn(256, dim, generator=g)
        a = alpha_bar[t][:, None].float().sqrt()
        loss = ((net(a * x[idx] + (1 - a * a).sqrt() * eps, t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if (i + 1) % max(1, steps // 4) == 0:
            report(i + 1)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("specs", nargs="+")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dm = GaussianMixtureDataModule(dim=args.dim, components=args.components, seed=args.seed)
    dm.setup()
    alpha_bar = NoiseSchedule.from_config("linear", 1000, 1e-4, 0.02).alpha_bar
    return [row for spec in args.specs for row in probe(dm, alpha_bar, spec, seed=args.seed)]


if __name__ == "__main__":
    main()
