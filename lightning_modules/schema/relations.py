"""Rules between keys, checked after every key passed its own kind (``keys.py``).

Each rule reads the resolved configuration (a plain dict) and returns the one-line problem or
None. Add a rule by writing a function and listing it in ``RULES``.
"""

from __future__ import annotations

from pathlib import Path

_MISSING = object()


def get(data: dict, key: str, default=None):
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def sample_steps_within_timesteps(data: dict) -> str | None:
    steps, timesteps = get(data, "ddpm.sample_steps"), get(data, "ddpm.timesteps")
    if steps is not None and timesteps is not None and steps > timesteps:
        return (
            f"ddpm.sample_steps must be at most ddpm.timesteps ({timesteps}), got {steps}: "
            "the respaced chain strides over the T training steps"
        )
    return None


def betas_increase(data: dict) -> str | None:
    start, end = get(data, "ddpm.beta_start"), get(data, "ddpm.beta_end")
    linear = get(data, "ddpm.schedule") == "linear"
    if linear and start is not None and end is not None and not start <= end:
        return f"ddpm.beta_start must be at most ddpm.beta_end ({end}), got {start}"
    return None


def splines_exceed_degree(data: dict) -> str | None:
    if get(data, "eps_net.basis") != "bspline" or get(data, "eps_net.param") == "density":
        return None
    degree, num = get(data, "eps_net.degree"), get(data, "eps_net.num_basis")
    if degree is not None and num is not None and not num > degree:
        return f"eps_net.num_basis must exceed eps_net.degree ({degree}), got {num}"
    return None


def density_takes_gradient_optimisers(data: dict) -> str | None:
    """``eps_net.param=density``: adam/sgd only, no Gaussian skip (lightning_modules/tt/density);
    ``eps_net.init=histogram`` is the density form's alone."""
    if get(data, "eps_net.param") != "density":
        if get(data, "eps_net.init") == "histogram":
            return "eps_net.init=histogram needs eps_net.param=density"
        return None
    from lightning_modules.tt.density import (
        CORE_SOLVERS,
        refuse_init,
        refuse_optimizer,
        refuse_skip,
    )

    optimizer, skip = get(data, "ddpm.optimizer"), get(data, "eps_net.skip")
    if optimizer in CORE_SOLVERS:
        return refuse_optimizer(optimizer)
    if skip not in (None, "auto", "none"):
        return refuse_skip(skip)
    init = get(data, "eps_net.init")
    if init not in (None, "auto", "identity", "histogram"):
        return refuse_init(init)
    if init == "histogram":
        return histogram_start_fits(data)
    return None


#: datamodules whose samples are never 2-D (images, PCA latents, the tabular sets)
NOT_TWO_D = ("datamodules.cifar", "datamodules.tabular")


def histogram_start_fits(data: dict) -> str | None:
    """``eps_net.init=histogram``: ``rank >= num_basis`` and 2-D data, where the config says the
    dimension (``dataset.dim``; images are not 2-D); the model refuses what only the data shows."""
    rank, bumps = get(data, "eps_net.rank"), get(data, "eps_net.num_basis")
    if rank is not None and bumps is not None and rank < bumps:
        return (
            f"eps_net.init=histogram needs eps_net.rank >= eps_net.num_basis ({bumps}), got "
            f"{rank}: a 2-D histogram on m x m bumps is a rank-m train"
        )
    target, dim = str(get(data, "dataset._target_") or ""), get(data, "dataset.dim")
    if (dim is not None and dim != 2) or target.startswith(NOT_TWO_D):
        shown = f"dataset.dim={dim}" if dim is not None else target.rsplit(".", 1)[-1]
        return f"eps_net.init=histogram needs 2-D data, got {shown}; use eps_net.init=auto"
    return None


#: dataset.name per datamodule (the key means a different table in each)
DATASET_NAMES = {
    "datamodules.cifar.CIFARDataModule": ("cifar10", "cifar100"),
    "datamodules.cifar_pca.CIFARPCADataModule": ("cifar10", "cifar100"),
    "datamodules.tabular.TabularDataModule": ("digits", "breast_cancer", "wine", "diabetes"),
}


def dataset_name_fits_the_datamodule(data: dict) -> str | None:
    name, names = get(data, "dataset.name"), DATASET_NAMES.get(get(data, "dataset._target_"))
    if name is not None and names and name not in names:
        return f"dataset.name must be one of {', '.join(names)} here, got {name!r}"
    return None


def swiss_roll_dim(data: dict) -> str | None:
    if get(data, "dataset._target_") == "datamodules.vectors.SwissRollDataModule":
        if get(data, "dataset.dim") not in (2, 3):
            return f"dataset.dim must be 2 or 3 for the swiss roll, got {get(data, 'dataset.dim')}"
    return None


def toy_noise_positive(data: dict) -> str | None:
    """Every toy density but the (uniform) checkerboard draws noise of this scale."""
    if get(data, "dataset._target_") != "datamodules.toy_densities.ToyDensityDataModule":
        return None
    density, noise = get(data, "dataset.density"), get(data, "dataset.noise")
    if density != "checkerboard" and noise is not None and not noise > 0:
        return f"dataset.noise must be positive for dataset.density={density}, got {noise}"
    return None


