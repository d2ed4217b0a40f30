"""Score a small training set: train fresh networks on it, report real test accuracy (plain torch).

The protocol of the dataset-distillation literature (DC/DSA/MTT): SGD with momentum 0.9 and
weight decay 5e-4, the set's learned lr, batch 256, lr / 10 about half way, DSA on every
batch, test accuracy on the whole real test split after the last epoch, mean ± std over
``num_eval`` networks per architecture. ``protocol="mtt"`` (default) follows MTT's
``evaluate_synset`` exactly (``epochs + 1`` epochs, a new optimiser at the decay); ``"half"`` is
the older schedule of this repository (see ``_Protocol``).

The set is tiny (IPC 10 of CIFAR-10 is 100 images: one batch per epoch), so the cost is launch
and Python overhead, not arithmetic. The set lives on the device (no DataLoader) and the
``num_eval`` networks of one architecture train together as one batched network
(``torch.func.stack_module_state`` + ``vmap``), which turns five small steps into one larger one.

Every network has its own ``torch.Generator`` (seeded from ``seed``, the net name and its index)
that drives its initialisation, its batch order and its DSA draws, in the same order on both
paths, so ``together=False`` trains the same networks one after another.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from lightning_modules.condense.dsa import DEFAULT_STRATEGY, DSA, to_device
from lightning_modules.condense.soft_labels import label_loss
from lightning_modules.errors import UserError
from lightning_modules.nets import CLASSIFIERS, build_classifier
from lightning_modules.utils.devices import resolve_device
from lightning_modules.utils.progress import progress_bar
from lightning_modules.utils.seeds import derive_seed

#: the lr of the coreset baselines and of real-data training in the field (sets without a lr)
DEFAULT_LR = 0.01


def check_net_names(nets: Sequence[str]) -> list[str]:
    """Normalised names; ``UserError`` listing the valid ones for an unknown name."""
    if isinstance(nets, str):
        nets = [nets]
    names = [str(n).lower().replace("-", "_") for n in nets]
    unknown = [n for n, key in zip(nets, names) if key not in CLASSIFIERS]
    if unknown:
        raise UserError(
            f"unknown net(s) {unknown} in evaluate.nets; valid: {', '.join(CLASSIFIERS)}"
        )
    if not names:
        raise UserError(f"evaluate.nets is empty; give a list such as [{', '.join(CLASSIFIERS)}]")
    return names


@torch.no_grad()
def init_parameters(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """PyTorch's default initialisation, drawn from ``generator`` instead of the global RNG.

    Conv and linear layers: weights kaiming-uniform(a=√5), biases U(±1/√fan_in); norms: 1 and 0.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif any(True for _ in m.parameters(recurse=False)):
            raise ValueError(f"init_parameters does not know how to initialise {type(m).__name__}")
    return module


def _fresh_net(
    name: str, channels: int, num_classes: int, im_size: int, generator, **options
) -> nn.Module:
    """A new network whose initial weights come from ``generator`` alone."""
    with torch.random.fork_rng(
        devices=[]
    ):  # the constructor's own init must not move the global RNG
        net = build_classifier(name, channels, num_classes, im_size, **options)
    return init_parameters(net, generator)


def _accuracy(correct: torch.Tensor, total: int) -> float:
    return 100.0 * float(correct) / max(1, total)


#: evaluation schedules (``evaluate.protocol``); see :class:`_Protocol`
PROTOCOLS = ("mtt", "half")
DEFAULT_PROTOCOL = "mtt"


