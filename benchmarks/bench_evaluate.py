"""Evaluation time of ``num_eval`` networks on an IPC-10 CIFAR-10-shaped set: one by one, together.

Random images stand in for a distilled set (the time does not depend on the pixels). Both paths
train the same networks with the same randomness, so the accuracies must agree; the table checks
that as well.

    python benchmarks/bench_evaluate.py                         # small, about a minute on a CPU
    python benchmarks/bench_evaluate.py --epochs 200 --device cuda --test-images 10000 \
        --nets convnet alexnet vgg11 resnet18
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lightning_modules.condense.evaluation import evaluate_set, resolve_device  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nets", nargs="+", default=["convnet"])
    parser.add_argument("--num-eval", type=int, default=5)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per network (the protocol uses 1000)"
    )
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dsa", default="color_crop_cutout_flip_scale_rotate")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    n = args.ipc * args.classes
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.arange(args.classes).repeat_interleave(args.ipc)
    test_x = torch.randn(args.test_images, 3, 32, 32, generator=g)
    test_y = torch.randint(0, args.classes, (args.test_images,), generator=g)
    common = dict(
        nets=args.nets,
        num_classes=args.classes,
        lr=0.01,
        num_eval=args.num_eval,
        epochs=args.epochs,
        dsa_strategy=args.dsa,
        device=device,
        progress=False,
    )
    # warm-up: first calls pay for kernel selection / allocator growth on either path
    evaluate_set(
        images, labels, test_x, test_y, **{**common, "epochs": 1, "num_eval": 2}, together=True
    )
    evaluate_set(
        images, labels, test_x, test_y, **{**common, "epochs": 1, "num_eval": 2}, together=False
    )
    rows = []
    for together in (False, True):
        start = time.perf_counter()
        res = evaluate_set(images, labels, test_x, test_y, **common, together=together)
        total = time.perf_counter() - start
        for name in args.nets:
            rows.append(
                {
                    "net": name,
                    "together": together,
                    "seconds": res[name]["seconds"],
                    "accs": res[name]["accs"],
                }
            )
        rows.append({"net": "all", "together": together, "seconds": total, "accs": []})
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} threads"
    print(
        f"\n{args.num_eval} networks, IPC {args.ipc} x {args.classes} classes ({n} images), "
        f"{args.epochs} epochs, DSA {args.dsa or 'none'}, {args.test_images} test images, "
        f"device {device} ({where})\n"
    )
    print(
        "| net | one by one (s) | together (s) | speed-up | ms / epoch together (incl. test) "
        "| acc % one by one / together |"
    )
    print("|---|---|---|---|---|---|")
    for name in [*args.nets, "all"]:
        seq = next(r for r in rows if r["net"] == name and not r["together"])
        vec = next(r for r in rows if r["net"] == name and r["together"])
        # same networks and randomness; float rounding differs, so long runs drift apart on noise
        mean_seq, mean_vec = (sum(r["accs"]) / max(1, len(r["accs"])) for r in (seq, vec))
        accs = "-" if name == "all" else f"{mean_seq:.1f} / {mean_vec:.1f}"
        speed_up = seq["seconds"] / vec["seconds"]
        print(
            f"| {name} | {seq['seconds']:.2f} | {vec['seconds']:.2f} | {speed_up:.2f}x | "
            f"{1000 * vec['seconds'] / args.epochs:.1f} | {accs} |"
        )
    return rows


if __name__ == "__main__":
    main()
