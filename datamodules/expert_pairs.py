"""The training data of distillation: (expert, start epoch) pairs drawn from an expert store.

Iteration t of rank r draws expert e uniformly from the store and a start epoch i uniformly from
``0 .. max_start_epoch - 1`` (MTT's sampling; DATM's window ``min_start_epoch .. upper(t) - 1``
when given, its upper bound rising with t), and yields the expert's θ_i (start) and
θ_{i+K} (target, K = ``expert_epochs``). The draw is a pure function of (seed, rank, t):

- under DDP every rank samples its own trajectory (seed + rank stream), and a test can name
  exactly which pairs two ranks drew;
- a resumed run continues the same sequence: the stream starts at the trainer's ``global_step``
  (restored from the checkpoint before the loader is iterated), so nothing is replayed or lost.

>>> dm = ExpertPairsDataModule("trajectories/cifar10-zca/convnet", expert_epochs=2,
...                            max_start_epoch=20, iterations=5000, seed=0)
>>> dm.setup(); dm.pair(iteration=0, rank=0)["start_epoch"]
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.trajectories import Expert, ExpertStore
from lightning_modules.condense.datm import start_epoch_upper
from lightning_modules.errors import UserError
from lightning_modules.utils.seeds import derive_seed


class _PairStream(IterableDataset):
    """Pairs for iterations ``start() .. iterations - 1``; ``len`` is the whole run's length."""

    def __init__(self, dm: ExpertPairsDataModule, rank: int):
        self.dm, self.rank = dm, rank

    def __len__(self) -> int:
        return self.dm.iterations

    def __iter__(self):
        for t in range(self.dm.start_iteration(), self.dm.iterations):
            yield self.dm.pair(t, self.rank)


class _PairLoader(DataLoader):
    """The pair stream's loader. Its position is the trainer's ``global_step`` (restored from the
    checkpoint), so it is resumable by construction; the ``state_dict`` interface says so to
    Lightning (which otherwise warns that a mid-epoch resume is unreliable)."""

    def state_dict(self) -> dict:
        return {"resumes_at": "trainer.global_step"}

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # nothing to restore: _PairStream starts at the restored global_step


