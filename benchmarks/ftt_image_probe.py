"""Short Adam runs of the output-core FTT on a CIFAR-10 subset, one per JSON spec of
``FunctionalTT`` options (plus ``tag``, ``steps``, ``lr``, ``bs``): the training loss, the loss on
200 fixed (x_t, t, ε) triples, the skip's own loss on them, and the raw TT output's spread.

    OMP_NUM_THREADS=1 python benchmarks/ftt_image_probe.py --data-dir ../shared/data \
        '{"tag": "no skip", "skip": "none", "steps": 60}' \
        '{"tag": "diag skip, scale 0.02", "skip": "gaussian", "steps": 80, "core_lr_scale": 0.02}'

Used for the "FTT on images" diagnosis (docs/studies/ftt_images.md): why training collapsed,
which lr scale.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from datamodules.cifar import CIFARDataModule
from lightning_modules.diffusion.schedules import NoiseSchedule
from lightning_modules.diffusion.steppers import make_stepper
from lightning_modules.tt.ftt import FunctionalTT


def probe(x, schedule, tag, steps=150, lr=2e-3, bs=64, **options) -> dict:
    net = FunctionalTT(
        data_shape=tuple(x.shape[1:]),
        timesteps=schedule.timesteps,
        output="core",
        data_bounds=(x.amin(0), x.amax(0)),
        alpha_bar=schedule.alpha_bar,
        train_data=x,
        **options,
    )
    stepper = make_stepper("adam", net, lr=lr, weight_decay=0.0, grad_clip=1.0)
    g, g_data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (bs,), generator=g_data)]
        losses.append(
            stepper.step(lambda b=batch: schedule.training_triple(b, g), lambda v: v)["loss"]
        )
    g_eval = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x_t, t, eps = schedule.training_triple(x[:100].repeat(2, 1, 1, 1), g_eval)
        fixed = float(((net(x_t, t) - eps) ** 2).mean())
        skip_only = float("nan")
        if net.skip is not None:
            pred, _ = net.skip(x_t.reshape(len(x_t), -1), t)
            skip_only = float(((pred.reshape(eps.shape) - eps) ** 2).mean())
        raw = net.evaluate(x_t, t)
    return {
        "tag": tag,
        "first": losses[:3],
        "last20": sum(losses[-20:]) / 20,
        "fixed_loss": fixed,
        "skip_only_loss": skip_only,
        "raw_std": float(raw.std()),
        "gain": float(net.out_gain.detach()) if net.skip is not None else None,
        "s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="JSON objects of options")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--per-class", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dm = CIFARDataModule(
        data_dir=args.data_dir,
        download=False,
        train_per_class=args.per_class,
        cache_dir=args.cache_dir,
    )
    dm.prepare_data()
    dm.setup()
    x = dm.transform.inverse(dm.train_x).clamp(0, 1) * 2 - 1
    schedule = NoiseSchedule.from_config("linear", 1000)
    for spec in args.specs:
        print(json.dumps(probe(x, schedule, **json.loads(spec))), flush=True)


if __name__ == "__main__":
    main()
