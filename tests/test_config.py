"""Every file of every config group composes, and what it describes can be built."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_modules.errors import UserError
from lightning_modules.tasks.common import build_logger, instantiate_checked
from tests.conftest import ROOT

HYDRA_GROUPS = sorted(d.name for d in (ROOT / "conf").iterdir() if d.is_dir() and d.name != "sweep")
OPTIONS = [(g, f.stem) for g in HYDRA_GROUPS for f in sorted((ROOT / "conf" / g).glob("*.yaml"))]
DEFAULT_GROUPS = {
    next(iter(d)) if isinstance(d, dict) else d
    for d in OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "config.yaml"))["defaults"]
    if d != "_self_"
}


def _override(group: str, option: str) -> str:
    return f"{group}={option}" if group in DEFAULT_GROUPS else f"+{group}={option}"


def test_default_config_composes(compose):
    cfg = compose()
    assert cfg.task.name == "classify" and cfg.dataset.name == "cifar10" and cfg.seed == 0
    for key in ("seed", "ipc", "resume", "paths"):
        assert key in cfg


def test_every_group_has_files():
    assert {"task", "dataset", "net", "trainer", "logger", "eps_net"} <= set(HYDRA_GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_group_file_composes_and_instantiates(group, option, compose, tiny_data, tmp_path):
    cfg = compose(_override(group, option), f"paths.data_dir={tiny_data}")
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    if group == "task":
        runner = importlib.import_module(f"lightning_modules.tasks.{cfg.task.name}")
        assert callable(runner.run)
    elif group == "dataset":
        overrides = {}
        if option == "points":
            path = tmp_path / "points.npy"
            np.save(path, np.random.default_rng(0).normal(size=(30, 3)))
            overrides["path"] = str(path)
        dm = instantiate(cfg.dataset, **overrides)
        dm.setup()
        assert len(next(iter(dm.train_dataloader()))) > 0
    elif group == "net":
        net = instantiate(cfg.net, channels=3, num_classes=10, im_size=32)
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    elif group == "eps_net":
        _check_eps_net(cfg)
    elif group == "trainer":
        trainer = instantiate(
            cfg.trainer, accelerator="cpu", logger=False, default_root_dir=str(tmp_path)
        )
        assert trainer.max_epochs is None or trainer.max_epochs != 0
    elif group == "logger":
        logger = build_logger(cfg)
        assert logger is False if option == "none" else logger is not False


def _check_eps_net(cfg):
    """Vector data first; a noise model that only takes images says so with a UserError."""
    for shape in ((2,), (3, 32, 32)):
        try:
            net = instantiate_checked(
                cfg.eps_net,
                data_shape=shape,
                timesteps=10,
                data_bounds=(-torch.ones(shape), torch.ones(shape)),
            )
        except UserError:
            continue
        x = torch.randn(2, *shape)
        assert net(x, torch.tensor([0, 9])).shape == x.shape
        return
    pytest.fail(f"eps_net {cfg.eps_net.get('name')} builds for neither vectors nor images")
