"""PAD's expert curriculum: the reference's own selection code and scoring formula beside ours.

Nothing of the references is in this repository; they are read from local checkouts:

- ``--pad``: NUS-HPC-AI-Lab/PAD. ``buffer/buffer_CL.py``'s ``train()`` runs as written for its
  10 experts, its per-epoch choice of images recorded: ``epoch()`` (which would train) is
  replaced by a recorder, ``utils.utils_gsam`` (dataset/network helpers; its scipy import no
  longer exists) by stubs, and its hard-coded ``data_size_by_class = 5000`` by the per-class
  count of this small setting (in memory only). Our ``epoch_subset`` must pick the same images
  in every epoch from the same per-class order.
- ``--deepcore``: PatrickZH/DeepCore, whose GraNd made PAD's shipped ``data_indices`` orders.
  ``deepcore/methods/grand.py`` is loaded as written (its package, which needs torchvision for
  other nets, is stubbed down to the two names it imports). ``GraNd.finish_run`` (its
  per-example last-layer gradient norm) runs on the same trained ConvNet as our
  ``score_examples(..., "grand")``; the scores and the per-class orders (DeepCore's
  ``select(balance=True)`` sorts descending, PAD reads its rows easiest first) are compared.
  DeepCore's criterion averages over the batch, so its scores are ours divided by the batch
  size; ``--selection-batch`` sets it (the last batch is smaller when it does not divide N).
- PAD's shipped ``data_indices/CIFAR10_GraNd.pt`` (in the ``--pad`` checkout): the Spearman
  correlation, per class, of our scores with its positions on the same images (the first
  ``--per-class`` images of each class in ``data_batch_1``, global index = file order).

    OMP_NUM_THREADS=1 python benchmarks/pad_curriculum_reference.py --pad <PAD checkout> \\
        --deepcore <DeepCore checkout> --data-dir ../shared/data --per-class 30
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from datamodules.transforms import CIFAR_STATS  # noqa: E402
from lightning_modules.condense.curriculum import (  # noqa: E402
    easy_to_hard,
    epoch_subset,
    score_examples,
)
from lightning_modules.condense.experts import build_seeded, sgd_train  # noqa: E402
from lightning_modules.nets import build_classifier  # noqa: E402

README_ARGS = dict(  # PAD's README command for CIFAR-10 (buffer_CL.py)
    init_ratio=0.75, add_end_epoch=20, rm_epoch_first=40, rm_epoch_second=60,
    rm_easy_ratio_first=0.1, rm_easy_ratio_second=0.2, train_epochs=100,
)  # fmt: skip


def load_images(data_dir: Path, per_class: int):
    """The first ``per_class`` images of each class in data_batch_1, normalised like ours."""
    with open(data_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    labels = np.array(batch[b"labels"])
    keep = np.sort(np.concatenate([np.nonzero(labels == c)[0][:per_class] for c in range(10)]))
    x = torch.tensor(batch[b"data"][keep], dtype=torch.float32).view(-1, 3, 32, 32) / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_STATS["cifar10"])
    return (x - mean) / std, torch.tensor(labels[keep]), torch.tensor(keep)


def trained_net(x, y, epochs: int, seed: int = 0) -> nn.Module:
    net = build_seeded(lambda: build_classifier("convnet", num_classes=10, im_size=32), seed)
    g = torch.Generator().manual_seed(seed)
    return sgd_train(net, x, y, epochs=epochs, lr=0.01, batch_size=64, shuffle_generator=g)


# -- PAD buffer_CL.py ---------------------------------------------------------------------------
def reference_subsets(pad: Path, sorted_diff: torch.Tensor, labels: torch.Tensor) -> list:
    """The images buffer_CL.py's train() hands to ``epoch()`` in each epoch of its 10 experts."""
    sys.path[:0] = [str(pad), str(pad / "buffer")]
    seen: list[list[torch.Tensor]] = []
    stub = types.ModuleType("utils.utils_gsam")

    class TensorDataset(torch.utils.data.Dataset):
        def __init__(self, images, labels):
            self.images, self.labels = images, labels

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i], self.labels[i]

    def epoch(mode, dataloader, net, optimizer, criterion, args, aug, scheduler=None):
        if mode == "train":  # the images encode their own index
            seen[-1].append(dataloader.dataset.images.flatten(1)[:, 0].round().long())
        return 0.0, 0.0

    def get_network(model, channel, num_classes, im_size):
        seen.append([])  # a new expert
        return nn.Linear(2, num_classes)

    stub.get_dataset = stub.get_daparam = stub.ParamDiffAug = None
    stub.TensorDataset, stub.epoch, stub.get_network = TensorDataset, epoch, get_network
    sys.modules["utils.utils_gsam"] = stub
    path = pad / "buffer" / "buffer_CL.py"
    src = path.read_text()
    per_class = sorted_diff.shape[1]
    assert src.count("data_size_by_class = 5000") == 1
    src = src.replace("data_size_by_class = 5000", f"data_size_by_class = {per_class}")
    module = types.ModuleType("buffer_CL")
    module.__file__ = str(path)
    exec(compile(src, str(path), "exec"), module.__dict__)
    args = argparse.Namespace(
        **README_ARGS, model="ConvNet", lr_teacher=0.01, mom=0.0, l2=0.0, rho_max=0.01,
        rho_min=0.01, alpha=0.3, adaptive=True, device="cpu", batch_train=256,
        save_interval=10**6,
    )  # fmt: skip
    n = sorted_diff.numel()
    images_all = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2)
    trainloader = testloader = [(images_all[:1], labels[:1])]
    module.train(0, args, 1, 10, (2, 2), trainloader, images_all, labels, testloader, None,
                 sorted_diff)  # fmt: skip
    return seen


