"""Expert (teacher) training throughput with and without DSA; prints a markdown table.

Measures, for ConvNet-depth (width 128) at batch 256 with the expert optimiser (SGD lr 0.01):
a training step without augmentation, the same step with DSA (per-sample parameters, one group
per call as the teacher draws them), DSA on its own (all groups and each group), and one whole
expert epoch through ``train_expert`` (gather, DSA, step, snapshot, test accuracy) on random data.

    python benchmarks/bench_teacher.py                        # CPU, a few steps
    python benchmarks/bench_teacher.py --device cuda --steps 200 --warmup 20
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

from lightning_modules.condense.dsa import DSA, parse_strategy  # noqa: E402
from lightning_modules.condense.experts import build_seeded, train_expert  # noqa: E402
from lightning_modules.nets import build_classifier  # noqa: E402

STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, steps: int, warmup: int, device: str) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def step_seconds(args, strategy: str | None) -> float:
    """Seconds per expert training step (optionally with DSA) on one fixed batch."""
    g = torch.Generator().manual_seed(0)
    net = build_classifier("convnet", depth=args.depth, width=args.width).to(args.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
    dsa = DSA(strategy) if strategy else None
    dsa_gen = torch.Generator().manual_seed(1)

    def step():
        xb = dsa(x, dsa_gen) if dsa is not None else x
        loss = F.cross_entropy(net(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed(step, args.steps, args.warmup, args.device)


def dsa_seconds(args, strategy: str) -> float:
    """Seconds per DSA call (draw + apply, per-sample) on a batch, without a network."""
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(
        args.device
    )
    dsa, gen = DSA(strategy), torch.Generator().manual_seed(1)
    return _timed(lambda: dsa(x, gen), args.steps, args.warmup, args.device)


def expert_epoch_images_per_s(args, strategy: str | None) -> float:
    """Images/s of one ``train_expert`` epoch on random data (includes the test-accuracy pass)."""
    g = torch.Generator().manual_seed(0)
    n, n_test = args.epoch_images, args.epoch_images // 5
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    tx, ty = x[:n_test], y[:n_test]

    def build():
        return build_classifier("convnet", depth=args.depth, width=args.width)

    net = build_seeded(build, 0).to(args.device)
    augment = DSA(strategy) if strategy else None
    _sync(args.device)
    start = time.perf_counter()
    train_expert(net, x, y, tx, ty, epochs=1, seed=0, batch_size=args.batch, augment=augment)
    _sync(args.device)
    return n / (time.perf_counter() - start)


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
    p.add_argument("--epoch-images", type=int, default=2560, help="0 skips the whole-epoch rows")
    args = p.parse_args()

    plain = step_seconds(args, None)
    with_dsa = step_seconds(args, STRATEGY)
    dsa_all = dsa_seconds(args, STRATEGY)
    groups = {g: dsa_seconds(args, g) for g in parse_strategy(STRATEGY)}

    name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    threads = torch.get_num_threads()
    print(f"device: {args.device} ({name}), torch {torch.__version__}, threads {threads}")
    print(f"ConvNet-{args.depth} width {args.width}, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, SGD lr 0.01, DSA {STRATEGY} (per sample)")  # fmt: skip
    print()
    b = args.batch
    print("| measurement | ms / batch | images/s |")
    print("|---|---|---|")
    print(f"| training step, no DSA | {1e3 * plain:.2f} | {b / plain:,.0f} |")
    print(f"| training step, DSA | {1e3 * with_dsa:.2f} | {b / with_dsa:,.0f} |")
    print(f"| DSA alone (one random group per call) | {1e3 * dsa_all:.2f} | {b / dsa_all:,.0f} |")
    for group, seconds in groups.items():
        print(f"| DSA alone, {group} | {1e3 * seconds:.2f} | {b / seconds:,.0f} |")
    if args.epoch_images:
        for label, strategy in (("no DSA", None), ("DSA", STRATEGY)):
            ips = expert_epoch_images_per_s(args, strategy)
            what = f"train_expert epoch ({args.epoch_images} images + test pass), {label}"
            print(f"| {what} | - | {ips:,.0f} |")
    print()
    share = (with_dsa - plain) / with_dsa
    print(f"DSA share of a training step: {100 * share:.1f}% (step with DSA vs without); "
          f"DSA alone / step with DSA: {100 * dsa_all / with_dsa:.1f}%"
          "  (target: at most 15%)")  # fmt: skip


if __name__ == "__main__":
    main()
