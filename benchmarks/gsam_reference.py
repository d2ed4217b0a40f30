"""The references' GSAM optimiser beside ``condense.gsam.gsam_step`` (measuring aid).

Loads ``buffer/gsam`` (``GSAM``, ``ProportionScheduler``) of a local checkout of
NUS-HPC-AI-Lab/DATM or NUS-HPC-AI-Lab/PAD (identical files; nothing of them is in this
repository) and trains two copies of one ConvNet from the same init for ``--steps`` steps on the
same CIFAR-10 batches: the reference's optimiser built as ``buffer_FTD.py`` / ``buffer_CL.py``
build it (SGD base, constant-lr ``StepLR``, ``ProportionScheduler`` with ``rho_max == rho_min``,
``adaptive=True``) and stepped as their ``epoch()`` steps it (``set_closure``, ``step``, then
``scheduler.step()`` and ``update_rho_t()``), and ours. Prints the largest parameter difference
after each step, relative to the largest parameter change.

    OMP_NUM_THREADS=1 python benchmarks/gsam_reference.py --reference <PAD checkout> \\
        --data-dir ../shared/data --steps 20 --dtype 64
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from datamodules.transforms import CIFAR_STATS  # noqa: E402
from lightning_modules.condense.experts import build_seeded  # noqa: E402
from lightning_modules.condense.gsam import gsam_step  # noqa: E402
from lightning_modules.nets import build_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", type=int, choices=(32, 64), default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--rho", type=float, default=0.01)
    ap.add_argument("--alpha", type=float, default=0.3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float64 if a.dtype == 64 else torch.float32
    sys.path.insert(0, str(a.reference / "buffer"))
    from gsam import GSAM, ProportionScheduler

    with open(a.data_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    n = a.steps * a.batch
    x = torch.tensor(batch[b"data"][:n], dtype=dtype).view(-1, 3, 32, 32) / 255
    mean, std = (torch.tensor(v, dtype=dtype).view(1, 3, 1, 1) for v in CIFAR_STATS["cifar10"])
    x, y = (x - mean) / std, torch.tensor(batch[b"labels"][:n])

    def build():
        return build_classifier("convnet", num_classes=10, im_size=32).to(dtype)

    ref_net, our_net = build_seeded(build, 0), build_seeded(build, 0)
    base = torch.optim.SGD(ref_net.parameters(), lr=a.lr, momentum=0, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.StepLR(base, step_size=a.steps, gamma=1)
    rho_scheduler = ProportionScheduler(
        pytorch_lr_scheduler=scheduler, max_lr=a.lr, min_lr=a.lr, max_value=a.rho, min_value=a.rho
    )
    ref_opt = GSAM(
        params=ref_net.parameters(), base_optimizer=base, model=ref_net, gsam_alpha=a.alpha,
        rho_scheduler=rho_scheduler, adaptive=True,
    )  # fmt: skip
    our_opt = torch.optim.SGD(our_net.parameters(), lr=a.lr)
    start = torch.cat([p.detach().flatten() for p in our_net.parameters()])
    rows = []
    for step in range(a.steps):
        xb, yb = x[step * a.batch : (step + 1) * a.batch], y[step * a.batch : (step + 1) * a.batch]
        ref_opt.set_closure(F.cross_entropy, xb, yb)
        ref_opt.step()
        scheduler.step()
        ref_opt.update_rho_t()
        gsam_step(
            our_net, lambda xb=xb, yb=yb: F.cross_entropy(our_net(xb), yb), our_opt,
            rho=a.rho, alpha=a.alpha,
        )  # fmt: skip
        ref_w = torch.cat([p.detach().flatten() for p in ref_net.parameters()])
        our_w = torch.cat([p.detach().flatten() for p in our_net.parameters()])
        moved = (our_w - start).abs().max()
        rows.append(
            {
                "step": step + 1,
                "max_abs_diff": float((ref_w - our_w).abs().max()),
                "max_change": float(moved),
                "relative": float((ref_w - our_w).abs().max() / moved),
            }
        )
    print(json.dumps({"dtype": a.dtype, "rho_t": float(ref_opt.rho_t), "steps": rows}, indent=1))


if __name__ == "__main__":
    main()