class ExpertPairsDataModule(L.LightningDataModule):
    """(expert, start epoch) pairs with their start and target parameter vectors.

    Args:
        store: folder of an :class:`~datamodules.trajectories.ExpertStore`.
        expert_epochs: K, epochs between start and target.
        max_start_epoch: start epochs are drawn from ``0 .. max_start_epoch - 1``.
        iterations: length of the distillation run.
        seed: base seed; rank r's stream is derived from (seed, r, iteration).
        max_experts: use only the first ``max_experts`` experts of the store (None: all).
        min_start_epoch: lowest start epoch (DATM; 0 for MTT).
        current_max_start_epoch / expansion_end_epoch: DATM's rising window: the exclusive upper
            bound starts at ``current_max_start_epoch`` and reaches ``max_start_epoch`` at
            iteration ``expansion_end_epoch`` (:func:`~lightning_modules.condense.datm.
            start_epoch_upper`); None: the bound is ``max_start_epoch`` throughout.

    Each item is a dict: ``iteration``, ``expert``, ``start_epoch`` (int64 scalars), ``start``
    θ_i and ``target`` θ_{i+K} (float32 ``[P]``).
    """

    def __init__(
        self,
        store: str,
        expert_epochs: int,
        max_start_epoch: int,
        iterations: int,
        seed: int = 0,
        max_experts: int | None = None,
        min_start_epoch: int = 0,
        current_max_start_epoch: int | None = None,
        expansion_end_epoch: int | None = None,
    ):
        super().__init__()
        self.store = ExpertStore(store)
        self.expert_epochs = int(expert_epochs)
        self.max_start_epoch = int(max_start_epoch)
        self.iterations = int(iterations)
        self.seed = int(seed)
        self.max_experts = max_experts
        self.min_start_epoch = int(min_start_epoch)
        self.current_max_start_epoch = current_max_start_epoch
        self.expansion_end_epoch = expansion_end_epoch
        self.experts: list[int] = []
        self._loaded: dict[int, Expert] = {}
        if self.expert_epochs < 1 or self.max_start_epoch < 1:
            raise UserError(
                f"distill.expert_epochs ({expert_epochs}) and distill.max_start_epoch "
                f"({max_start_epoch}) must be at least 1"
            )
        lowest = (
            self.max_start_epoch if current_max_start_epoch is None else current_max_start_epoch
        )
        if not 0 <= self.min_start_epoch < int(lowest) <= self.max_start_epoch:
            raise UserError(
                f"start epochs: need 0 <= method.min_start_epoch ({min_start_epoch}) < "
                f"method.current_max_start_epoch ({current_max_start_epoch}) <= "
                f"distill.max_start_epoch ({max_start_epoch})"
            )
        if current_max_start_epoch is not None and int(expansion_end_epoch or 0) < 1:
            raise UserError(
                f"method.expansion_end_epoch={expansion_end_epoch}: the rising start window "
                "needs a positive number of iterations"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.experts:
            return
        indices = self.store.indices()
        if self.max_experts:
            indices = indices[: int(self.max_experts)]
        if not indices:
            raise UserError(
                f"no expert trajectories in {self.store.root}; train them with task=teacher"
            )
        needed = self.max_start_epoch - 1 + self.expert_epochs
        short = [(i, self._expert(i).epochs) for i in indices if self._expert(i).epochs < needed]
        if short:
            i, have = short[0]
            raise UserError(
                f"distill.max_start_epoch={self.max_start_epoch} + distill.expert_epochs="
                f"{self.expert_epochs} needs experts with at least {needed} epochs of snapshots, "
                "but "
                f"expert {i} in {self.store.root} has {have} ({len(short)} of {len(indices)} too "
                f"short); lower them or train longer experts (teacher.epochs)"
            )
        self.experts = indices

    def _expert(self, index: int) -> Expert:
        if index not in self._loaded:
            self._loaded[index] = self.store.load(index)  # memory-mapped: nothing read yet
        return self._loaded[index]

    @property
    def num_params(self) -> int:
        return self._expert(self.experts[0]).num_params

    def choose(self, iteration: int, rank: int = 0) -> tuple[int, int]:
        """The (expert index, start epoch) of ``iteration`` on ``rank``."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "pairs", rank, iteration))
        expert = self.experts[int(torch.randint(len(self.experts), (1,), generator=g))]
        upper = start_epoch_upper(
            iteration,
            max_start_epoch=self.max_start_epoch,
            current_max_start_epoch=self.current_max_start_epoch,
            expansion_end_epoch=self.expansion_end_epoch,
        )
        if self.min_start_epoch == 0:  # MTT's draw, unchanged
            return expert, int(torch.randint(upper, (1,), generator=g))
        return expert, int(torch.randint(self.min_start_epoch, upper, (1,), generator=g))

    def pair(self, iteration: int, rank: int = 0) -> dict:
        expert, start_epoch = self.choose(iteration, rank)
        e = self._expert(expert)
        return {
            "iteration": torch.tensor(iteration),
            "expert": torch.tensor(expert),
            "start_epoch": torch.tensor(start_epoch),
            "start": e.params(start_epoch).clone(),
            "target": e.params(start_epoch + self.expert_epochs).clone(),
        }

    def start_iteration(self) -> int:
        """Where the stream begins: the trainer's restored step on resume, else 0."""
        trainer = self.trainer
        return int(trainer.global_step) if trainer is not None else 0

    def _rank(self) -> int:
        return int(self.trainer.global_rank) if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        return _PairLoader(_PairStream(self, self._rank()), batch_size=None, num_workers=0)
