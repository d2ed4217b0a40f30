"""In-memory tensor datasets that hand out whole batches with one gather.

CIFAR fits in memory as a uint8/float tensor; per-image Python transforms would dominate a
training step on a CPU. ``DataLoader`` calls ``__getitems__`` with a list of indices, so a batch
is one ``index_select`` and the distributed sampler Lightning injects under DDP still works.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def _identity(batch):
    return batch


class TensorBatches(Dataset):
    """A dataset over aligned tensors whose batches are built by one gather per tensor."""

    def __init__(self, *tensors: torch.Tensor):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("TensorBatches needs tensors of one common length")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int):
        items = tuple(t[index] for t in self.tensors)
        return items if len(items) > 1 else items[0]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        items = tuple(t.index_select(0, idx) for t in self.tensors)
        return items if len(items) > 1 else items[0]


def batch_loader(
    *tensors: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``TensorBatches`` with a seeded shuffle and no per-sample collation."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorBatches(*tensors),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=generator,
        collate_fn=_identity,
        num_workers=0,
    )
