"""One entry point for every task: ``python train.py task=<name> [overrides...]``.

``run(cfg)`` does the work and is what tests call; ``main`` is the thin Hydra wrapper that turns
bad input (``UserError``) into one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.errors import UserError

log = logging.getLogger("train")

# keys that may differ between a run and its resumption
_VOLATILE = ("resume", "paths")


def _comparable(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg, resolve=False)
    for key in _VOLATILE:
        data.pop(key, None)
    return data


def find_resumable(cfg: DictConfig) -> Path | None:
    """The newest earlier run of the same task with the same config (paths and resume aside)."""
    want = _comparable(cfg)
    here = Path(cfg.paths.output_dir).resolve()
    task_dir = Path(cfg.paths.runs_dir) / cfg.task.name
    if not task_dir.is_dir():
        return None
    for run_dir in sorted(task_dir.iterdir(), reverse=True):
        saved = run_dir / "config.yaml"
        if run_dir.resolve() == here or not saved.exists():
            continue
        if _comparable(OmegaConf.load(saved)) == want:
            return run_dir
    return None


def requeued_in_place(cfg: DictConfig) -> bool:
    """A submitit job requeued after its pre-timeout signal or a preemption reruns the same config
    in the same run dir: it continues there (from the last checkpoint).

    Every rank must decide alike before the process group exists. One process decides from the
    run dir alone. The ranks of a multi-process job (several submitit/SLURM tasks, Lightning's
    ranks, several nodes) continue only in a requeued SLURM job (``SLURM_RESTART_COUNT`` >= 1,
    which SLURM gives every task of a requeued job) and when the run dir holds this config; rank
    zero rewrites ``config.yaml`` atomically, so no rank reads half a file.
    """
    env = os.environ
    if not env.get("SUBMITIT_EXECUTOR"):
        return False
    t = cfg.trainer
    several = int(env.get("SUBMITIT_LOCAL_NTASKS", 1)) > 1 or int(env.get("SLURM_NTASKS", 1)) > 1
    several = several or "LOCAL_RANK" in env or str(t.get("devices", 1)) != "1"
    several = several or int(t.get("num_nodes", 1) or 1) > 1
    if several and int(env.get("SLURM_RESTART_COUNT", 0) or 0) < 1:
        return False
    saved = Path(cfg.paths.output_dir) / "config.yaml"
    return saved.exists() and _comparable(OmegaConf.load(saved)) == _comparable(cfg)


def run(cfg: DictConfig) -> dict:
    """Run ``cfg.task`` and return its final metrics (also written to ``summary.json``)."""
    import lightning as L
    import torch

    from lightning_modules.schema import validate
    from lightning_modules.tasks.common import (
        check_multi_node,
        check_shared_dir,
        diverged,
        finish_wandb,
        finite_metrics,
        process_rank,
        run_task,
        write_json,
    )
    from lightning_modules.utils import files

    # Hydra's callback did already (before the run folder); in-process callers did not
    validate(cfg, composed=True)
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))  # before any work: results depend on it
    requeued = requeued_in_place(cfg)
    if requeued:
        log.info("%s already holds this run: continuing it", cfg.paths.output_dir)
        with open_dict(cfg):
            cfg.resume = True
    if cfg.resume and not requeued:
        previous = find_resumable(cfg)
        if previous is None:
            log.warning(
                "resume=true but no earlier %s run with this config: starting fresh", cfg.task.name
            )
        else:
            log.info("resuming %s", previous)
            with open_dict(cfg):
                cfg.paths.output_dir = str(previous)
    check_multi_node(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_shared_dir(out_dir, cfg, "the run dir")  # several nodes: one run dir they all see
    # rank zero writes the config; other DDP ranks share the directory
    if process_rank(cfg) == 0:
        files.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))  # atomic: ranks read it
        files.write_text(out_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    start = time.perf_counter()
    metrics = run_task(cfg.task.name, cfg, out_dir)
    summary = {
        "task": cfg.task.name,
        **finite_metrics(metrics),
        "wall_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }
    bad = diverged(summary)
    if bad:  # after the task's own skip/retry logic: a NaN loss is an error, not a result
        summary["finished"] = False
        write_json(out_dir / "summary.json", summary)  # NaN as null, with the non_finite field
        raise UserError(
            f"training diverged ({', '.join(bad)}): lower the learning rate or clip the "
            f"gradients; {out_dir} holds what was written before, not a finished result"
        )
    write_json(out_dir / "summary.json", summary)
    finish_wandb()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # left to interpreter shutdown, gloo's threads can abort the process after the run
        # ("terminate called without an active exception", seen in a two-node CPU test)
        torch.distributed.destroy_process_group()
    return summary


def quiet_lightning() -> None:
    """One copy of each Lightning log line, and none of the lines that are not about the run.

    Lightning attaches its own console handler to its loggers at import; under Hydra the root
    logger (console + the run's log file) prints the same records again. Keep Hydra's. Drop
    Lightning's advertising tip and a deprecation warning Lightning raises about its own code.
    """
    import warnings

    import lightning.fabric  # noqa: F401  (attach Lightning's handlers now, then remove them)
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:  # Hydra's console and log-file handlers
        handler.addFilter(lambda record: "Tip:" not in str(record.msg))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    quiet_lightning()

    hydra_dir = HydraConfig.get().runtime.output_dir
    with open_dict(cfg):
        cfg.paths.output_dir = hydra_dir
    try:
        summary = run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a library refusing a user's value: one line naming the override
        from lightning_modules.schema.translate import translate

        line = translate(e, list(HydraConfig.get().overrides.task))
        if line is None:
            raise
        log.debug("the library's traceback", exc_info=e)  # kept in the run's log file
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    log.info("summary: %s", summary)
    _fold_into_resumed(Path(hydra_dir), Path(cfg.paths.output_dir))
    return summary.get("objective")


def _fold_into_resumed(hydra_dir: Path, run_dir: Path) -> None:
    """A resumed run works in the earlier directory; keep Hydra's fresh one (its log) inside it."""
    if hydra_dir.resolve() == run_dir.resolve() or not hydra_dir.is_dir():
        return
    from lightning_modules.utils.ranks import global_rank

    if global_rank() != 0:
        return
    target = run_dir / "resumed" / hydra_dir.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(hydra_dir), str(target))


