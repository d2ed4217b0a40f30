"""Seconds per iteration and peak memory of CAFE and KIP at CIFAR-10 IPC 10 (ConvNet-3), CPU.

Timed on random CIFAR-shaped data through :class:`lightning_modules.set_matching.MatchingModule`
(the code the runs use); each variant runs in its own process so that its peak resident memory
(``ru_maxrss``) is its own.

- CAFE: the pieces of one iteration: an image step (fresh network, CAFE loss, image gradient), a
  network epoch on the synthetic set (DSA), one real-accuracy measurement (``batch_test`` per
  class). An iteration is data dependent (the accuracy watchers); the table composes the
  shortest one the reference allows (``window`` = 10: 10 image steps, 9 x 10 network epochs,
  10 + 90 accuracy measurements) and the longest under the caps.
- KIP: one iteration (kernel, KRR solve, Adam step's gradient) per kernel and target batch;
  ``chunk`` bounds the images per forward pass.

    OMP_NUM_THREADS=1 python benchmarks/bench_cafe_kip.py --out benchmarks/results/cafe_kip_cpu.md
    python benchmarks/bench_cafe_kip.py --device cuda --variants cafe --json c.json  # GPU

``--width``/``--ipc``/``--batch-real``/``--batch-test`` replace the settings of every variant (the
dry run of ``gpu_check.py`` uses toy sizes). On CUDA times are device-synchronised and the peak is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lightning_modules.condense.dsa import DSA  # noqa: E402
from lightning_modules.nets import build_classifier  # noqa: E402
from lightning_modules.set_matching import MatchingModule  # noqa: E402

K = 10


def make(method, width, ipc, batch_real, device="cpu", **opts) -> MatchingModule:
    g = torch.Generator().manual_seed(0)
    real_x = torch.randn(K * batch_real, 3, 32, 32, generator=g)
    real_y = torch.arange(K).repeat_interleave(batch_real)
    images = torch.randn(K * ipc, 3, 32, 32, generator=g)
    labels = torch.arange(K).repeat_interleave(ipc)
    net = build_classifier("convnet", 3, K, 32, width=width)
    module = MatchingModule(
        net, images, labels, real_x, real_y, method=method, lr_img=0.1, batch_real=batch_real,
        dsa=DSA(), **opts,
    )  # fmt: skip
    module = module.to(device)
    module.on_fit_start()  # the real data to the module's device, as Trainer.fit does
    return module


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeat=1):
    fn()  # warm-up
    _sync()
    tic = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - tic) / repeat


def one(spec: dict) -> dict:
    if spec["method"] == "cafe":
        m = make("cafe", spec["width"], spec["ipc"], spec["batch_real"], spec.get("device", "cpu"),
                 cafe={"batch_test": spec["batch_test"]})  # fmt: skip
        g = m.iteration_generator(0, 0)
        net = m.fresh_net(g)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        step = timed(lambda: torch.autograd.grad(m.matching_loss(net, g), m.images))
        epoch = timed(lambda: m._train_net(net, opt, 1, g))
        acc = timed(lambda: m._real_accuracy(net, g))
        shortest = 10 * step + 90 * epoch + 100 * acc
        longest = 100 * step + 99 * 100 * epoch + (100 + 9900) * acc
        out = dict(image_step=step, epoch=epoch, accuracy=acc, shortest=shortest, longest=longest)
    else:
        kip = {k: spec[k] for k in ("kernel", "rf_models", "chunk")}
        m = make("kip", spec["width"], spec["ipc"], spec["batch_real"], spec.get("device", "cpu"),
                 kip=kip)  # fmt: skip
        g = m.iteration_generator(0, 0)
        out = dict(iteration=timed(lambda: torch.autograd.grad(m.kip_objective(g), m.images)))
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if spec.get("device", "cpu").startswith("cuda"):
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


VARIANTS = [
    dict(method="cafe", width=128, ipc=10, batch_real=256, batch_test=128),
    dict(method="kip", kernel="rf_convnet", rf_models=8, chunk=500, width=128, ipc=10,
         batch_real=50),
    dict(method="kip", kernel="rf_convnet", rf_models=1, chunk=500, width=128, ipc=10,
         batch_real=500),
    dict(method="kip", kernel="ntk_fc", rf_models=1, chunk=1000, width=128, ipc=10,
         batch_real=500),
]  # fmt: skip


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--variants", default="cafe,kip", help="which methods' variants to run")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    for key in ("width", "ipc", "batch-real", "batch-test"):
        p.add_argument(f"--{key}", type=int, default=None, help="override every variant's")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(json.loads(a.one))))
        return ""
    cuda = a.device.startswith("cuda")
    where = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} thread(s)"
    )
    peak = "torch.cuda.max_memory_allocated" if cuda else "the process's max resident set"
    lines = [
        f"CIFAR-10 shapes, IPC {a.ipc or 10}, ConvNet-3 (instance norm); {where}, torch "
        f"{torch.__version__}; peak = {peak}.",
        "",
        "| method | setting | image step (s) | network epoch (s) | accuracy check (s) | "
        "s / iteration | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    wanted = set(a.variants.split(","))
    rows = []
    for spec in VARIANTS:
        if spec["method"] not in wanted:
            continue
        spec = {**spec, "device": a.device}
        for key in ("width", "ipc", "batch_real", "batch_test"):
            if getattr(a, key) is not None and key in spec:
                spec[key] = getattr(a, key)
        run = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(spec, r, flush=True)
        mem = r.get("peak_mb", r["peak_rss_gib"] * 1024)
        if spec["method"] == "cafe":
            rows += [
                {"method": "cafe", "variant": f"{bound} iteration", "image_step_s": r["image_step"],
                 "inner_s": r["epoch"], "s_per_iter": r[bound], "peak_mb": mem}
                for bound in ("shortest", "longest")
            ]  # fmt: skip
        else:
            rows.append({"method": "kip", "variant": spec["kernel"], "s_per_iter": r["iteration"],
                         "peak_mb": mem})  # fmt: skip
        if spec["method"] == "cafe":
            lines.append(
                f"| CAFE | real batch {spec['batch_real']}/class, accuracy on "
                f"{spec['batch_test']}/class | {r['image_step']:.2f} | {r['epoch']:.3f} | "
                f"{r['accuracy']:.2f} | {r['shortest']:.0f} (shortest) .. {r['longest']:.0f} "
                f"(caps) | {r['peak_rss_gib']:.2f} |"
            )
        else:
            setting = (
                f"{spec['kernel']}, target {spec['batch_real'] * K}"
                + (f", {spec['rf_models']} nets" if spec["kernel"] == "rf_convnet" else "")
                + f", chunk {spec['chunk']}"
            )
            lines.append(
                f"| KIP | {setting} | - | - | - | {r['iteration']:.2f} | {r['peak_rss_gib']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": where, "rows": rows}, indent=2))
    return text


if __name__ == "__main__":
    main()