class _Protocol:
    """The shared training schedule; the two paths below differ only in how they batch networks.

    ``protocol="mtt"`` is MTT's ``evaluate_synset`` (utils.py of the official code) step for step:
    ``epochs + 1`` training epochs (0 .. epochs), lr / 10 after epoch ``epochs // 2 + 1``, at which
    point the SGD optimiser is built anew (its momentum buffers start from zero), DSA on every
    training batch, the test after the last epoch. ``protocol="half"``: ``epochs`` epochs, lr / 10
    from epoch ``epochs // 2`` on (none for one epoch), one optimiser throughout (momentum kept):
    this repository's schedule before the MTT one became the default.
    """

    def __init__(
        self,
        *,
        lr,
        epochs,
        batch_size,
        momentum,
        weight_decay,
        dsa_strategy,
        eval_batch_size,
        protocol: str = DEFAULT_PROTOCOL,
        soft_temperature: float = 1.0,
    ):
        if protocol not in PROTOCOLS:
            raise UserError(
                f"evaluate.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}"
            )
        self.protocol = protocol
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.dsa = DSA(dsa_strategy)
        self.eval_batch_size = int(eval_batch_size)
        self.soft_temperature = float(soft_temperature)
        if protocol == "mtt":
            self.train_epochs = self.epochs + 1
            self.decay_epoch = self.epochs // 2 + 2  # the first epoch at lr / 10
        else:
            self.train_epochs = self.epochs
            self.decay_epoch = self.epochs // 2 if self.epochs > 1 else None

    def optimizer(self, params, epoch: int = 0) -> torch.optim.SGD:
        return torch.optim.SGD(
            params, lr=self.lr_at(epoch), momentum=self.momentum, weight_decay=self.weight_decay
        )

    def lr_at(self, epoch: int) -> float:
        decayed = self.decay_epoch is not None and epoch >= self.decay_epoch
        return self.lr * (0.1 if decayed else 1.0)

    def epoch_optimizer(self, opt: torch.optim.SGD, params, epoch: int) -> torch.optim.SGD:
        """The optimiser for ``epoch``: MTT builds a new one at the decay, ``half`` resets lr."""
        if self.protocol == "mtt" and epoch == self.decay_epoch:
            return self.optimizer(params, epoch)
        for group in opt.param_groups:
            group["lr"] = self.lr_at(epoch)
        return opt

    def report(self, epoch: int) -> bool:
        """Whether to read the loss back this epoch (about 50 times per run, and the last epoch)."""
        last = self.train_epochs - 1
        return epoch == last or epoch % max(1, self.train_epochs // 50) == 0

    def batches(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(n, generator=generator)
        return list(order.split(self.batch_size))

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.dsa(x, generator)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on hard labels ``[B]``, DATM's soft cross-entropy on label logits
        ``[B, C]`` (:func:`~lightning_modules.condense.soft_labels.soft_cross_entropy`)."""
        return label_loss(logits, labels, self.soft_temperature)


def _test_accuracy(net: nn.Module, proto: _Protocol, test_x, test_y) -> float:
    """Accuracy (%) of one network on the test split, in eval mode."""
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=test_x.device)
    step = proto.eval_batch_size
    with torch.no_grad():
        for start in range(0, len(test_x), step):
            x, y = test_x[start : start + step], test_y[start : start + step]
            correct += (net(x).argmax(-1) == y).sum()
    return _accuracy(correct, len(test_x))


def _test_accuracy_batched(base, params, buffers, proto: _Protocol, test_x, test_y) -> list:
    """Accuracies (%) of the ``M`` stacked networks, the test images split over them."""
    m = next(iter(params.values())).shape[0]
    base.eval()
    predict = vmap(
        lambda p, b, x: functional_call(base, (p, b), (x,)).argmax(-1), in_dims=(0, 0, None)
    )
    chunk = max(1, proto.eval_batch_size // m)
    correct = torch.zeros(m, dtype=torch.long, device=test_x.device)
    with torch.no_grad():
        for start in range(0, len(test_x), chunk):
            x, y = test_x[start : start + chunk], test_y[start : start + chunk]
            correct += (predict(params, buffers, x) == y).sum(1)
    return [_accuracy(c, len(test_x)) for c in correct.tolist()]


def _train_one_by_one(nets, gens, proto: _Protocol, images, labels, test_x, test_y, bar, task):
    accs, losses = [], []
    for net, g in zip(nets, gens):
        net.train()
        opt = proto.optimizer(net.parameters())
        for epoch in range(proto.train_epochs):
            opt = proto.epoch_optimizer(opt, net.parameters(), epoch)
            total, count = 0.0, 0
            for idx in proto.batches(len(images), g):
                idx = to_device(idx, images.device)
                x = proto.augment(images[idx], g)
                loss = proto.loss(net(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.detach() * len(idx), count + len(idx)
            # reading the loss waits for the device: only now and then
            info = f"loss {float(total) / count:.3f}" if proto.report(epoch) else None
            bar.update(task, advance=1, **({"status": info} if info else {}))
        losses.append(float(total) / count)
        accs.append(_test_accuracy(net, proto, test_x, test_y))
    return accs, losses


def _train_together(nets, gens, proto: _Protocol, images, labels, test_x, test_y, bar, task):
    params, buffers = stack_module_state(nets)  # [M, ...] per parameter; SGD is elementwise
    params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
    base = copy.deepcopy(nets[0]).to("meta")
    m = len(nets)

    def loss_fn(p, b, x, y):
        return proto.loss(functional_call(base, (p, b), (x,)), y)

    step = vmap(grad_and_value(loss_fn))
    leaves = list(params.values())
    opt = proto.optimizer(leaves)
    for epoch in range(proto.train_epochs):
        opt = proto.epoch_optimizer(opt, leaves, epoch)
        orders = [proto.batches(len(images), g) for g in gens]
        total = torch.zeros(m, device=images.device)
        for b in range(len(orders[0])):
            # [M, B]: each network its own order
            idx = to_device(torch.stack([o[b] for o in orders]), images.device)
            x = torch.stack([proto.augment(images[idx[i]], gens[i]) for i in range(m)])
            grads, loss = step(params, buffers, x, labels[idx])
            for leaf, name in zip(leaves, params):
                leaf.grad = grads[name]
            opt.step()
            total += loss.detach() * idx.shape[1]
        info = f"loss {float(total.mean()) / len(images):.3f}" if proto.report(epoch) else None
        bar.update(task, advance=1, **({"status": info} if info else {}))
    accs = _test_accuracy_batched(base, params, buffers, proto, test_x, test_y)
    # hand the trained weights back to the module objects (callers may inspect them)
    for i, net in enumerate(nets):
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(params[name][i])
    return accs, (total / len(images)).tolist()


def _check_arguments(images, lr, num_eval: int, epochs: int, indices, together, device):
    """``(indices, together, device)`` resolved; ``UserError`` for a bad setting."""
    if len(images) == 0:
        raise UserError("the set to evaluate is empty")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(
            f"evaluation lr must be a positive number, got {lr!r}; give evaluate.lr=<value>"
        )
    if num_eval < 1 or epochs < 1:
        raise UserError(
            f"evaluate.num_eval and evaluate.epochs must be >= 1 (got {num_eval}, {epochs})"
        )
    ks = list(range(num_eval)) if indices is None else [int(k) for k in indices]
    if not ks or any(not 0 <= k < num_eval for k in ks):
        raise ValueError(f"indices must be a non-empty subset of range({num_eval}), got {ks}")
    device = resolve_device(device)
    if together == "auto" or together is None:
        together = device.type == "cuda"
    elif not isinstance(together, bool):
        raise UserError(f"evaluate.together must be auto, true or false, got {together!r}")
    return ks, together, device


def arch_options(name: str, net_options: dict | None) -> dict:
    """The constructor options of architecture ``name`` from ``net_options`` (a whole net config
    with ``name``/``_target_`` is accepted too)."""
    options = dict((net_options or {}).get(name) or {})
    options.pop("name", None)
    options.pop("_target_", None)
    return options


def _build_nets(name, ks, seed, images, num_classes, options, device):
    """The networks ``ks`` of architecture ``name`` and their generators (init, order, DSA)."""
    channels, im_size = images.shape[1], images.shape[-1]
    gens = [torch.Generator().manual_seed(derive_seed(seed, name, k)) for k in ks]
    models = [
        _fresh_net(name, channels, num_classes, im_size, g, **options).to(device) for g in gens
    ]
    return models, gens


def _train_nets(name, models, gens, proto, together, data, bar):
    """Train and test the networks of one architecture: ``(accs, losses, seconds)``."""
    images, labels, test_x, test_y = data
    batched = together and len(models) > 1 and not any(True for _ in models[0].buffers())
    task = bar.add_task(
        f"evaluate {name} x{len(models)} ({'together' if batched else 'one by one'})",
        total=proto.train_epochs * (1 if batched else len(models)),
        status="",
    )
    start = time.perf_counter()
    train = _train_together if batched else _train_one_by_one
    accs, losses = train(models, gens, proto, images, labels, test_x, test_y, bar, task)
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return accs, losses, time.perf_counter() - start


def _score(accs, losses, seconds, options, params) -> dict:
    """One architecture's entry of the result."""
    return {
        "accs": accs,
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "train_loss": losses,
        "seconds": seconds,
        "options": options,
        "params": params,
    }


def evaluate_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    nets: list[str],
    num_classes: int,
    lr: float,
    num_eval: int = 5,
    epochs: int = 1000,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    dsa_strategy: str = DEFAULT_STRATEGY,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
    together: bool | str = "auto",
    eval_batch_size: int = 1000,
    return_nets: bool = False,
    net_options: dict[str, dict] | None = None,
    indices: Sequence[int] | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    soft_temperature: float = 1.0,
) -> dict:
    """Train ``num_eval`` fresh networks per architecture on (images, labels); test on real data.

    Args:
        images, labels: the training set, ``[N, C, H, W]`` in model input space and ``[N]``
            class indices, or ``[N, classes]`` float label logits (soft labels: trained with
            DATM's soft cross-entropy at ``soft_temperature``, see ``condense.soft_labels``).
        test_x, test_y: the real test split in the same input space.
        nets: architecture names (``convnet``, ``alexnet``, ``vgg11``, ``resnet18``,
            ``resnet18_ap``).
        lr: learning rate (the set's learned lr for distilled sets).
        epochs: MTT's ``epoch_eval_train``: ``protocol="mtt"`` trains ``epochs + 1`` epochs.
        protocol: ``mtt`` (MTT's ``evaluate_synset``) or ``half`` (see :class:`_Protocol`).
        together: ``True`` trains the ``num_eval`` networks of one architecture as one
            ``vmap``-batched network, ``False`` one after another with the same randomness (the
            same networks up to float rounding); ``"auto"`` (default) picks the faster as measured:
            together on CUDA (1.3x on an H100), one by one on CPU (vmap's grouped convolutions
            are 2.4x slower there).
        return_nets: also return the trained modules under ``"_nets"`` (for tests/inspection).
        net_options: constructor options per architecture name, e.g. ``{"convnet": {"width":
            32}}`` to evaluate on the ConvNet the experts used; default: the standard networks.
        indices: which of the ``num_eval`` networks per architecture to train (default all).
            Network ``k`` draws everything from ``derive_seed(seed, net, k)``, so a subset
            trains the very networks a full call would (how runs are split across DDP ranks
            and resumed).

    Returns:
        ``{net: {"accs": [% per network], "mean": %, "std": % (population), "train_loss": [...],
        "seconds": wall time, "options": constructor options, "params": parameter count}}``.
    """
    names = check_net_names(nets)
    ks, together, device = _check_arguments(images, lr, num_eval, epochs, indices, together, device)
    images = images.detach().to(device, torch.float32)
    soft = labels.dim() == 2  # learned label logits [N, classes]
    labels = labels.detach().to(device, torch.float32 if soft else torch.long)
    test_x, test_y = test_x.to(device, torch.float32), test_y.to(device, torch.long)
    data = (images, labels, test_x, test_y)
    proto = _Protocol(
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        dsa_strategy=dsa_strategy,
        eval_batch_size=eval_batch_size,
        protocol=protocol,
        soft_temperature=soft_temperature,
    )
    results: dict = {}
    trained: dict = {}
    with progress_bar(progress) as bar:
        for name in names:
            options = arch_options(name, net_options)
            models, gens = _build_nets(name, ks, seed, images, num_classes, options, device)
            accs, losses, seconds = _train_nets(name, models, gens, proto, together, data, bar)
            params = sum(p.numel() for p in models[0].parameters())
            results[name] = _score(accs, losses, seconds, options, params)
            trained[name] = models
    if return_nets:
        results["_nets"] = trained
    return results


def results_markdown(results: dict, title: str = "") -> str:
    """A markdown table: one row per network, accuracy mean ± std over its runs, and the
    network's parameter count and constructor options when the results carry them."""
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| net | test accuracy (%) | runs | per run | params | options |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        runs = ", ".join(f"{a:.2f}" for a in r["accs"])
        params = f"{r['params']:,}" if r.get("params") is not None else ""
        options = ", ".join(f"{k}={v}" for k, v in sorted((r.get("options") or {}).items()))
        lines.append(
            f"| {name} | {r['mean']:.2f} ± {r['std']:.2f} | {len(r['accs'])} | {runs} "
            f"| {params} | {options or 'default'} |"
        )
    return "\n".join(lines) + "\n"
