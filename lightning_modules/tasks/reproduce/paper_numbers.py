"""Published test accuracies (%) that ``task=reproduce`` prints beside its own measurements.

Source: G. Li, R. Togo, T. Ogawa, M. Haseyama, "Dataset Distillation Using Parameter Pruning",
IEICE Trans. Fundamentals E107-A(6), 2024 (Table I: ConvNet-3; Table III: cross-architecture,
CIFAR-10 IPC 10). The baselines in Table I are the numbers the paper quotes from their own papers.
The MTT family reports the best evaluation over checkpoints chosen on the test set; the numbers
measured here are final-checkpoint numbers (see docs/results/index.md).

Method keys: ``random``, ``forgetting``, ``herding`` (coresets), ``dsa``, ``dm``, ``cafe``
(CAFE+DSA), ``kip`` (Table II: KIP sets evaluated on a ConvNet of width 128, the width of the
row; width 1024 in :data:`KIP_TABLE2`) (other distillation methods), ``mtt`` (trajectory
matching, ε = 0), ``pruning`` (MTT with parameter pruning, the paper's method), and ``full``
(the whole training set, per dataset).
"""

from __future__ import annotations

SOURCE = "Li et al., Dataset Distillation Using Parameter Pruning, IEICE Trans. Fundamentals 2024"

#: Table I, ConvNet-3 test accuracy (%) per (dataset, ipc) and method
TABLE1: dict[tuple[str, int], dict[str, float]] = {
    ("cifar10", 1): dict(random=14.4, forgetting=13.5, herding=21.5, dsa=28.8, dm=26.0, cafe=31.6, mtt=46.3, pruning=46.4),  # noqa: E501
    ("cifar10", 10): dict(random=26.0, forgetting=23.3, herding=31.6, dsa=52.1, dm=48.9, cafe=50.9, mtt=65.3, pruning=65.5),  # noqa: E501
    ("cifar10", 50): dict(random=43.4, forgetting=23.3, herding=40.4, dsa=60.6, dm=63.0, cafe=62.3, mtt=71.6, pruning=71.9),  # noqa: E501
    ("cifar100", 1): dict(random=4.2, forgetting=4.5, herding=8.4, dsa=13.9, dm=11.4, cafe=14.0, mtt=24.3, pruning=24.6),  # noqa: E501
    ("cifar100", 10): dict(random=14.6, forgetting=15.1, herding=17.3, dsa=32.3, dm=29.7, cafe=31.5, mtt=40.1, pruning=43.1),  # noqa: E501
    ("cifar100", 50): dict(random=30.0, forgetting=30.5, herding=33.7, dsa=42.8, dm=43.6, cafe=42.9, mtt=47.7, pruning=48.4),  # noqa: E501
}  # fmt: skip

#: Table II, KIP sets (paper's kernel: infinite-width ConvNet) evaluated on a ConvNet of width
#: 128 and 1024 (%); CIFAR-100 IPC 50 not reported
KIP_TABLE2: dict[tuple[str, int], dict[int, float]] = {
    ("cifar10", 1): {128: 38.3, 1024: 49.9},
    ("cifar10", 10): {128: 57.6, 1024: 62.7},
    ("cifar10", 50): {128: 65.8, 1024: 68.6},
    ("cifar100", 1): {128: 18.2, 1024: 15.7},
    ("cifar100", 10): {128: 32.8, 1024: 28.3},
}

#: Table I, ConvNet-3 trained on the whole training set (%)
FULL: dict[str, float] = {"cifar10": 84.8, "cifar100": 56.2}

#: Table III, CIFAR-10 IPC 10 sets evaluated on other architectures (%)
CROSS_ARCH_SETTING: tuple[str, int] = ("cifar10", 10)
CROSS_ARCH: dict[str, dict[str, float]] = {
    "pruning": dict(convnet=65.4, alexnet=35.8, vgg11=52.9, resnet18=51.8),
    "mtt": dict(convnet=64.3, alexnet=34.2, vgg11=50.3, resnet18=46.4),
}
CROSS_ARCH_NETS: tuple[str, ...] = ("convnet", "alexnet", "vgg11", "resnet18")


#: DATM and PAD, ConvNet-3, as their own papers report them (learned soft labels in evaluation):
#: the ``acc_soft`` columns of a row (REFERENCE.md section C)
SOFT_LABEL_SOURCES: dict[str, str] = {
    "datm": "Guo et al., Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory "
    "Matching, ICLR 2024",
    "pad": "Li et al., Prioritize Alignment in Dataset Distillation, 2024",
}
SOFT_LABEL_ROWS: dict[tuple[str, int], dict[str, float]] = {
    ("cifar10", 1): dict(datm=46.9, pad=47.2),
    ("cifar10", 10): dict(datm=66.8, pad=67.4),
    ("cifar10", 50): dict(datm=76.1, pad=77.0),
    ("cifar100", 1): dict(datm=27.9, pad=28.4),
    ("cifar100", 10): dict(datm=47.2, pad=47.8),
    ("cifar100", 50): dict(datm=55.0, pad=55.9),
}


def published_row(dataset: str, ipc: int, methods=None) -> dict[str, float]:
    """:func:`table1` plus the DATM and PAD numbers of their own papers (soft labels), those of
    ``methods`` only when given."""
    row = table1(dataset, ipc)
    soft = SOFT_LABEL_ROWS.get((str(dataset), int(ipc)), {})
    row.update({m: v for m, v in soft.items() if methods is None or m in methods})
    return row


def table1(dataset: str, ipc: int) -> dict[str, float]:
    """Published Table I numbers for ``dataset`` at ``ipc``, ``full`` and KIP (Table II, width
    128) included; {} when none."""
    row = dict(TABLE1.get((str(dataset), int(ipc)), {}))
    kip = KIP_TABLE2.get((str(dataset), int(ipc)))
    if row and kip:  # the KIP column: Table II at the row's ConvNet width, 128
        row["kip"] = kip[128]
    if row and dataset in FULL:
        row["full"] = FULL[dataset]
    return row


def cross_arch(dataset: str, ipc: int) -> dict[str, dict[str, float]]:
    """Published Table III numbers (method -> net -> %) when (dataset, ipc) is its setting."""
    if (str(dataset), int(ipc)) != CROSS_ARCH_SETTING:
        return {}
    return {method: dict(nets) for method, nets in CROSS_ARCH.items()}
