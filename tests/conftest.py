"""Shared fixtures: tiny CIFAR written in the official layout, and config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_cifar

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """``train.run(cfg)`` with ``threads=N`` sets torch's process-wide thread count; restore it
    so a later in-process run is not silently single-threaded while its subprocess twin is not
    (CPU results depend on the thread count)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """CIFAR-10 (20/5 per class) and CIFAR-100 (3/2 per class) in one data_dir."""
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar10", train_per_class=20, test_per_class=5)
    write_cifar(root, "cifar100", train_per_class=3, test_per_class=2)
    return root


@pytest.fixture(scope="module")
def tiny_dm(tmp_path_factory):
    """A set-up CIFAR-10 datamodule of 6 train and 4 test images per class."""
    from datamodules.cifar import CIFARDataModule

    root = tmp_path_factory.mktemp("evaldata")
    write_cifar(root, "cifar10", train_per_class=6, test_per_class=4)
    dm = CIFARDataModule(
        "cifar10", data_dir=str(root), download=False, cache_dir=str(root / "cache")
    )
    dm.setup()
    return dm


@pytest.fixture
def compose(tmp_path):
    """Compose the project config with overrides, paths pointed into a temp dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = hydra_compose(
                config_name="config", overrides=list(overrides), return_hydra_config=False
            )
        with open_dict(cfg):
            cfg.paths.runs_dir = str(tmp_path / "outputs")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            cfg.paths.output_dir = str(tmp_path / "outputs" / "run")
        return cfg

    return _compose


def run_train(*overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``train.py`` in a subprocess, as a user would, from ``cwd``."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
