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
    python benchmarks/bench_matching.py --device cuda --json m.json  # GPU (what gpu_check.py runs)

On CUDA the times are device-synchronised and ``peak_mb`` is ``torch.cuda.max_memory_allocated``
during the variant.
"""

from __future__ import annotations

import argparse
import json
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


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make(
    method: str, width: int, ipc: int, batch_real: int, batched: bool, device="cpu"
) -> MatchingModule:
    g = torch.Generator().manual_seed(0)
    k = 10
    real_x = torch.randn(k * batch_real, 3, 32, 32, generator=g)
    real_y = torch.arange(k).repeat_interleave(batch_real)
    images = torch.randn(k * ipc, 3, 32, 32, generator=g)
    labels = torch.arange(k).repeat_interleave(ipc)
    net = build_classifier("convnet", 3, k, 32, width=width)
    outer, inner = PUBLISHED_LOOPS[ipc]
    loops = dict(outer_loop=outer, inner_loop=inner) if method != "dm" else {}
    module = MatchingModule(
        net, images, labels, real_x, real_y, method=method, lr_img=0.1, batch_real=batch_real,
        dsa=DSA(), batched=batched, class_chunk=None if batched else None, **loops,
    )  # fmt: skip
    module = module.to(device)
    module.on_fit_start()  # the real data to the module's device, as Trainer.fit does
    return module


def image_step_s(module: MatchingModule, steps: int, batched: bool) -> float:
    """Seconds for one image step: fresh network, the method's loss, its image gradient."""
    if module.method == "dm" and not batched:
        module.class_chunk = 1  # one forward per class
    times = []
    for t in range(steps + 1):  # the first call warms up
        _sync(module.device)
        tic = time.perf_counter()
        g = module.iteration_generator(t, 0)
        net = module.fresh_net(g)
        if module.method == "dm":
            net.requires_grad_(False)
        loss = module.matching_loss(net, g)
        torch.autograd.grad(loss, module.images)
        _sync(module.device)
        times.append(time.perf_counter() - tic)
    return sum(times[1:]) / steps


def inner_loop_s(module: MatchingModule) -> float:
    g = torch.Generator().manual_seed(0)
    net = module.fresh_net(g)
    opt = torch.optim.SGD(net.parameters(), lr=module.lr_net)
    augment = module._augment_per_sample if module.dsa is not None else None
    _sync(module.device)
    tic = time.perf_counter()
    train_network_on_set(
        net, opt, module.images, module.labels, epochs=module.inner_loop,
        batch_size=module.batch_train, augment=augment, generator=g,
    )  # fmt: skip
    _sync(module.device)
    return time.perf_counter() - tic


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--steps", type=int, default=1, help="timed image steps per variant")
    p.add_argument("--methods", default="dm,dsa,dc")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    cuda = torch.device(a.device).type == "cuda"
    rows, peaks = [], []
    for method in a.methods.split(","):
        inner = None
        for batched in (True, False):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            module = make(method, a.width, a.ipc, a.batch_real, batched, a.device)
            step = image_step_s(module, a.steps, batched)
            if method == "dm":
                per_it = step
            else:
                if inner is None:
                    inner = inner_loop_s(module)
                per_it = module.outer_loop * step + (module.outer_loop - 1) * inner
            rows.append((method, "batched" if batched else "loop", step, inner, per_it))
            peaks.append(torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
            print(rows[-1], flush=True)
    where = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}), {threads} thread(s)"
    )
    lines = [
        f"CIFAR-10 shapes, IPC {a.ipc}, ConvNet-3 width {a.width}, real batch {a.batch_real} per "
        f"class; {where}, torch {torch.__version__}; {a.steps} timed image step(s) per variant.",
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
    if a.json:
        keys = ("method", "variant", "image_step_s", "inner_s", "s_per_iter")
        out = [{**dict(zip(keys, r)), "peak_mb": pk} for r, pk in zip(rows, peaks)]
        Path(a.json).write_text(json.dumps({"device": where, "rows": out}, indent=2))
    return text


if __name__ == "__main__":
    main()
