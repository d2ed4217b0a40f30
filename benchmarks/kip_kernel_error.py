"""How far KIP's random-feature kernels are from an exact kernel.

1. The fc ReLU net: the random-feature estimate (mean over ``M`` random nets of finite width of
   the feature inner products, ``rf_fc``) against the exact infinite-width NNGP (``nngp_fc``),
   relative Frobenius error, as the width grows.
2. The ConvNet (``rf_convnet``): no exact kernel here (the paper's infinite-width ConvNet kernel
   needs neural-tangents), so the spread of the estimator: the relative difference between two
   independent estimates with ``M`` random nets each, as ``M`` and the width grow.

Inputs: the first 64 CIFAR-10 test images (``--data``, mean/std-normalised) or, when absent, N(0, 1)
images of that shape.

    OMP_NUM_THREADS=1 python benchmarks/kip_kernel_error.py --data /work/shared/data \
        --out benchmarks/results/kip_kernel_error.md
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_modules.condense.evaluation import init_parameters  # noqa: E402
from lightning_modules.condense.kernel_ridge import (  # noqa: E402
    embedding_features,
    fc_kernel,
    fc_random_features,
)
from lightning_modules.nets import build_classifier  # noqa: E402


def images(data: str | None, n: int) -> tuple[torch.Tensor, str]:
    path = Path(data or "") / "cifar-10-batches-py" / "test_batch"
    if data and path.exists():
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")[b"data"][:n]
        x = torch.tensor(np.asarray(raw), dtype=torch.float64).view(n, 3, 32, 32) / 255
        x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
        return x, f"the first {n} CIFAR-10 test images"
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64), f"{n} N(0, 1) images"  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    x, what = images(a.data, a.n)
    g = torch.Generator().manual_seed(0)
    lines = [f"Inputs: {what}; relative Frobenius error of the {a.n} x {a.n} kernel.", ""]
    lines += ["| fc depth | width | M nets | rf_fc vs exact nngp_fc |", "|---|---|---|---|"]
    for depth in (1, 2):
        exact = fc_kernel(x, x, depth=depth, kind="nngp")
        for width in (64, 256, 1024, 4096):
            for m in (1, 8):
                est = (
                    sum(
                        (lambda f: f @ f.t())(
                            fc_random_features(x, width, depth=depth, generator=g)
                        )
                        for _ in range(m)
                    )
                    / m
                )
                lines.append(f"| {depth} | {width} | {m} | {rel(est, exact):.4f} |")
    lines += ["", "| ConvNet-3 width | M nets | two independent rf_convnet estimates differ by |"]
    lines += ["|---|---|---|"]
    xf = x.float()
    for width in (32, 128):
        for m in (1, 4, 16):
            kernels = []
            for _ in range(2):
                phis = []
                for _ in range(m):
                    fresh = build_classifier("convnet", 3, 10, 32, width=width, norm="none")
                    phis.append(embedding_features([init_parameters(fresh, g).embed], xf))
                with torch.no_grad():
                    kernels.append(sum(f @ f.t() for f in phis) / m)
            lines.append(f"| {width} | {m} | {rel(kernels[0], kernels[1]):.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    with torch.no_grad():
        main()
