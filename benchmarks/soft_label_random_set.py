"""Give a set file soft labels from expert logits: DD-Ranking's "random images + soft labels" case.

DD-Ranking's point is that soft-label evaluation lifts random real images too. This script makes
such a set: it reads a set file (e.g. ``task=coreset coreset.method=random``), labels its images
with the mean logits of an expert store's snapshots (the last by default, as DATM initialises its
learned labels) and writes a copy carrying them as ``soft_labels``. ``task=evaluate`` then reports
acc_soft, acc_hard and HLR/IOR/LRS for it: a random set's IOR should be near zero.

    python benchmarks/soft_label_random_set.py --set <run>/set.pt --store <expert store> \
        --out random_soft.pt [--epoch -1] [--experts N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from datamodules.syn_set import SyntheticSet  # noqa: E402
from lightning_modules.tasks.evaluate_variants import teacher_logits  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", required=True, help="set file to label")
    parser.add_argument("--store", required=True, help="expert store (task=teacher folder)")
    parser.add_argument("--out", required=True, help="set file to write")
    parser.add_argument("--epoch", type=int, default=-1, help="expert snapshot (-1: the last)")
    parser.add_argument("--experts", type=int, default=None, help="experts averaged (all)")
    args = parser.parse_args(argv)
    syn = SyntheticSet.load(args.set)
    dm = SimpleNamespace(
        name=syn.dataset,
        zca=syn.pixel_transform.kind == "zca",
        channels=syn.images.shape[1],
        im_size=syn.images.shape[-1],
        num_classes=100 if syn.dataset == "cifar100" else 10,
    )
    cfg = OmegaConf.create(
        {
            "evaluate": {
                "ddranking": {
                    "teacher": args.store,
                    "teacher_epoch": args.epoch,
                    "teacher_experts": args.experts,
                }
            }
        }
    )
    logits, info = teacher_logits(cfg, dm, syn, syn.images)
    agree = float((logits.argmax(1) == syn.labels).float().mean())
    syn.soft_labels = logits
    syn.method = f"{syn.method}+soft_labels"
    syn.config = {**syn.config, "soft_labels_from": info}
    syn.save(args.out)
    print(f"wrote {args.out}: {len(logits)} soft labels from {info}; argmax = label for "
          f"{100 * agree:.1f} % of the images")  # fmt: skip
    return Path(args.out)


if __name__ == "__main__":
    main()
