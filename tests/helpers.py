"""Test data in the official CIFAR byte layout, written by the tests themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import yaml

from datamodules.cifar import SPECS


def write_cifar(
    root: Path,
    name: str = "cifar10",
    train_per_class: int = 6,
    test_per_class: int = 3,
    seed: int = 0,
) -> Path:
    """Write a tiny ``name`` dataset under ``root`` exactly as the official archive unpacks.

    Class c's images are noise around a class-specific colour, so a classifier can learn them.
    """
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    k = spec.num_classes
    palette = rng.integers(0, 256, size=(k, 3))

    def make(per_class):
        labels = np.repeat(np.arange(k), per_class)
        rng.shuffle(labels)
        base = palette[labels][:, :, None].repeat(1024, axis=2)  # N x 3 x 1024
        noise = rng.normal(0, 20, size=base.shape)
        data = np.clip(base + noise, 0, 255).astype(np.uint8).reshape(len(labels), 3072)
        return data, labels.tolist()

    train, test = make(train_per_class), make(test_per_class)
    chunks = np.array_split(np.arange(len(train[1])), len(spec.train_files))
    for file, idx in zip(spec.train_files, chunks):
        entry = {
            "data": train[0][idx],
            spec.label_key: [train[1][i] for i in idx],
            "batch_label": file,
        }
        with open(folder / file, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / spec.test_files[0], "wb") as f:
        pickle.dump({"data": test[0], spec.label_key: test[1]}, f, protocol=2)
    with open(folder / spec.meta_file, "wb") as f:
        pickle.dump({spec.names_key: [f"class{c}" for c in range(k)]}, f, protocol=2)
    return root


def sweep_agent_commands(sweep_file: Path, python: str) -> list[list[str]]:
    """The argv lists a W&B agent runs for a grid sweep file (wandb's own flag formatting)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load(sweep_file.read_text())
    assert spec["method"] == "grid"
    grid = [{}]
    for key, param in spec["parameters"].items():
        values = param["values"] if "values" in param else [param["value"]]
        grid = [{**g, key: v} for g in grid for v in values]
    commands = []
    for point in grid:
        macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
        macros.update(env=["/usr/bin/env"], interpreter=[python], program=[spec["program"]])
        argv = []
        for chunk in spec["command"]:
            chunk = str(chunk)
            is_macro = chunk.startswith("${") and chunk.endswith("}")
            argv += macros.get(chunk[2:-1], []) if is_macro else [chunk]
        commands.append(argv)
    return commands


def solver_options(name: str, **overrides) -> dict:
    """The ``conf/`` defaults of the TT solver block ``name`` (``als``, ``dmrg``, ``riemannian``)
    with ``overrides``, read by the task's own ``stepper_options``: the solvers take no defaults
    of their own, as in a run."""
    from omegaconf import OmegaConf

    from lightning_modules.tasks.ddpm import stepper_options

    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/task/ddpm.yaml")
    block = stepper_options(conf, name)
    unknown = set(overrides) - set(block) - {"armijo_c"}
    assert not unknown, f"{name} has no keys {unknown}"
    return {**block, **overrides}


def scaled_error(actual, expected, scale=None) -> float:
    """``max |actual - expected| / scale``, ``scale`` by default the largest magnitude of either.

    Rounding in a float sum, product or solve is relative to the largest terms involved, not to
    each entry (entries near zero carry the rounding of their big neighbours) and not to an
    absolute number: a tolerance in these units holds on any CPU's BLAS."""
    import torch

    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    if scale is None:
        scale = max(float(a.abs().max()), float(e.abs().max()))
    diff = float((a - e).abs().max())
    if not (a.isfinite().all() and e.isfinite().all()):
        return float("inf")
    return diff / scale if scale > 0 else diff


def assert_close_scaled(actual, expected, rtol: float, scale=None, msg: str = "") -> None:
    """``max |actual - expected| <= rtol x scale`` (see :func:`scaled_error`); shapes must agree."""
    import torch

    assert torch.as_tensor(actual).shape == torch.as_tensor(expected).shape, msg
    err = scaled_error(actual, expected, scale)
    assert err <= rtol, f"{msg} relative error {err:.3g} > {rtol:g}"
