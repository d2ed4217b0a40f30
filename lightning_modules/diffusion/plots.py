"""Pictures of a DDPM run, written as PNG (matplotlib, Agg backend) atomically.

Vector data: samples over the real data (2-D scatter; D >= 3 as pairwise projections), the
reverse process as a row of scatters. Images: sample grids and a grid of the reverse process.
Both: the loss curve.
"""

from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG through a temporary file and a rename (never a half-written PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def coordinate_pairs(dim: int, max_coords: int = 4) -> list[tuple[int, int]]:
    """Which coordinate pairs to draw: (0, 1) in 2-D, all pairs of the first 4 otherwise."""
    if dim < 2:
        return [(0, 0)]
    return list(combinations(range(min(dim, max_coords)), 2))


def _np(x: Tensor) -> np.ndarray:
    return torch.as_tensor(x).detach().float().cpu().numpy()


def _scatter(ax, x: np.ndarray, i: int, j: int, **kw):
    # 1-D data: plot against a jitter-free zero line
    ax.scatter(x[:, i], x[:, j] if j != i else np.zeros(len(x)), s=2, linewidths=0, **kw)


def scatter_samples(samples: Tensor, data: Tensor, path: str | Path, title: str = "") -> Path:
    """Generated samples (orange) over real data (grey); one panel per coordinate pair."""
    s, d = _np(samples), _np(data)
    pairs = coordinate_pairs(s.shape[1])
    fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 4), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        _scatter(ax, d, i, j, c="0.6", alpha=0.4, label="data")
        _scatter(ax, s, i, j, c="tab:orange", alpha=0.6, label="samples")
        ax.set_xlabel(f"x{i}")
        ax.set_ylabel(f"x{j}")
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][0].legend(loc="upper right", markerscale=4)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def reverse_process_scatter(
    snapshots, path: str | Path, data: Tensor | None = None, pair=(0, 1)
) -> Path:
    """One scatter per snapshot of the reverse chain (pure noise → output), coordinates ``pair``."""
    i, j = pair
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3 * len(snapshots), 3), squeeze=False)
    lim = None
    if data is not None:
        d = _np(data)
        lim = np.abs(d).max() * 1.3
    for ax, snap in zip(axes[0], snapshots):
        if data is not None:
            _scatter(ax, d, i, j, c="0.8", alpha=0.3)
        _scatter(ax, _np(snap.x), i, j, c="tab:blue", alpha=0.6)
        ax.set_title(f"t = {snap.step}")
        if lim is not None:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def loss_curve(steps, losses, path: str | Path, title: str = "training loss") -> Path:
    """Per-step loss (light) with a moving average (dark), log-scaled y."""
    steps, losses = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(losses):
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        w = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color="tab:blue", linewidth=1.5, label=f"mean of {w}")
        if (losses > 0).all():
            ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    return save_figure(fig, path)


def image_grid_array(images: Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """[N, C, H, W] images in [0, 1] as one H x W x 3 array (white padding)."""
    x = torch.as_tensor(images).detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = np.ones((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for k in range(n):
        r, col = divmod(k, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = x[k, :3].permute(1, 2, 0).numpy()
    return grid


def image_grid(images: Tensor, path: str | Path, nrow: int = 8, title: str = "") -> Path:
    """Save images in [0, 1] as a grid PNG."""
    grid = image_grid_array(images, nrow=nrow)
    scale = 0.035
    fig, ax = plt.subplots(
        figsize=(max(2.0, grid.shape[1] * scale), max(2.0, grid.shape[0] * scale))
    )
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def reverse_process_images(snapshots, path: str | Path, to_unit=lambda x: (x + 1) / 2) -> Path:
    """One column per snapshot of the reverse chain, one row per sample."""
    cols = [to_unit(s.x) for s in snapshots]
    n = len(cols[0])
    stacked = torch.stack(cols, dim=1).reshape(n * len(cols), *cols[0].shape[1:])
    grid = image_grid_array(stacked, nrow=len(cols))
    fig, ax = plt.subplots(
        figsize=(max(2.0, grid.shape[1] * 0.035), max(2.0, grid.shape[0] * 0.035))
    )
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([2 + (i + 0.5) * (cols[0].shape[-1] + 2) for i in range(len(cols))])
    ax.set_xticklabels([f"t={s.step}" for s in snapshots], fontsize=7)
    ax.set_yticks([])
    return save_figure(fig, path)


def sample_pictures(samples, snaps, out_dir, *, view, reference=None, tag: str = "") -> list:
    """The run's pictures of a sample: an image grid (+ reverse process) when ``reference`` is
    None, else a scatter against the reference (+ the reverse process); ``view`` maps model
    space to what is drawn."""
    from pathlib import Path

    from lightning_modules.diffusion.schedules import Snapshot

    out_dir = Path(out_dir)
    title = tag.strip("_")
    if reference is None:
        paths = [image_grid(view(samples[:64]), out_dir / f"samples_grid{tag}.png", title=title)]
        if snaps:
            paths.append(
                reverse_process_images(snaps, out_dir / "reverse_process.png", to_unit=view)
            )
        return paths
    real = view(reference)
    paths = [
        scatter_samples(view(samples), real, out_dir / f"samples_scatter{tag}.png", title=title)
    ]
    if snaps:
        snaps = [Snapshot(step=s.step, x=view(s.x)) for s in snaps]
        pair = (0, 2) if samples.shape[1] == 3 else (0, min(1, samples.shape[1] - 1))
        paths.append(
            reverse_process_scatter(snaps, out_dir / "reverse_process.png", data=real, pair=pair)
        )
    return paths
