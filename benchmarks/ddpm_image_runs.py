"""Compare finished ``task=ddpm`` image runs: the loss of each saved noise model on one fixed set
of (x_t, t, ε) triples drawn from its run's training images, and the sample grids side by side.

The per-run ``final_loss`` of ``summary.json`` is a mean over the last training batches (noisy,
different batches per run); this scores every model on the same triples. With
``eps_net.skip=gaussian`` it also scores the skip alone (the FTT's gain set to 0).

    python benchmarks/ddpm_image_runs.py RUN_DIR [RUN_DIR ...] --labels ftt unet \
        --out docs/ddpm_images/ftt_vs_unet.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lightning_modules.diffusion.plots import image_grid_array, save_figure  # noqa: E402
from lightning_modules.diffusion.schedules import NoiseSchedule  # noqa: E402
from lightning_modules.tasks.ddpm import build_eps_net, load_data  # noqa: E402
from lightning_modules.utils.seeds import derive_seed  # noqa: E402


@torch.no_grad()
def fixed_loss(net, x0: torch.Tensor, schedule: NoiseSchedule, seed: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(derive_seed(seed, "ddpm_image_runs"))
    losses = []
    for _ in range(repeats):
        x_t, t, eps = schedule.training_triple(x0, g)
        losses.append(float(((net(x_t, t) - eps) ** 2).mean()))
    return sum(losses) / len(losses)


def score_run(run: Path, repeats: int) -> dict:
    cfg = OmegaConf.load(run / "config_resolved.yaml")
    d = cfg.ddpm
    data = load_data(cfg)
    schedule = NoiseSchedule.from_config(
        d.schedule, int(d.timesteps), float(d.beta_start), float(d.beta_end)
    )
    net = build_eps_net(cfg, data, schedule)
    net.load_state_dict(torch.load(run / "eps_net.pt", weights_only=False)["state_dict"])
    net.eval()
    summary = json.loads((run / "summary.json").read_text())
    out = {
        "run": str(run),
        "params": summary["params"],
        "train_s": round(summary["train_s"], 1),
        "sample_s": round(summary["sample_s"], 1),
        "steps": summary["steps"],
        "final_loss": round(summary["final_loss"], 4),
        "fixed_loss": round(fixed_loss(net, data.train, schedule, int(cfg.seed), repeats), 5),
    }
    if getattr(net, "skip", None) is not None:
        with torch.no_grad():
            net.out_gain.zero_()
        out["skip_only_loss"] = round(
            fixed_loss(net, data.train, schedule, int(cfg.seed), repeats), 5
        )
    samples = torch.load(run / "samples.pt", weights_only=False).float() / 255
    return out, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20, help="passes over the train images")
    parser.add_argument("--num", type=int, default=32, help="samples drawn per run")
    args = parser.parse_args()
    if len(args.labels) != len(args.runs):
        parser.error("one label per run")
    rows, grids = [], []
    for run, label in zip(args.runs, args.labels):
        row, samples = score_run(run, args.repeats)
        rows.append({"label": label, **row})
        grids.append(image_grid_array(samples[: args.num], nrow=8))
        print(json.dumps(rows[-1]), flush=True)
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids), 2.5))
    for ax, grid, row in zip(list(axes) if len(grids) > 1 else [axes], grids, rows):
        ax.imshow(grid, interpolation="nearest")
        ax.axis("off")
        ax.set_title(
            f"{row['label']}\nloss {row['fixed_loss']}, train {row['train_s']} s", fontsize=8
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
