"""Distillation iteration cost: time and peak memory vs syn_steps, full vs recompute, and the
framework overhead of the Lightning path over a bare torch loop doing the same maths.

One iteration = unroll ``syn_steps`` student steps (DSA on, all images per step), pruning mask,
matching loss, gradient into the images and α, one SGD update. Shapes: CIFAR (3x32x32, 10
classes), ConvNet-``depth`` of ``width``, random images and random expert vectors.

Every measurement runs in a fresh subprocess, so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` minus what was allocated before the first iteration; on
the CPU the peak resident set (``ru_maxrss``) minus the resident set before the first
iteration. Times are the median over ``--repeats`` iterations after one warm-up.

Rows:
- ``full`` / ``recompute``: ``student_unroll`` + ``prune_mask`` + ``matching_loss`` + SGD
  (the maths of DistillationModule.training_step, without Lightning);
- ``bare``: the same iteration written as a plain MTT-style loop (list of parameter vectors,
  ``functional_call``), no project code but the DSA and the network;
- ``lightning``: ``Trainer.fit`` of DistillationModule on an ExpertPairsDataModule (expert
  files on disk, memory-mapped), time between consecutive batch starts (everything the
  framework adds: data, logging, callbacks).

    python benchmarks/bench_distill.py                          # CPU: IPC 1, width 32
    python benchmarks/bench_distill.py --device cuda     # GPU: IPC 10, width 128 (the issue's)
    python benchmarks/bench_distill.py --steps 10,80 --ipc 10 --width 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Memory:
    """Peak memory of what runs after ``start()`` (CUDA allocator or CPU resident set)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes()

    def peak_mb(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return (peak - self.base) / 2**20


def _problem(args, device):
    """Net, layout, start/target vectors, images and labels of one measurement.

    ``args.inputs`` (optional, a ``torch.save`` file of ``snapshots`` [3, P] (start, middle,
    target), ``images`` and ``labels``) gives fixed inputs, e.g. the ones an A/B run hands the
    official code too; else random expert vectors and N(0, 1) images, ``ipc`` per class.
    """
    from lightning_modules.nets import FlatParams, build_classifier

    k = int(getattr(args, "num_classes", 10))
    g = torch.Generator().manual_seed(0)
    net = build_classifier("convnet", num_classes=k, depth=args.depth, width=args.width).to(device)
    layout = FlatParams(net)
    if getattr(args, "inputs", None):
        given = torch.load(args.inputs, map_location="cpu")
        start, target = given["snapshots"][0], given["snapshots"][-1]
        images, labels = given["images"].float(), given["labels"].long()
        if start.numel() != layout.numel:
            raise ValueError(f"inputs hold {start.numel()} parameters, the net {layout.numel}")
    else:
        start = 0.05 * torch.randn(layout.numel, generator=g)
        target = start + 0.01 * torch.randn(layout.numel, generator=g)
        images = torch.randn(k * args.ipc, 3, 32, 32, generator=g)
        labels = torch.arange(k).repeat_interleave(args.ipc)
    return net, layout, start.to(device), target.to(device), images.to(device), labels.to(device)


def _timed(step, device, repeats, memory) -> dict:
    memory.start()
    times = []
    for _ in range(repeats + 1):  # the first is the warm-up
        _sync(device)
        tic = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return {"time_s": statistics.median(times[1:]), "peak_mb": memory.peak_mb()}


def child_unroll(args, mode: str) -> dict:
    """``full`` / ``recompute`` through the project's plain-torch functions."""
    from lightning_modules.condense.dsa import DSA
    from lightning_modules.condense.matching import matching_loss, prune_mask
    from lightning_modules.condense.unroll import classifier_loss, student_unroll

    device = args.device
    net, layout, start, target, images0, labels = _problem(args, device)
    images = images0.clone().requires_grad_(True)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    opt = torch.optim.SGD(
        [{"params": [images]}, {"params": [lr], "lr": 1e-5}], lr=100, momentum=0.5
    )
    loss_fn, dsa = classifier_loss(net, layout), DSA()
    counter = iter(range(10**9))

    def step():
        gen = torch.Generator().manual_seed(next(counter))
        end = student_unroll(
            loss_fn, start, images, labels, lr, steps=args.syn_steps,
            batch_syn=getattr(args, "batch_syn", None),
            augment=lambda x, g: dsa(x, g), generator=gen, mode=mode,
            keep_on="cpu" if args.offload else None,
        )  # fmt: skip
        loss = matching_loss(end, start, target, prune_mask(end, target, 0.1))
        images.grad, lr.grad = torch.autograd.grad(loss, [images, lr])
        opt.step()

    return _timed(step, device, args.repeats, _Memory(device))


def child_bare(args) -> dict:
    """The same iteration as a bare MTT-style loop (no project code but DSA and the net)."""
    from lightning_modules.condense.dsa import DSA

    device = args.device
    net, layout, start, target, images0, labels = _problem(args, device)
    images = images0.clone().requires_grad_(True)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    opt = torch.optim.SGD(
        [{"params": [images]}, {"params": [lr], "lr": 1e-5}], lr=100, momentum=0.5
    )
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    dsa = DSA()
    counter = iter(range(10**9))

    def step():
        gen = torch.Generator().manual_seed(next(counter))
        student = [start.clone().requires_grad_(True)]
        for _ in range(args.syn_steps):
            order = torch.randperm(len(images), generator=gen).to(device)
            x = dsa(images[order], gen)
            params = {
                n: c.view(s) for n, c, s in zip(names, torch.split(student[-1], sizes), shapes)
            }
            out = torch.func.functional_call(net, params, (x,))
            grad = torch.autograd.grad(
                F.cross_entropy(out, labels[order]), student[-1], create_graph=True
            )[0]
            student.append(student[-1] - lr * grad)
        with torch.no_grad():
            s, t = student[-1], target
            keep = (
                (torch.sign(s) * torch.sign(t) > 0)
                & (s.abs() >= 0.1 * t.abs())
                & (t.abs() >= 0.1 * s.abs())
            )
            keep |= (s == 0) & (t == 0)
        zero = torch.zeros((), device=device)
        num = torch.where(keep, student[-1] - target, zero).pow(2).sum()
        den = torch.where(keep, start - target, zero).pow(2).sum()
        images.grad, lr.grad = torch.autograd.grad(num / den, [images, lr])
        opt.step()

    return _timed(step, device, args.repeats, _Memory(device))


def child_lightning(args) -> dict:
    """DistillationModule under a Lightning Trainer, pairs from expert files on disk."""
    import lightning as L

    from datamodules.expert_pairs import ExpertPairsDataModule
    from datamodules.trajectories import ExpertStore
    from lightning_modules.condense.dsa import DSA
    from lightning_modules.distillation import DistillationModule

    device = args.device
    net, layout, start, target, images0, labels = _problem(args, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        snaps = torch.stack([start, (start + target) / 2, target]).cpu()
        meta = {
            k: None
            for k in (
                "net",
                "dataset",
                "zca",
                "lr",
                "seed",
                "batch_size",
                "dsa_strategy",
                "test_acc",
            )
        }
        meta.update(
            param_names=layout.names, param_shapes=[list(s) for s in layout.shapes], epochs=2,
            num_classes=int(getattr(args, "num_classes", 10)), channels=3, im_size=32,
        )  # fmt: skip
        ExpertStore(tmp).write(0, snaps, meta)
        n = args.repeats + 1
        pairs = ExpertPairsDataModule(tmp, expert_epochs=2, max_start_epoch=1, iterations=n)
        module = DistillationModule(
            net, images0, labels, lr_teacher=0.01, lr_img=100, lr_lr=1e-5, eps=0.1,
            syn_steps=args.syn_steps, batch_syn=getattr(args, "batch_syn", None),
            unroll=getattr(args, "unroll", "full"), offload=getattr(args, "offload", "auto"),
            dsa=DSA(),
        )  # fmt: skip
        starts: list[float] = []

        class BatchClock(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                _sync(device)
                starts.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module):
                _sync(device)
                starts.append(time.perf_counter())

        trainer = L.Trainer(
            accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=n,
            max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp), log_every_n_steps=1,
            enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False,
            callbacks=[BatchClock()], default_root_dir=tmp,
        )  # fmt: skip
        memory = _Memory(device)
        memory.start()
        trainer.fit(module, datamodule=pairs)
        laps = [b - a for a, b in zip(starts, starts[1:])]
        return {"time_s": statistics.median(laps[1:]), "peak_mb": memory.peak_mb()}


def _child_main(spec: dict) -> None:
    args = argparse.Namespace(**spec)
    torch.set_num_threads(args.threads) if args.threads else None
    if args.kind == "lightning":
        result = child_lightning(args)
    elif args.kind == "bare":
        result = child_bare(args)
    else:
        result = child_unroll(args, args.kind)
    print("RESULT " + json.dumps(result), flush=True)


def _measure(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when present)")
    p.add_argument("--steps", default="10,20,40,80", help="comma-separated syn_steps")
    p.add_argument(
        "--ipc", type=int, default=None, help="images per class (default: 10 on cuda, 1 on cpu)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="ConvNet width (default: 128 on cuda, 32 on cpu)"
    )
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--modes", default="full,recompute,bare,lightning", help="rows to measure")
    p.add_argument(
        "--offload", default="auto", choices=("auto", "on", "off"),
        help="recompute keeps its J parameter vectors in CPU memory (auto: on CUDA)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child_main(json.loads(args.child))
        return
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    args.offload = args.offload == "on" or (args.offload == "auto" and gpu)
    ipc = args.ipc or (10 if gpu else 1)
    width = args.width or (128 if gpu else 32)
    steps = [int(s) for s in args.steps.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    where = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"# distillation iteration: {where}, torch {torch.__version__}")
    shapes = f"IPC {ipc} ({10 * ipc} images, all per step), ConvNet-{args.depth} width {width}"
    print(f"# CIFAR shapes, {shapes}, DSA on, eps 0.1")
    print(f"# recompute keeps its parameter vectors on the {'CPU' if args.offload else 'device'}")
    print(f"# median of {args.repeats} iterations after a warm-up; peak memory above the start")
    print("")
    results = []
    for s in steps:
        for mode in modes:
            spec = dict(kind=mode, device=device, ipc=ipc, width=width, depth=args.depth,
                        syn_steps=s, repeats=args.repeats, offload=args.offload,
                        threads=args.threads)  # fmt: skip
            r = _measure(spec)
            results.append({"mode": mode, "syn_steps": s, **r})
            print(f"  measured {mode:>9} syn_steps={s:>3}: {r}", file=sys.stderr, flush=True)
    by = {(r["mode"], r["syn_steps"]): r for r in results}

    print("| syn_steps | " + " | ".join(f"{m} s/iter | {m} peak MB" for m in modes) + " |")
    print("|---|" + "---|---|" * len(modes))
    for s in steps:
        cells = []
        for m in modes:
            r = by[(m, s)]
            cells += (
                [f"{r['time_s']:.3f}", f"{r['peak_mb']:.0f}"]
                if "error" not in r
                else ["error", r["error"][:40]]
            )
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("")

    def ok(m, s):
        return (m, s) in by and "error" not in by[(m, s)]

    def t(m, s):
        return by[(m, s)]["time_s"]

    first, last = steps[0], steps[-1]
    for m, target in (("recompute", "target < +10%"), ("full", "")):
        if ok(m, first) and ok(m, last):
            lo, hi = by[(m, first)]["peak_mb"], by[(m, last)]["peak_mb"]
            growth = f"{100 * (hi / lo - 1):+.1f}%" + (f"; {target}" if target else "")
            print(f"{m} peak memory {first} -> {last} steps: {lo:.0f} -> {hi:.0f} MB ({growth})")
    for s in steps:
        parts = []
        if ok("full", s) and ok("recompute", s):
            ratio = t("recompute", s) / t("full", s)
            parts.append(f"recompute/full time {ratio:.2f}x (target <= 1.5x)")
        if ok("bare", s) and ok("lightning", s):
            over = 100 * (t("lightning", s) / t("bare", s) - 1)
            parts.append(f"Lightning over bare loop {over:+.1f}% (target <= +10%)")
        if ok("bare", s) and ok("full", s):
            parts.append(
                f"project functions over bare loop {100 * (t('full', s) / t('bare', s) - 1):+.1f}%"
            )
        if parts:
            print(f"syn_steps={s}: " + "; ".join(parts))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": where, "ipc": ipc, "width": width, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
