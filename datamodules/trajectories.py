"""Expert trajectories on disk: one file per expert, written atomically, read lazily.

A store is a folder (default ``trajectories/<dataset>[-zca]/<net>/``) of files
``expert_0000.pt``, ``expert_0001.pt``, ... Each file is a ``torch.save`` dict::

    {"format": "ttdistill-expert", "version": 1,
     "snapshots": float32 tensor [epochs + 1, P],   # row 0 = the init, row e = after epoch e
     "meta": {net, param_names, param_shapes, dataset, zca, zca_eps, lr, seed, epochs,
              batch_size, dsa_strategy, test_acc, num_classes, channels, im_size, ...}}

Files are written to a hidden temporary name and renamed, so a reader never sees half a file.
Several processes (one per GPU, or on several machines sharing a POSIX file system) fill one
store by claiming an index with an advisory ``flock`` on ``expert_XXXX.pt.lock``: the kernel
drops the lock when its holder dies, so a killed run leaves no stale claim behind.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_modules.errors import UserError

FORMAT = "ttdistill-expert"
VERSION = 1
REQUIRED_META = (
    "net", "param_names", "param_shapes", "dataset", "zca", "lr", "seed", "epochs",
    "batch_size", "dsa_strategy", "test_acc", "num_classes", "channels", "im_size",
)  # fmt: skip
_NAME = re.compile(r"^expert_(\d{4,})\.pt$")


def default_store_dir(dataset: str, zca: bool, net: str, root: str | Path = "trajectories") -> Path:
    """``root/<dataset>[-zca]/<net>/``: ZCA and plain experts are different trajectories."""
    return Path(root) / f"{dataset}{'-zca' if zca else ''}" / net


def teacher_command(dataset: str, zca: bool, net: str, store: str | Path | None = None) -> str:
    """The command line that fills a store with experts (quoted in error messages)."""
    zca_flag = str(bool(zca)).lower()
    cmd = f"python train.py task=teacher dataset={dataset} dataset.zca={zca_flag} net={net}"
    if store is not None and Path(store) != default_store_dir(dataset, zca, net):
        cmd += f" teacher.out={store}"
    return cmd


@dataclass
class Expert:
    """One expert trajectory: ``snapshots[e]`` is the flat parameter vector after epoch ``e``."""

    index: int
    snapshots: torch.Tensor  # [E + 1, P] float32, memory-mapped when loaded from disk
    meta: dict = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return self.snapshots.shape[0] - 1

    @property
    def num_params(self) -> int:
        return self.snapshots.shape[1]

    def params(self, epoch: int) -> torch.Tensor:
        """The flat parameters after ``epoch`` epochs (0 = the initialisation)."""
        if not 0 <= epoch <= self.epochs:
            raise UserError(
                f"expert {self.index} has epochs 0..{self.epochs}; asked for epoch {epoch}"
            )
        return self.snapshots[epoch]


class ExpertClaim:
    """An exclusive claim on one expert index (context manager); ``held`` says if we got it."""

    def __init__(self, lock_path: Path):
        self.lock_path = lock_path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        # who holds it, for a human looking at the folder; the lock itself is the flock
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:
            # unlink while still holding the lock: a waiter that opened the old inode re-checks
            # ``exists`` after locking and finds the finished expert
            self.lock_path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ExpertClaim:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release(remove=exc[0] is None)


class ExpertStore:
    """A folder of expert trajectories: list, claim, write atomically, load lazily, validate.

    >>> store = ExpertStore(default_store_dir("cifar10", True, "convnet"))
    >>> store.check(net="convnet", dataset="cifar10", zca=True, num_params=320010)
    >>> expert = store.load(store.indices()[0])
    >>> theta_0, theta_2 = expert.params(0), expert.params(2)
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ExpertStore({str(self.root)!r}, {len(self.indices())} experts)"

    def __len__(self) -> int:
        return len(self.indices())

    # -- listing --------------------------------------------------------------------------------
    def indices(self) -> list[int]:
        """Indices of the completed experts on disk (temporary and lock files are ignored)."""
        if not self.root.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, index: int) -> Path:
        return self.root / f"expert_{index:04d}.pt"

    def exists(self, index: int) -> bool:
        return self.path(index).is_file()

    def claim(self, index: int) -> ExpertClaim:
        """Try to claim ``index`` for training; check ``.held`` (False: another process has it)."""
        claim = ExpertClaim(self.path(index).with_name(self.path(index).name + ".lock"))
        claim.acquire()
        return claim

    def remove_partial(self, index: int) -> None:
        """Delete temporary files of ``index`` left by killed writers (hold its claim first)."""
        prefix = f".{self.path(index).name}.tmp"
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(prefix):
                    p.unlink(missing_ok=True)

    # -- writing --------------------------------------------------------------------------------
    def write(self, index: int, snapshots: torch.Tensor, meta: dict) -> None:
        """Write expert ``index`` atomically (temporary file in the same folder, then rename)."""
        if snapshots.ndim != 2:
            raise ValueError(
                f"snapshots must be [epochs + 1, P], got shape {tuple(snapshots.shape)}"
            )
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"expert metadata lacks {missing}")
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(index)
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "snapshots": snapshots.detach().to("cpu", torch.float32).contiguous(),
            "meta": dict(meta),
        }
        try:
            torch.save(payload, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            tmp.replace(final)
        finally:
            tmp.unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------------
    def load(self, index: int) -> Expert:
        """Expert ``index``, its snapshots memory-mapped (nothing is read until used)."""
        path = self.path(index)
        if not path.is_file():
            have = self.indices()
            raise UserError(
                f"expert file {path} does not exist (store {self.root} holds indices "
                f"{_ranges(have) or 'none'})"
            )
        try:
            payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, wrong magic: all mean "rewrite it"
            raise UserError(
                f"expert file {path} is truncated or corrupt ({type(e).__name__}); delete it and "
                "rerun task=teacher with the same settings to retrain that expert"
            ) from None
        problem = _format_problem(payload)
        if problem:
            raise UserError(
                f"expert file {path} is not a valid expert ({problem}); "
                "delete it and rerun task=teacher"
            )
        return Expert(index=index, snapshots=payload["snapshots"], meta=payload["meta"])

    def __iter__(self):
        return (self.load(i) for i in self.indices())

    def check(
        self,
        *,
        net: str | Mapping,
        dataset: str,
        zca: bool,
        num_params: int | None = None,
    ) -> None:
        """Raise ``UserError`` unless the store holds experts of this net (name, or name and
        options), dataset, ZCA setting and parameter count, all readable."""
        net_name = net if isinstance(net, str) else str(net["name"])
        if not self.indices():
            raise UserError(
                f"no expert trajectories in {self.root}; train them first with: "
                f"{teacher_command(dataset, zca, net_name, self.root)} teacher.num_experts=<n>"
            )
        for index in self.indices():
            meta = self.load(index).meta
            where = f"expert {self.path(index)}"
            theirs = meta["net"] if isinstance(meta["net"], Mapping) else {"name": meta["net"]}
            if str(theirs.get("name")) != net_name:
                raise UserError(
                    f"{where} was trained with net={theirs.get('name')}, not net={net_name}"
                )
            if not isinstance(net, str):
                for key, want in net.items():
                    if key in theirs and key != "_target_" and theirs[key] != want:
                        raise UserError(
                            f"{where} was trained with net.{key}={theirs[key]}, not {want}; "
                            "use a store of matching experts"
                        )
            if meta["dataset"] != dataset:
                raise UserError(f"{where} was trained on {meta['dataset']}, not dataset={dataset}")
            if bool(meta["zca"]) != bool(zca):
                raise UserError(
                    f"{where} was trained with dataset.zca={str(bool(meta['zca'])).lower()}, "
                    f"this run has dataset.zca={str(bool(zca)).lower()}; ZCA and plain experts "
                    "are different trajectories"
                )
            stored = sum(math.prod(s) for s in meta["param_shapes"])
            if num_params is not None and stored != num_params:
                raise UserError(
                    f"{where} has {stored} parameters per snapshot, the configured net has "
                    f"{num_params} (different width/depth/norm?); use experts of this exact net"
                )


def _format_problem(payload) -> str | None:
    """Why ``payload`` is not an expert file, or None."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return "no expert header"
    if payload.get("version") != VERSION:
        return f"format version {payload.get('version')}, this code reads {VERSION}"
    snaps, meta = payload.get("snapshots"), payload.get("meta")
    if not isinstance(snaps, torch.Tensor) or snaps.ndim != 2 or snaps.dtype != torch.float32:
        return "snapshots are not a float32 [epochs + 1, P] tensor"
    if not isinstance(meta, dict):
        return "no metadata"
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        return f"metadata lacks {missing}"
    if sum(math.prod(s) for s in meta["param_shapes"]) != snaps.shape[1]:
        return "parameter shapes do not add up to the snapshot width"
    if snaps.shape[0] != int(meta["epochs"]) + 1:
        return f"{snaps.shape[0]} snapshots for {meta['epochs']} epochs"
    return None


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` for messages."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