def strategy_is_lightning_s(data: dict) -> str | None:
    """``trainer.strategy`` names one of Lightning's registered strategies (or auto)."""
    strategy = get(data, "trainer.strategy")
    if strategy in (None, "auto", "ddp", "ddp_spawn", "fsdp"):
        return None
    from lightning.pytorch.strategies import StrategyRegistry

    names = ", ".join(sorted(StrategyRegistry.available_strategies()))
    if strategy not in StrategyRegistry.available_strategies():
        return f"trainer.strategy must be auto or one of {names}, got {strategy!r}"
    return None


def gpu_exists(data: dict) -> str | None:
    """``trainer=ddp`` / ``trainer.accelerator=gpu`` on a machine without CUDA."""
    if get(data, "trainer.accelerator") not in ("gpu", "cuda"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        f"trainer.accelerator={get(data, 'trainer.accelerator')} but this machine has no CUDA "
        "GPU; use trainer.accelerator=cpu (trainer=ddp_cpu for two CPU processes)"
    )


#: tasks that run their own loop: the Trainer's keys beyond the trainer config files mean nothing
PLAIN_LOOP_TASKS = ("teacher", "coreset", "evaluate", "reproduce")
#: the Trainer keys each Trainer task sets itself (from its own keys)
TASK_TRAINER_KEYS = {
    "classify": ("max_epochs", "max_steps", "check_val_every_n_epoch"),
    "distill": ("max_epochs", "max_steps", "use_distributed_sampler"),
    "ddpm": ("max_epochs", "max_steps"),
}
#: the keys the trainer config files define (conf/trainer/*.yaml); ``+trainer.<key>`` adds others
TRAINER_DIR = Path(__file__).resolve().parents[2] / "conf" / "trainer"


def trainer_file_keys() -> set[str]:
    import yaml

    keys: set[str] = set()
    for path in TRAINER_DIR.glob("*.yaml"):
        keys |= set(yaml.safe_load(path.read_text()) or {}) - {"defaults"}
    return keys


def trainer_keys_mean_something(data: dict) -> str | None:
    extra = sorted(set(get(data, "trainer", {}) or {}) - trainer_file_keys())
    task = str(get(data, "task.name"))
    if extra and task in PLAIN_LOOP_TASKS:
        return (
            f"task={task} runs its own loop and would ignore trainer.{extra[0]}; "
            "drop it (the task's own keys set epochs and steps)"
        )
    clash = [k for k in TASK_TRAINER_KEYS.get(task, ()) if k in extra]
    if clash:
        return (
            f"trainer.{clash[0]} is set by task={task} itself; use the task's key instead "
            "(task.epochs, distill.iterations, ddpm.steps, ...)"
        )
    return None


TASK_DIR = TRAINER_DIR.parent / "task"


def task_blocks() -> dict[str, set[str]]:
    """``{block: tasks whose config defines it}`` from conf/task/*.yaml (``ddpm``, ``als``, ...
    belong to task=ddpm; task=reproduce includes the blocks of the tasks it runs)."""
    import yaml

    own, includes = {}, {}
    for path in TASK_DIR.glob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        own[path.stem] = {k for k, v in data.items() if isinstance(v, dict) and k != "task"}
        defaults = data.get("defaults", [])
        includes[path.stem] = [d.split("/")[-1] for d in defaults if isinstance(d, str)]
        own[path.stem] |= {next(iter(d)).strip("/") for d in defaults if isinstance(d, dict)}
    owners: dict[str, set[str]] = {}
    for task in own:
        blocks = set(own[task]).union(*(own.get(t, set()) for t in includes[task]))
        for block in blocks:
            owners.setdefault(block, set()).add(task)
    return owners


def blocks_belong_to_the_task(data: dict) -> str | None:
    """``+ddpm.lr=0.1`` under task=classify: a block no part of this task reads."""
    task, owners = get(data, "task.name"), task_blocks()
    for block, value in data.items():
        if block in owners and task not in owners[block] and isinstance(value, dict):
            key = f"{block}.{next(iter(value))}" if value else block
            return (
                f"{key} is a key of task={'/'.join(sorted(owners[block]))}; this run is "
                f"task={task}, which would ignore it"
            )
    return None


def curriculum_stages_pair_up(data: dict) -> str | None:
    epochs, ratios = get(data, "teacher.rm_epochs"), get(data, "teacher.rm_easy_ratios")
    if epochs is None or ratios is None:
        return None
    if len(epochs) != len(ratios):
        return (
            f"teacher.rm_epochs ({len(epochs)} entries) and teacher.rm_easy_ratios "
            f"({len(ratios)}) must have one entry per removal stage"
        )
    if list(epochs) != sorted(epochs):
        return f"teacher.rm_epochs must be in increasing order, got {list(epochs)}"
    return None


#: rules only a configuration composed for a run obeys (a task=reproduce stage carries the
#: blocks of every stage, whatever its task.name)
COMPOSED_RULES = (blocks_belong_to_the_task,)

RULES = (
    sample_steps_within_timesteps,
    betas_increase,
    splines_exceed_degree,
    curriculum_stages_pair_up,
    density_takes_gradient_optimisers,
    dataset_name_fits_the_datamodule,
    swiss_roll_dim,
    toy_noise_positive,
    trainer_keys_mean_something,
    strategy_is_lightning_s,
    gpu_exists,
)
