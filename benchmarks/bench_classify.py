"""Classifier training throughput and ZCA fitting time; prints a markdown table.

python benchmarks/bench_classify.py                      # CPU, defaults
python benchmarks/bench_classify.py --device cuda --steps 50
python benchmarks/bench_classify.py --data-dir ../shared/data   # ZCA on the real train split
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.transforms import PixelTransform  # noqa: E402
from lightning_modules.nets import build_classifier  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_throughput(
    device: str, batch: int, steps: int, warmup: int, width: int, depth: int
) -> float:
    """Images per second of SGD steps (forward, backward, update) on ConvNet-depth."""
    g = torch.Generator().manual_seed(0)
    net = build_classifier("convnet", depth=depth, width=width).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def zca_fit_seconds(images01: torch.Tensor) -> float:
    start = time.perf_counter()
    PixelTransform.fit_zca(images01, eps=0.1)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--zca-images", type=int, default=50000)
    p.add_argument("--data-dir", default=None, help="use the real CIFAR-10 train split for ZCA")
    args = p.parse_args()

    ips = train_throughput(args.device, args.batch, args.steps, args.warmup, args.width, args.depth)
    if args.data_dir:
        from datamodules.cifar import read_cifar

        images, _ = read_cifar("cifar10", args.data_dir, "train")
        images = images[: args.zca_images]
        source = "CIFAR-10 train"
    else:
        images = torch.randint(
            0,
            256,
            (args.zca_images, 3, 32, 32),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(0),
        )
        source = "random uint8"
    zca_s = zca_fit_seconds(images.float() / 255)

    name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    threads = torch.get_num_threads()
    print(f"device: {args.device} ({name}), torch {torch.__version__}, threads {threads}")
    print()
    print("| measurement | setting | value |")
    print("|---|---|---|")
    net = f"ConvNet-{args.depth} (width {args.width})"
    setting = f"batch {args.batch}, {args.steps} steps"
    print(f"| {net} training throughput | {setting} | {ips:,.0f} images/s |")
    zca = f"{len(images):,} images of 3x32x32 ({source})"
    print(f"| ZCA fit (kornia, eps 0.1, CPU) | {zca} | {zca_s:.1f} s |")


if __name__ == "__main__":
    main()
