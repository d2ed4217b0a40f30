"""One figure of the 2-D suite's samples: a row per arm of finished ``tt_compare`` runs and a
first row of the held-out reference, a column per density, each panel titled with its mode
share. It reads the runs' ``samples.npy`` (data coordinates) and ``summary.json``; it trains
nothing::

    python benchmarks/tt_suite_samples.py --seed 0 --out docs/assets/results/tt_suite_samples.png \\
        --arm "Gaussian bumps, k-means start" /path/to/runs "FTT density + Adam" \\
        --arm "boxes, histogram start" benchmarks/results/tt_suite_boxes "FTT density, boxes + Adam"

An arm is ``LABEL FOLDER METHOD``: the ``--out`` folder of a ``tt_compare`` run and the method
whose runs to show (named as ``tt_compare`` names its run folders).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.tt_compare import _slug  # noqa: E402

SUITE = ["moons", "circles", "8gaussians", "checkerboard", "pinwheel", "2spirals", "swiss_roll"]


def run_dir(folder: Path, density: str, method: str, seed: int) -> Path:
    """The folder ``tt_compare`` gives the run (basis bspline, the FTT arms' default)."""
    return folder / f"{_slug(density)}_{_slug(method)}_bspline_seed{seed}"


def reference(run: Path) -> np.ndarray:
    """The run's held-out reference sample in data coordinates (its own datamodule, rebuilt
    from its resolved config)."""
    import hydra
    import torch
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config_resolved.yaml")
    data = hydra.utils.instantiate(cfg.dataset)
    data.setup()
    with torch.no_grad():
        return data.to_data_space(data.reference_x).numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", nargs=3, action="append", required=True,
                        metavar=("LABEL", "FOLDER", "METHOD"))  # fmt: skip
    parser.add_argument("--datasets", nargs="+", default=SUITE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(args.arm) + 1, len(args.datasets)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for j, density in enumerate(args.datasets):
        runs = [run_dir(Path(f), density, m, args.seed) for _, f, m in args.arm]
        missing = [str(r) for r in runs if not (r / "samples.npy").exists()]
        if missing:
            sys.exit(f"no finished run at {missing[0]}")
        ref = reference(runs[0])
        oracle = json.loads((runs[0] / "summary.json").read_text()).get("mode_share_oracle")
        panels = [("held-out data", ref, f"exact predictor {100 * oracle:.1f} %")]
        for (label, _, _), run in zip(args.arm, runs):
            share = json.loads((run / "summary.json").read_text())["mode_share"]
            panels.append((label, np.load(run / "samples.npy"), f"{100 * share:.1f} %"))
        lo, hi = ref.min(0), ref.max(0)
        pad = 0.15 * (hi - lo)
        for i, (label, x, title) in enumerate(panels):
            ax = axes[i, j]
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.5, color="black" if i == 0 else "C0")
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{density}: {title}" if i == 0 else title, fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"2-D suite, seed {args.seed}: samples and mode share (50-step chain)", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
