"""Cost of the FTT vs the number of coordinates D and the TT rank.

For each D and rank: the forward pass, one ALS sweep (cores 0..K-1 and back, K = D + 2 cores:
time core and output core in the middle, one chain for all D outputs) and one Riemannian step
(fixed step, no backtracking; its line search, the output of the rank-2r tangent, also alone) on
``--samples`` fixed (x_t, t, ε) triples. "before" columns time
the uncached formulas (every core's interfaces from scratch: ``ALS.reference_sweep`` and the
per-core ``interfaces`` + ``core_gradient`` loop of the Riemannian gradient) where they are cheap
(``D · rank <= --before-budget``). ALS solves a dense ``r n r`` system per core (``F³/3`` flops,
``F = r · num_basis · r``): rank 16 with 16 splines is 4096 unknowns, about a second per core on
one thread, so an ALS sweep whose estimated solve flops ``2 K F³ / 3`` exceed ``--als-budget`` is
skipped ("—"), as is a rank larger than a bond allows.

    OMP_NUM_THREADS=1 python benchmarks/tt_scaling.py --out benchmarks/results/tt_scaling.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.algebra import core_gradient, orthogonalize
from lightning_modules.tt.als import ALS
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.riemannian import RiemannianGD
from lightning_modules.utils.files import write_text

T = 1000


def _model(dim: int, rank: int, num_basis: int) -> FunctionalTT:
    return FunctionalTT(
        data_shape=(dim,), timesteps=T, time="core", output="core", num_basis=num_basis, rank=rank
    ).double()


def _data(dim: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.tanh(torch.randn(n, dim, generator=g, dtype=torch.float64))
    t = torch.randint(0, T, (n,), generator=g)
    eps = torch.randn(n, dim, generator=g, dtype=torch.float64)
    a = torch.rand(n, 1, generator=g, dtype=torch.float64)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def uncached_riemannian_gradients(net: FunctionalTT, x_t, t, eps) -> list[torch.Tensor]:
    """The pre-cache formula: every core's interfaces from scratch (``O(K²)``)."""
    cores = [c.detach() for c in net.cores]
    left, right = orthogonalize(cores, len(cores) - 1), orthogonalize(cores, 0)
    target = net.from_data_layout(eps)
    weights = 2 * (net.evaluate(x_t, t, cores=left) - target) / target.numel()
    out = []
    for k in range(len(cores)):
        mixed = left[:k] + [cores[k]] + right[k + 1 :]
        iface = net.interfaces(k, x_t, t, cores=mixed)
        out.append(core_gradient(iface, weights, net.mode_sizes[k]))
    return out


def row(dim: int, rank: int, args) -> dict:
    try:
        net = _model(dim, rank, args.num_basis)
    except UserError:
        return {"D": dim, "rank": rank, "skip": True}
    x_t, t, eps = _data(dim, args.samples)
    chunks = [
        (x_t[i : i + args.batch], t[i : i + args.batch], eps[i : i + args.batch])
        for i in range(0, args.samples, args.batch)
    ]
    out = {"D": dim, "rank": rank, "cores": net.num_cores, "params": net.num_parameters()}
    with torch.no_grad():
        out["forward_s"] = _seconds(lambda: net(x_t, t))
    state = [c.detach().clone() for c in net.cores]
    als = ALS(net, ridge=1e-6, sweeps=1, samples=args.samples, batch=args.batch, fixed=True)
    unknowns = rank * args.num_basis * rank
    run_als = 2 * net.num_cores * unknowns**3 / 3 <= args.als_budget
    if run_als:
        out["als_s"] = _seconds(lambda: als.sweep(chunks))
    gd = RiemannianGD(net, lr=1.0, armijo=False, shrink=0.5, max_backtracks=0)
    cores, target = [c.detach() for c in net.cores], net.from_data_layout(eps)
    left, right, deltas, _ = gd.riemannian_gradient(cores, x_t, t, target)
    out["line_search_s"] = _seconds(
        lambda: gd.line_minimiser(left, right, deltas, gd._grad_sq, x_t, t, target, lambda v: v)
    )
    out["riemannian_s"] = _seconds(lambda: gd.step(x_t, t, eps))
    if dim * rank <= args.before_budget:
        with torch.no_grad():
            for param, core in zip(net.cores, state):
                param.copy_(core)
        out["riemannian_before_s"] = _seconds(
            lambda: uncached_riemannian_gradients(net, x_t, t, eps)
        )
        if run_als:
            out["als_before_s"] = _seconds(lambda: als.reference_sweep(chunks))
    return out


def table(rows: list[dict]) -> str:
    def cell(r, key):
        return f"{r[key]:.3g}" if key in r else "—"

    lines = [
        "| D | rank | cores | params | forward s | ALS sweep s | ALS before s | Riemannian s "
        "| of which line search s | Riemannian grad. before s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skip"):
            lines.append(f"| {r['D']} | {r['rank']} | — | — | — | — | — | — | — | — |")
            continue
        lines.append(
            f"| {r['D']} | {r['rank']} | {r['cores']} | {r['params']:,} | {cell(r, 'forward_s')} "
            f"| {cell(r, 'als_s')} | {cell(r, 'als_before_s')} | {cell(r, 'riemannian_s')} "
            f"| {cell(r, 'line_search_s')} | {cell(r, 'riemannian_before_s')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128, 256])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--num-basis", type=int, default=16)
    parser.add_argument("--als-budget", type=float, default=1e12, help="max ALS solve flops")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--before-budget", type=int, default=128, help="max D * rank for 'before'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for dim in args.dims:
        for rank in args.ranks:
            rows.append(row(dim, rank, args))
            print(rows[-1], flush=True)
    text = table(rows)
    print(text)
    if args.out is not None:
        header = (
            f"`OMP_NUM_THREADS={args.threads} python benchmarks/tt_scaling.py` "
            f"(num_basis {args.num_basis}, {args.samples} samples in chunks of {args.batch}, "
            f"{args.threads} thread(s))\n\n"
        )
        write_text(args.out, header + text + "\n")
    return rows


if __name__ == "__main__":
    main()
