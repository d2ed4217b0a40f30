"""The reference DATM / PAD code beside the project's, on the same inputs (measuring aid).

Runs the reference script's own ``main()`` (``distill/DATM.py``, ``PAD.py`` or ``PAD_depth.py``
of a local checkout of NUS-HPC-AI-Lab/DATM or NUS-HPC-AI-Lab/PAD; nothing of it is in this
repository) and the project's trajectory-matching code on the same experts, initial images,
labels, lr, start epoch, permutations and augmentation draws:

- one iteration (default): the loss and the gradients of images, label logits and lr, and the
  initial soft labels, compared;
- ``--paired N``: N + 1 iterations of each (the reference's own random draws, the project's own),
  from the same initial images/labels/lr and experts, then every set scored by the reference's
  own evaluator (``evaluate_synset``, soft-label criterion, 3 networks).

The reference source is patched in memory only: its cuda:0 label network goes to the CPU and, for
``--dtype 64``, its float32 image buffer becomes float64. The driver feeds data in and reads
results out (``get_dataset`` -> the project's tensors, ``wandb`` -> a recorder, the optimisers
record gradients / keep the learned tensors, ``torch.randperm`` -> a seeded generator in the
one-iteration check). torchvision and yacs, which the reference imports but this path never uses,
are stubbed.

    OMP_NUM_THREADS=1 python train.py task=teacher dataset.data_dir=<cifar> dataset.zca=false \\
        dataset.train_per_class=200 dataset.test_per_class=20 teacher.epochs=3 \\
        teacher.num_experts=2 teacher.out=<store>
    OMP_NUM_THREADS=1 python benchmarks/datm_pad_reference.py --reference <DATM checkout> \\
        --script DATM --store <store> --data-dir <cifar> --dtype 64 --dsa project
    ... --reference <PAD checkout> --script PAD_depth ...   (PAD_depth.py: from the PAD history)
    ... --script DATM --dtype 32 --dsa reference --paired 100
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
import lightning as L  # noqa: E402  (before the torchvision stub: torchmetrics probes for it)

from datamodules.expert_pairs import ExpertPairsDataModule  # noqa: E402
from datamodules.trajectories import ExpertStore  # noqa: E402
from lightning_modules.condense.datm import expert_label_logits  # noqa: E402
from lightning_modules.condense.dsa import DSA  # noqa: E402
from lightning_modules.condense.matching import matching_loss, selection_mask  # noqa: E402
from lightning_modules.condense.unroll import classifier_loss, student_unroll  # noqa: E402
from lightning_modules.distillation import DistillationModule  # noqa: E402
from lightning_modules.nets import FlatParams, build_classifier  # noqa: E402

STRATEGY = "color_crop_cutout_flip_scale_rotate"
SELECT = {"PAD": {"loss_ratio": 0.5}, "PAD_depth": {"depth_ratio": 0.5}}


def load_reference(root: Path, script: str, bits: int):
    """The reference script as a module (in-memory patches only)."""
    sys.path[:0] = [str(root), str(root / "distill")]
    tv = types.ModuleType("torchvision")
    tv.datasets, tv.transforms = types.ModuleType("d"), types.ModuleType("t")
    tv.utils = types.SimpleNamespace(make_grid=lambda *a, **k: None)
    sys.modules.update(
        {"torchvision": tv, "torchvision.utils": tv.utils, "torchvision.datasets": tv.datasets,
         "torchvision.transforms": tv.transforms}
    )  # fmt: skip
    cfg = types.ModuleType("utils.cfg")
    cfg.CFG = types.SimpleNamespace(Initialize_Label_With_Another_Model=False)
    sys.modules["utils.cfg"] = cfg
    path = root / "distill" / f"{script}.py"
    src = path.read_text().replace('torch.device("cuda:0")', '"cpu"')
    if bits == 64:
        src = src.replace("dtype=torch.float)", "dtype=torch.float64)")
    ref = types.ModuleType(script)
    ref.__file__ = str(path)
    exec(compile(src, str(path), "exec"), ref.__dict__)
    return ref


class Recorder:
    """Stands in for wandb and the reference's SGD: logged values, initial and live tensors,
    the gradients at each ``step()``."""

    def __init__(self, ref, dtype):
        self.logged, self.init, self.live, self.grads = {}, [], [], []
        rec = self

        class Wandb:
            class config:
                _items = {}

            run = types.SimpleNamespace(name="side-by-side")

            @staticmethod
            def init(config=None, **k):
                Wandb.config._items = dict(vars(config))

            @staticmethod
            def log(d, step=None):
                rec.logged.update(d)

            finish = staticmethod(lambda: None)
            Settings = Histogram = Image = staticmethod(lambda *a, **k: None)

        base = torch.optim.SGD

        class SGD(base):
            def __init__(self, params, lr, momentum=0, **kw):
                params = list(params)
                super().__init__(params, lr=lr, momentum=momentum, **kw)
                rec.init.append(params[0].detach().clone())
                rec.live.append(params[0])

            def step(self):
                rec.grads.append(self.param_groups[0]["params"][0].grad.clone())
                return super().step()

        self.base_sgd, self.sgd = base, SGD
        ref.wandb = Wandb
        ref.get_eval_pool = lambda *a: ["ConvNet"]
        ref.manual_seed = lambda seed=0: (np.random.seed(seed), random.seed(seed))


def reference_args(a, buffer_path: str, iterations: int) -> types.SimpleNamespace:
    paired = iterations > 0
    return types.SimpleNamespace(
        cfg="", dataset="CIFAR10", subset="imagenette", model="ConvNet", eval_mode="S",
        num_eval=1, eval_it=10**9, epoch_eval_train=1, Iteration=iterations, lr_init=0.01,
        batch_real=256, batch_syn=None, batch_train=256, pix_init="samples_predicted_correctly",
        dsa=True, dsa_strategy=STRATEGY, data_path="", buffer_path=buffer_path, zca=False,
        load_all=False, no_aug=a.dsa == "off", texture=False, canvas_size=2, canvas_samples=1,
        max_files=None, max_experts=None, force_save=False, ema_decay=0.999, Momentum_y=0.9,
        project="x", name="x", record_loss=False, skip_first_eva=True, parall_eva=True,
        res=32, device=[0], Initialize_Label_With_Another_Model=False, Initialize_Label_Model="",
        Initialize_Label_Model_Dir="", Label_Model_Timestamp=-1, loss_ratio=0.5,
        depth_ratio=0.5, loss_threshold_low=0.0, init_frozen="start",
        ipc=1 if paired else 2, syn_steps=10 if paired else 5, expert_epochs=1,
        min_start_epoch=0, max_start_epoch=2 if paired else 1,
        Sequential_Generation=paired, current_max_start_epoch=1, expansion_end_epoch=50,
        lr_img=100.0, lr_lr=1e-7 if paired else 1e-5, lr_teacher=0.01,
        lr_y=5.0 if paired else 2.0, threshold=1.1 if paired else 100.0,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, required=True, help="DATM or PAD checkout")
    p.add_argument("--script", choices=["DATM", "PAD", "PAD_depth"], default="DATM")
    p.add_argument("--store", required=True, help="a project expert store (no ZCA, convnet)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--dtype", type=int, choices=[32, 64], default=64)
    p.add_argument("--dsa", choices=["off", "reference", "project"], default="project")
    p.add_argument("--paired", type=int, default=0, help="iterations of a paired run (0: one)")
    a = p.parse_args()
    dtype = torch.float64 if a.dtype == 64 else torch.float32
    torch.set_default_dtype(dtype)
    dm = cifar(a.data_dir, a.train_per_class)
    ref = load_reference(a.reference, a.script, a.dtype)
    rec = Recorder(ref, dtype)
    experts = [ExpertStore(a.store).load(i) for i in ExpertStore(a.store).indices()]
    net = build_classifier("convnet", channels=3, num_classes=10, im_size=32).to(dtype)
    layout = FlatParams(net)
    buffer_root = Path(tempfile.mkdtemp())
    write_buffer(buffer_root / "CIFAR10_NO_ZCA" / "ConvNet", experts, layout, dtype)
    train_x, train_y = dm.train_x.to(dtype), dm.train_y

    def get_dataset(*args, **kw):
        train = [(train_x[i], int(train_y[i])) for i in range(len(train_x))]
        ident = {c: c for c in range(10)}
        return 3, (32, 32), 10, list(range(10)), None, None, train, None, None, None, ident, ident

    seed_dsa, perm = 1234, torch.Generator().manual_seed(99)
    ref_get_network, project_dsa = ref.get_network, DSA()

    def get_network(*args, **kw):
        out = ref_get_network(*args, **kw).to(dtype)  # the reference's ConvNet; it reseeds torch
        if not a.paired:
            torch.manual_seed(seed_dsa)  # the student net is built right before the unroll
        return out

    ref.get_dataset, ref.get_network = get_dataset, get_network
    if a.dsa == "project":
        ref.DiffAugment = lambda x, strategy, param=None: project_dsa(x, perm)
    args = reference_args(a, str(buffer_root), a.paired)
    randperm = torch.randperm
    if not a.paired:
        torch.randperm = lambda n, *x, **k: randperm(n, generator=perm)
    ref.torch.optim.SGD = rec.sgd
    tic = time.perf_counter()
    try:
        ref.main(args)
    finally:
        torch.randperm, torch.optim.SGD = randperm, rec.base_sgd
    ref_s = time.perf_counter() - tic
    images0, lr0, labels0 = rec.init  # created in the order images, lr, labels
    hard = torch.arange(10).repeat_interleave(args.ipc)

    def logits_fn(theta, x):
        return layout.call(net, theta, x)

    finals = [ex.params(ex.epochs).to(dtype) for ex in experts]
    ours_init = expert_label_logits(logits_fn, finals, images0, hard, only_correct=True)
    out = {"script": a.script, "dtype": a.dtype, "dsa": a.dsa, "reference_s": round(ref_s, 1)}
    out["initial_labels_rel"] = rel(ours_init, labels0)
    if a.paired:
        out.update(paired(a, ref, rec, net, experts, images0, labels0, lr0, dm, args))
    else:
        out.update(one_iteration(a, ref, rec, net, layout, experts, images0, labels0, lr0, args))
    print(json.dumps(out, indent=1))


def one_iteration(a, ref, rec, net, layout, experts, images0, labels0, lr0, args) -> dict:
    g_y, g_img, g_lr = rec.grads  # the reference steps labels, images, lr in that order
    ref_loss = float(rec.logged["Grand_Loss"])
    start_epoch = int(rec.logged["Start_Epoch"])
    param = ref.ParamDiffAug()
    rows = []
    for index, ex in enumerate(experts):  # the reference shuffles its expert order: try each
        torch.manual_seed(1234)
        images, labels = images0.clone().requires_grad_(), labels0.clone().requires_grad_()
        lr = lr0.clone().requires_grad_()
        start = ex.params(start_epoch).to(images0.dtype)
        target = ex.params(start_epoch + 1).to(images0.dtype)
        augment = {
            "off": None,
            "project": DSA(),
            "reference": lambda x, g: ref.DiffAugment(x, STRATEGY, param=param),
        }[a.dsa]
        end = student_unroll(
            classifier_loss(net, layout, soft=True), start, images, labels, lr,
            steps=args.syn_steps, batch_syn=None, augment=augment,
            generator=torch.Generator().manual_seed(99),
        )  # fmt: skip
        mask = selection_mask(end, target, **SELECT.get(a.script, {}))
        loss = matching_loss(end, start, target, mask)
        gi, gy, gl = torch.autograd.grad(loss, [images, labels, lr])
        err = (end.detach() - target).pow(2).float().sort().values
        cut = int(0.5 * err.numel())
        ties = int((err == err[cut]).sum()) if err[cut - 1] == err[cut] else 1
        rows.append({
            "expert": index, "start_epoch": start_epoch, "loss_ours": float(loss.detach()),
            "loss_reference": ref_loss, "loss_rel": abs(float(loss.detach()) - ref_loss) / ref_loss,
            "grad_images_rel": rel(gi, g_img), "grad_labels_rel": rel(gy, g_y),
            "grad_lr_rel": rel(gl.reshape(()), g_lr.reshape(())), "ties_at_half_cut": ties,
        })  # fmt: skip
    return min(rows, key=lambda r: r["loss_rel"])


def paired(a, ref, rec, net, experts, images0, labels0, lr0, dm, args) -> dict:
    iterations = a.paired + 1  # the reference's loop runs Iteration + 1 times
    module = DistillationModule(
        net, images0, torch.arange(10).repeat_interleave(args.ipc), lr_teacher=float(lr0),
        lr_img=args.lr_img, lr_lr=args.lr_lr, momentum=0.5, eps=0.0, syn_steps=args.syn_steps,
        batch_syn=None, dsa=DSA(), lr_floor=-1e9, seed=0, label_logits=labels0,
        lr_y=args.lr_y, momentum_y=args.Momentum_y, threshold=args.threshold,
        **SELECT.get(a.script, {}),
    )  # fmt: skip
    pairs = ExpertPairsDataModule(
        a.store, expert_epochs=1, max_start_epoch=args.max_start_epoch, iterations=iterations,
        seed=0, min_start_epoch=0, current_max_start_epoch=args.current_max_start_epoch,
        expansion_end_epoch=args.expansion_end_epoch,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=iterations, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(),
    )  # fmt: skip
    tic = time.perf_counter()
    trainer.fit(module, datamodule=pairs)
    sets = {
        "initial": (images0, lr0, labels0),
        "reference": tuple(t.detach().clone() for t in rec.live),
        "project": (module.images.detach(), module.syn_lr.detach(), module.label_logits.detach()),
    }
    out = {"iterations": iterations, "project_s": round(time.perf_counter() - tic, 1)}
    out["project_threshold_skips"] = module.threshold_skips
    test = torch.utils.data.TensorDataset(dm.test_x, dm.test_y)
    loader = torch.utils.data.DataLoader(test, batch_size=256, shuffle=False)
    eargs = types.SimpleNamespace(
        parall_eva=True, device="cpu", epoch_eval_train=300, batch_train=256, dataset="CIFAR10",
        dsa=True, dsa_strategy=STRATEGY, dsa_param=ref.ParamDiffAug(), lr_net=0.01,
    )  # fmt: skip

    def soft_ce(inputs, target):  # the reference's SoftCrossEntropy
        log_p = -torch.nn.functional.log_softmax(inputs, dim=1)
        return torch.sum(log_p * torch.nn.functional.softmax(target, dim=1)) / inputs.shape[0]

    for name, (images, lr, labels) in sets.items():
        accs = []
        for k in range(3):
            net_eval = ref.get_network("ConvNet", 3, 10, (32, 32), dist=False)
            torch.manual_seed(100 + k)
            eargs.lr_net = float(lr)
            _, _, acc = ref.evaluate_synset(
                k, net_eval, images.clone(), labels.clone(), loader, eargs, train_criterion=soft_ce
            )
            accs.append(100 * acc)
        out[name] = {"lr": float(lr), "acc": accs, "mean": float(np.mean(accs))}
        out[name]["std"] = float(np.std(accs))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def write_buffer(folder: Path, experts, layout, dtype) -> None:
    """The experts in the references' buffer format: a list of trajectories, each a list of
    snapshots, each a list of per-parameter tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = []
    for e in experts:
        snaps = []
        for epoch in range(e.epochs + 1):
            chunks = e.params(epoch).to(dtype).split(layout.sizes)
            snaps.append([c.view(s).clone() for c, s in zip(chunks, layout.shapes)])
        buffer.append(snaps)
    torch.save(buffer, folder / "replay_buffer_0.pt")


def cifar(data_dir: str, train_per_class: int):
    """The project's CIFAR-10: a class-balanced train subset, the full test set, no ZCA."""
    from hydra import compose, initialize_config_dir

    from lightning_modules.tasks.common import build_datamodule

    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "task=teacher", f"dataset.data_dir={data_dir}", "dataset.download=false",
                "dataset.zca=false", f"dataset.train_per_class={train_per_class}",
                f"paths.cache_dir={tempfile.mkdtemp()}",
            ],
        )  # fmt: skip
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup()
    return dm


if __name__ == "__main__":
    main()