# -- DeepCore GraNd -----------------------------------------------------------------------------
class _Recorder(nn.Module):
    """DeepCore's EmbeddingRecorder: keeps the features the last layer reads."""

    def __init__(self):
        super().__init__()
        self.record_embedding, self.embedding = False, None

    def forward(self, x):
        if self.record_embedding:
            self.embedding = x
        return x


class _DeepCoreView(nn.Module):
    """Our ConvNet with the attributes DeepCore's GraNd reads."""

    def __init__(self, net):
        super().__init__()
        self.net, self.embedding_recorder = net, _Recorder()

    def get_last_layer(self):
        return self.net.classifier

    def forward(self, x):
        return self.net.classifier(self.embedding_recorder(self.net.embed(x)))


def _load_grand(deepcore: Path):
    """``deepcore/methods/grand.py`` as written; its package (which imports torchvision for
    other nets) is stubbed down to the two names the file imports."""
    import importlib.util

    for name in ("deepcore", "deepcore.methods", "deepcore.nets"):
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
    sys.modules["deepcore.methods.earlytrain"] = types.SimpleNamespace(EarlyTrain=object)
    sys.modules["deepcore.nets.nets_utils"] = types.SimpleNamespace(MyDataParallel=nn.DataParallel)
    path = deepcore / "deepcore" / "methods" / "grand.py"
    spec = importlib.util.spec_from_file_location("deepcore.methods.grand", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GraNd


def deepcore_grand(deepcore: Path, net, x, y, batch: int) -> torch.Tensor:
    GraNd = _load_grand(deepcore)

    method = object.__new__(GraNd)  # its __init__ wants a whole DeepCore run; finish_run does not
    method.model = _DeepCoreView(net)
    method.model_optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    method.criterion = nn.CrossEntropyLoss()  # what EarlyTrain.run sets (reduction: mean)
    method.dst_train = torch.utils.data.TensorDataset(x, y)
    method.n_train, method.cur_repeat = len(x), 0
    method.args = argparse.Namespace(selection_batch=batch, workers=0, device="cpu", num_classes=10)
    method.norm_matrix = torch.zeros(len(x), 1)
    method.finish_run()
    return method.norm_matrix[:, 0].double()


def spearman(a, b) -> float:
    ra, rb = (torch.argsort(torch.argsort(torch.as_tensor(v))).double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pad", type=Path, required=True)
    ap.add_argument("--deepcore", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=10, help="training epochs of the scoring net")
    ap.add_argument("--selection-batch", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    x, y, global_index = load_images(a.data_dir, a.per_class)
    net = trained_net(x, y, a.epochs)
    ours_grand = score_examples(net, x, y, "grand")
    ours_el2n = score_examples(net, x, y, "el2n")
    result = {"images": len(x), "per_class": a.per_class, "scoring_epochs": a.epochs}

    # buffer_CL.py's own per-epoch choice, from our el2n order (first: PAD's utils/ package must
    # be imported before DeepCore's utils.py is on the path)
    order = easy_to_hard(ours_el2n, y, 10)
    sorted_diff = torch.stack(order)
    seen = reference_subsets(a.pad, sorted_diff, y)
    kw = dict(init_ratio=0.75, add_end_epoch=20, rm_epochs=[40, 60], rm_easy_ratios=[0.1, 0.2])
    ours = [epoch_subset(order, e, **kw) for e in range(README_ARGS["train_epochs"])]
    same = all(
        torch.equal(torch.sort(ref).values, torch.sort(o).values)
        for expert in seen
        for ref, o in zip(expert, ours, strict=True)
    )
    result["buffer_cl"] = {
        "experts": len(seen),
        "epochs_per_expert": [len(e) for e in seen],
        "every_epoch_same_images": same,
        "sizes_first_25": [len(o) for o in ours[:25]],
        "sizes_at_40_41_60_61": [len(ours[e]) for e in (40, 41, 60, 61)],
    }

    # DeepCore's GraNd on the same net: whole set in one batch, and in --selection-batch batches
    for batch in (len(x), a.selection_batch):
        theirs = deepcore_grand(a.deepcore, net, x, y, batch)
        sizes = torch.tensor([min(batch, len(x) - i) for i in range(0, len(x), batch)])
        rescaled = theirs * torch.repeat_interleave(sizes, sizes).double()
        ours_order = easy_to_hard(ours_grand, y, 10)
        theirs_order = [  # DeepCore select(balance=True): per class, descending; reversed
            idx[np.argsort(theirs[idx].numpy())[::-1].copy()].flip(0)
            for idx in ((y == c).nonzero().flatten() for c in range(10))
        ]
        result[f"deepcore_batch_{batch}"] = {
            "max_rel_diff_after_batch_rescale": float(
                ((rescaled - ours_grand).abs() / ours_grand).max()
            ),
            "classes_with_identical_order": sum(
                torch.equal(o, t) for o, t in zip(ours_order, theirs_order, strict=True)
            ),
            "spearman_per_class_min": min(
                spearman(ours_grand[idx], theirs[idx])
                for idx in ((y == c).nonzero().flatten() for c in range(10))
            ),
        }

    # PAD's shipped order (DeepCore GraNd on all 50,000 images; network and epochs unknown)
    shipped = torch.load(a.pad / "data_indices" / "CIFAR10_GraNd.pt", weights_only=True)
    position = torch.empty(50000, dtype=torch.float64)
    for row in shipped:
        position[row] = torch.arange(len(row), dtype=torch.float64)
    for name, s in (("el2n", ours_el2n), ("grand", ours_grand)):
        rho = [
            spearman(s[idx], position[global_index[idx]])
            for idx in ((y == c).nonzero().flatten() for c in range(10))
        ]
        result[f"shipped_spearman_{name}"] = {"mean": float(np.mean(rho)), "per_class": rho}
    result["wall_s"] = time.perf_counter() - start
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
