"""The training "data" of methods that draw everything inside the step (DC, DSA, DM): the
iteration index. A resumed run continues at the trainer's restored ``global_step``."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset


class _Iterations(IterableDataset):
    def __init__(self, dm: IterationsDataModule):
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.iterations

    def __iter__(self):
        for t in range(self.dm.start_iteration(), self.dm.iterations):
            yield {"iteration": torch.tensor(t)}


class IterationsDataModule(L.LightningDataModule):
    """Yields ``{"iteration": t}`` for ``t`` = the restored step .. ``iterations - 1``."""

    def __init__(self, iterations: int):
        super().__init__()
        self.iterations = int(iterations)

    def start_iteration(self) -> int:
        return int(self.trainer.global_step) if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Iterations(self), batch_size=None, num_workers=0)
