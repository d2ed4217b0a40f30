"""Seconds per iteration of DC, DSA and DM at CIFAR-10 IPC 10 (ConvNet-3), and what batching the
per-class passes over the classes buys.

An iteration of DC/DSA is ``outer_loop`` image steps with ``inner_loop`` network epochs on the
synthetic set between them (IPC 10: 10 and 50); DM's is one image step. The pieces are timed on
random CIFAR-shaped data through :class:`lightning_modules.set_matching.MatchingModule` (the code
the runs use) and composed: s/iteration = outer_loop x (image step) + (outer_loop - 1) x (inner
loop). "batched": all classes' real batches in one pass (DM: one forward; DC/DSA: ``vmap`` of the
per-class gradient); "loop": one pass per class.

    OMP_NUM_THREADS=1 python benchmarks/bench_matching.py              # CPU, ConvNet width 128
    python benchmarks/bench_matching.py --width 32 --out benchmarks/results/matching_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lightning_modules.condense.dsa import DSA  # noqa: E402
from lightning_modules.condense.gradient_matching import (  # noqa: E402
    PUBLISHED_LOOPS,
    train_network_on_set,
)
from lightning_modules.nets import build_classifier  # noqa: E402
from lightning_modules.set_matching import MatchingModule  # noqa: E402


def make(method: str, width: int, ipc: int, batch_real: int, batched: bool) -> MatchingModule:
    g = torch.Generator().manual_seed(0)
    k = 10
    real_x = torch.randn(k * batch_real, 3, 32, 32, generator=g)
    real_y = torch.arange(k).repeat_interleave(batch_real)
    images = torch.randn(k * ipc, 3, 32, 32, generator=g)
    labels = torch.arange(k).repeat_interleave(ipc)
    net = build_classifier("convnet", 3, k, 32, width=width)
    outer, inner = PUBLISHED_LOOPS[ipc]
    loops = dict(outer_loop=outer, inner_loop=inner) if method != "dm" else {}
    return MatchingModule(
        net, images, labels, real_x, real_y, method=method, lr_img=0.1, batch_real=batch_real,
        dsa=DSA(), batched=batched, class_chunk=None if batched else None, **loops,
    )  # fmt: skip


def image_step_s(module: MatchingModule, steps: int, batched: bool) -> float:
    """Seconds for one image step: fresh network, the method's loss, its image gradient."""
    if module.method == "dm" and not batched:
        module.class_chunk = 1  # one forward per class
    times = []
    for t in range(steps + 1):  # the first call warms up
        tic = time.perf_counter()
        g = module.iteration_generator(t, 0)
        net = module.fresh_net(g)
        if module.method == "dm":
            net.requires_grad_(False)
        loss = module.matching_loss(net, g)
        torch.autograd.grad(loss, module.images)
        times.append(time.perf_counter() - tic)
    return sum(times[1:]) / steps


def inner_loop_s(module: MatchingModule) -> float:
    g = torch.Generator().manual_seed(0)
    net = module.fresh_net(g)
    opt = torch.optim.SGD(net.parameters(), lr=module.lr_net)
    augment = module._augment_per_sample if module.dsa is not None else None
    tic = time.perf_counter()
    train_network_on_set(
        net, opt, module.images, module.labels, epochs=module.inner_loop,
        batch_size=module.batch_train, augment=augment, generator=g,
    )  # fmt: skip
    return time.perf_counter() - tic


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--steps", type=int, default=1, help="timed image steps per variant")
    p.add_argument("--methods", default="dm,dsa,dc")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    rows = []
    for method in a.methods.split(","):
        inner = None
        for batched in (True, False):
            module = make(method, a.width, a.ipc, a.batch_real, batched)
            step = image_step_s(module, a.steps, batched)
            if method == "dm":
                per_it = step
            else:
                if inner is None:
                    inner = inner_loop_s(module)
                per_it = module.outer_loop * step + (module.outer_loop - 1) * inner
            rows.append((method, "batched" if batched else "loop", step, inner, per_it))
            print(rows[-1], flush=True)
    lines = [
        f"CIFAR-10 shapes, IPC {a.ipc}, ConvNet-3 width {a.width}, real batch {a.batch_real} per "
        f"class; CPU ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {threads} thread(s); {a.steps} timed image step(s) per variant.",
        "",
        "| method | per-class passes | image step (s) | inner loop (s) | s / iteration |",
        "|---|---|---|---|---|",
    ]
    for method, how, step, inner, per_it in rows:
        inner_text = "-" if inner is None else f"{inner:.2f}"
        lines.append(f"| {method} | {how} | {step:.2f} | {inner_text} | {per_it:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