def check_group_choices(argv: list[str]) -> str | None:
    """The one-line error for ``group=name`` naming no file of a config group (``method=foo``),
    instead of Hydra's multi-line composition error."""
    conf = Path(__file__).resolve().parent / "conf"
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+~")
        if not sep or any(c in group for c in "./@") or not (conf / group).is_dir():
            continue
        if value and "," not in value and not (conf / group / f"{value}.yaml").exists():
            names = ", ".join(sorted(p.stem for p in (conf / group).glob("*.yaml")))
            return f"unknown {group} {value!r}; choose one of {names}"
    return None


def check_launcher(argv: list[str]) -> str | None:
    """The one-line error for ``hydra/launcher=slurm|local`` without ``-m`` (Hydra would run the
    job here, ignoring the launcher) or without the submitit plugin."""
    import importlib.util

    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra/launcher=")]
    if not chosen or chosen[-1] not in ("slurm", "local"):
        return None
    if not {"-m", "--multirun"} & set(argv):
        return (
            f"hydra/launcher={chosen[-1]} launches the jobs of a multirun only; without -m the "
            f"run would go on here, locally: python train.py -m hydra/launcher={chosen[-1]} ..."
        )
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        return (
            f"hydra/launcher={chosen[-1]} needs the submitit launcher: "
            'pip install -e ".[slurm]" (hydra-submitit-launcher)'
        )
    return None


def check_method_overrides(argv: list[str]) -> str | None:
    """The one-line error for ``method.<key>=...`` naming a key the chosen method does not have
    (``method=dm method.learn_labels=true``), instead of Hydra's multi-line struct error."""
    conf = Path(__file__).resolve().parent / "conf" / "method"
    chosen = [a.partition("=")[2] for a in argv if a.lstrip("+~").partition("=")[0] == "method"]
    name = chosen[-1] if chosen else "mtt"
    path = conf / f"{name}.yaml"
    if not path.exists():
        return None
    import yaml

    own = set(yaml.safe_load(path.read_text()) or {})
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if not sep or not key.startswith("method.") or "." in key[len("method.") :]:
            continue
        leaf = key[len("method.") :]
        if leaf in own:
            continue
        owners = sorted(
            p.stem for p in conf.glob("*.yaml") if leaf in (yaml.safe_load(p.read_text()) or {})
        )
        owner = f" (a key of method={'/'.join(owners)})" if owners else ""
        return f"method.{leaf}{owner} is not a key of method={name}"
    return None


def jobs_import_this_checkout() -> None:
    """Jobs a launcher starts (submitit's, a fanned-out ``task=reproduce``) import this checkout's
    packages, not another copy the environment may point at (an editable install of a sibling
    clone): its root goes first on the ``PYTHONPATH`` they inherit."""
    root = str(Path(__file__).resolve().parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not paths or paths[0] != root:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def one_line_composition_errors() -> None:
    """Hydra's composition errors (``ddpm.foo=1`` without ``+``, a malformed override, a missing
    config file) as one ``error:`` line and exit 2, like every other bad input, instead of
    Hydra's several lines; every other exception reaches Hydra's own reporting unchanged."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    report = hydra_utils.run_and_report

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except (
                ConfigCompositionException,
                MissingConfigException,
                OverrideParseException,
            ) as e:
                line = " ".join(str(e).split())
                if e.__cause__ is not None and str(e.__cause__).strip():
                    line += f" ({str(e.__cause__).strip().splitlines()[0]})"
                print(f"error: {line}", file=sys.stderr)
                sys.exit(2)

        return report(guarded)

    hydra_utils.run_and_report = run_and_report


if __name__ == "__main__":
    argv = sys.argv[1:]
    jobs_import_this_checkout()
    one_line_composition_errors()
    problem = check_launcher(argv) or check_group_choices(argv) or check_method_overrides(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
