"""What DSA costs next to a ConvNet-3 training step at batch 256 (target: at most 15%).

Times, on random CIFAR-shaped batches: one SGD step of ConvNet-3 (width 128, instance norm)
without DSA and with DSA (per-sample parameters, strategy color_crop_cutout_flip_scale_rotate,
one group drawn per call, so the mean runs over all groups), and DSA alone: forward only, and
forward + backward into the pixels (what distillation pays), overall and per group.

    python benchmarks/bench_dsa.py                  # CPU, a few steps
    python benchmarks/bench_dsa.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_modules.condense.dsa import DEFAULT_STRATEGY, DSA  # noqa: E402
from lightning_modules.condense.evaluation import resolve_device  # noqa: E402
from lightning_modules.nets import build_classifier  # noqa: E402


def timed(fn, steps: int, device: torch.device, warmup: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls (device-synchronised).

    The warm-up also fills the pinned host-memory cache that DSA's non-blocking copies use.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per variant")
    parser.add_argument(
        "--dsa-calls", type=int, default=120, help="timed DSA calls (cheap; many groups)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--strategy", default=DEFAULT_STRATEGY)
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls first (cuda 10, cpu 1)"
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)
    g_data = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g_data).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g_data).to(device)
    net = build_classifier("convnet", 3, 10, 32).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    dsa = DSA(args.strategy)
    g = torch.Generator().manual_seed(1)

    def train_step(augment: bool):
        batch = dsa(x, g) if augment else x
        loss = F.cross_entropy(net(batch), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def dsa_forward():
        return dsa(x, g)

    x_leaf = x.clone().requires_grad_(True)
    weight = torch.randn_like(x)

    def dsa_backward():
        (dsa(x_leaf, g) * weight).sum().backward()

    plain = timed(lambda: train_step(False), args.steps, device, warmup)
    with_dsa = timed(lambda: train_step(True), max(args.steps, len(dsa.groups)), device, warmup)
    plain_again = timed(
        lambda: train_step(False), args.steps, device, warmup
    )  # drift check on a shared machine
    fwd = timed(dsa_forward, args.dsa_calls, device, warmup)
    bwd = timed(dsa_backward, args.dsa_calls, device, warmup)
    per_group = {  # one DSA per group, bound as a default so each lambda keeps its own
        group: timed(lambda d=one: d(x, g), max(10, args.dsa_calls // 6), device, warmup)
        for group, one in ((grp, DSA(grp)) for grp in dsa.groups)
    }
    step = (plain + plain_again) / 2
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {threads} threads"
    )
    print(
        f"\nConvNet-3 (width 128) training step, batch {args.batch}, {where}; DSA {args.strategy}\n"
    )
    print("| measurement | ms | share of a plain step |")
    print("|---|---|---|")
    rows = [
        ("training step without DSA", step),
        ("training step with DSA", with_dsa),
        ("difference (DSA inside the step)", with_dsa - step),
        ("DSA alone, forward (mean over groups)", fwd),
        ("DSA alone, forward + backward to pixels", bwd),
        *[(f"  DSA {group} only, forward", t) for group, t in per_group.items()],
    ]
    for label, seconds in rows:
        print(f"| {label} | {1000 * seconds:.3f} | {100 * seconds / step:.1f}% |")
    verdict = "meets" if fwd <= 0.15 * step else "MISSES"
    print(
        f"\nDSA forward is {100 * fwd / step:.1f}% of a step: {verdict} the 15% target "
        f"(the plain step drifted {100 * abs(plain_again - plain) / plain:.0f}% "
        "between its two timings)"
    )
    return {
        "step": step,
        "with_dsa": with_dsa,
        "dsa_forward": fwd,
        "dsa_backward": bwd,
        **per_group,
    }


if __name__ == "__main__":
    main()
