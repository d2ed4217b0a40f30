"""``task=reproduce`` fanned out over the configured submitit launcher (``hydra/launcher=slurm`` or
``local``): the stages that do not depend on each other run as parallel jobs, phase by phase, and
the stage cache in the work dir is the only thing the jobs and this process share.

1. experts: ``reproduce.expert_jobs`` jobs, each ``task=teacher`` on a contiguous share of the
   indices that are missing from the store;
2. sets: one job per column whose set is not cached (distillations with ε and ε = 0, DC/DSA/DM/
   CAFE/KIP, the coresets);
3. evaluations: one job per (set, network) not cached (per width for ``table=kip``).

Each job runs the very function the single-process run calls (``stages.make_set``,
``stages.evaluate_all``, the teacher stage), so it leaves the same files; after the last phase the
runner assembles the row from the cache exactly as it does without a launcher. A job that dies
leaves its stage unfinished: rerunning the same command submits only what is not cached (a
distillation continues from its checkpoint). Jobs are submitit ``Checkpointable``: a job that is
preempted or reaches its time limit is requeued by submitit and reruns its stage.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.errors import UserError
from lightning_modules.tasks.reproduce.config import (
    NEEDS_EXPERTS,
    _stage,
    derive,
    kip_widths,
    with_width,
)
from lightning_modules.tasks.reproduce.stages import (
    cached_evaluation,
    ensure_experts,
    evaluate_all,
    evaluation_cache,
    make_set,
    run_stage,
    set_stage,
)
from lightning_modules.tasks.reproduce.start_window import cap_start_epoch

log = logging.getLogger(__name__)

SUBMITIT_TARGET = "hydra_plugins.hydra_submitit_launcher"


def submitit_launcher() -> dict | None:
    """The ``hydra.launcher`` config of this run when it is submitit's (slurm or local), else None
    (Hydra's basic launcher, or no Hydra at all: a test calling ``train.run``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().get("launcher")
    if launcher is None or not str(launcher.get("_target_", "")).startswith(SUBMITIT_TARGET):
        return None
    return OmegaConf.to_container(launcher, resolve=True)


def enabled(cfg: DictConfig) -> dict | None:
    """The launcher config to fan out with, or None for the single-process run."""
    if not cfg.reproduce.fanout:
        return None
    return submitit_launcher()


def make_executor(launcher: dict, folder: Path):
    """A submitit executor with the settings of ``hydra.launcher`` (partition, GPUs, time, ...),
    writing its job files under ``folder``; one process per job."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cluster = "slurm" if "Slurm" in str(launcher["_target_"]) else "local"
    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder")}
    if int(params.get("nodes", 1) or 1) * int(params.get("tasks_per_node", 1) or 1) != 1:
        raise UserError(
            "task=reproduce fans its stages out as one-process jobs: hydra.launcher.nodes=1 and "
            "hydra.launcher.tasks_per_node=1 (each stage uses one device); got "
            f"nodes={params.get('nodes')} tasks_per_node={params.get('tasks_per_node')}"
        )
    init = {}
    if "max_num_timeout" in params:
        init[f"{cluster}_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, **init)
    shared = {f.name for f in dataclasses.fields(BaseQueueConf)}
    executor.update_parameters(
        **{k if k in shared else f"{cluster}_{k}": v for k, v in params.items() if v is not None}
    )
    return executor


class StageJob:
    """One stage as a submitit job: ``kind`` is ``teacher``, ``set`` or ``evaluate``.

    Checkpointable: on preemption or time-out submitit requeues the job and it runs its stage
    again, which continues from what the stage left (experts done, the distillation checkpoint).
    """

    def __init__(self, kind: str, cfg: DictConfig, workdir: Path, **args):
        self.kind, self.workdir, self.args = kind, str(workdir), args
        self.cfg = OmegaConf.to_yaml(cfg)  # interpolations kept: a stage sets its own run dir

    def __call__(self) -> str:
        import lightning as L
        import torch

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
        cfg = OmegaConf.create(self.cfg)
        if cfg.get("threads") is not None:
            torch.set_num_threads(int(cfg.threads))  # as train.run does: results depend on it
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        workdir, a = Path(self.workdir), self.args
        if self.kind == "teacher":
            run_stage(derive(cfg, "teacher", Path(a["out_dir"]), "teacher"), Path(a["out_dir"]))
        elif self.kind == "set":
            make_set(cfg, a["method"], workdir, a["experts"])
        else:
            set_path = Path(a["set_path"]) if a["set_path"] is not None else None
            evaluate_all(cfg, {a["column"]: set_path}, [a["net"]], workdir)
        return self.kind

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def run_phases(cfg: DictConfig, launcher: dict, table: str, methods, nets, workdir: Path, out_dir):
    """Fill the stage cache with parallel jobs; returns ``{phase: {stage: job id}}``."""
    executor = make_executor(launcher, Path(out_dir) / "jobs")
    ran: dict = {}
    experts = None
    if any(m in NEEDS_EXPERTS for m in methods):
        ran["experts"] = run_phase(executor, _expert_jobs(cfg, workdir), "experts")
        experts = ensure_experts(cfg, workdir)
        if any(m in ("mtt", "pruning") for m in methods):
            cap_start_epoch(cfg, experts["epochs"])
    sets = {}
    for method in methods:
        if not set_stage(cfg, method, workdir, experts).done():
            sets[method] = StageJob("set", cfg, workdir, method=method, experts=experts)
    ran["sets"] = run_phase(executor, sets, "sets")
    entries = {m: set_stage(cfg, m, workdir, experts).set_path for m in methods}
    if cfg.reproduce.full:
        entries["full"] = None
    ran["evaluations"] = run_phase(
        executor, _evaluation_jobs(cfg, table, entries, nets, workdir), "evaluations"
    )
    return ran


def _expert_jobs(cfg: DictConfig, workdir: Path) -> dict:
    """``task=teacher`` on contiguous shares of experts 0..n-1, only shares with missing ones."""
    from datamodules.trajectories import ExpertStore

    store, n = ExpertStore(cfg.teacher.out), int(cfg.teacher.num_experts)
    shards = int(cfg.reproduce.expert_jobs)  # a whole number >= 1 (checks.POSITIVE_COUNTS)
    bounds = [n * k // shards for k in range(shards + 1)]
    jobs = {}
    for first, stop in zip(bounds[:-1], bounds[1:]):
        if first == stop or all(store.exists(i) for i in range(first, stop)):
            continue
        sub = copy.deepcopy(cfg)  # the shard's own indices; expert i is the same in any shard
        with open_dict(sub):
            sub.teacher.first_index, sub.teacher.num_experts = first, stop - first
        name = f"experts {first}-{stop - 1}"
        out_dir = workdir / "teacher" / f"{first}-{stop - 1}"
        jobs[name] = StageJob("teacher", sub, workdir, out_dir=str(out_dir))
    return jobs


def _evaluation_jobs(cfg, table: str, entries: dict, nets, workdir: Path) -> dict:
    """One job per (set, network) whose evaluation is not cached (per width for table=kip)."""
    plan = []  # (config, column, set file, net, label)
    if table == "kip":
        for width in kip_widths(cfg):
            plan.append((with_width(cfg, width), "kip", entries["kip"], "convnet", f"w{width}"))
        entries = {c: p for c, p in entries.items() if c != "kip"}
        nets = ["convnet"]
    plan += [(cfg, c, p, net, net) for c, p in entries.items() for net in nets]
    jobs = {}
    for sub, column, set_path, net, label in plan:
        kinds = _label_kinds(set_path)
        if any(
            cached_evaluation(*evaluation_cache(sub, column, set_path, net, workdir, labels=k))
            is None
            for k in kinds
        ):
            path = None if set_path is None else str(set_path)
            jobs[f"{column} on {label}"] = StageJob(
                "evaluate", sub, workdir, column=column, set_path=path, net=net
            )
    return jobs


def _label_kinds(set_path) -> list:
    """The evaluations a set gets: soft and hard for a set with soft labels, else one."""
    from datamodules.syn_set import SyntheticSet

    if set_path is None or not Path(set_path).exists():
        return [None]
    return ["soft", "hard"] if SyntheticSet.load(set_path).soft_labels is not None else [None]


def run_phase(executor, jobs: dict, phase: str) -> dict:
    """Submit ``jobs`` (name -> StageJob) at once, wait for all; one line naming any that failed."""
    number = {"experts": 1, "sets": 2, "evaluations": 4}[phase]
    if not jobs:
        log.info("%s %s: every stage cached, no jobs", _stage(number), phase)
        return {}
    submitted = {}
    for name, job in jobs.items():
        executor.update_parameters(name=f"reproduce-{phase}")
        submitted[name] = executor.submit(job)
    log.info(
        "%s %s: %d parallel jobs (%s)",
        _stage(number), phase, len(submitted),
        ", ".join(f"{n}: {j.job_id}" for n, j in submitted.items()),
    )  # fmt: skip
    failed = []
    for name, job in submitted.items():
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 (a job's own error, reported below by its log)
            failed.append(f"{name} (job {job.job_id}: {job_error(e)}; log {job.paths.stderr})")
    if failed:
        raise UserError(
            f"task=reproduce: {len(failed)} of {len(submitted)} {phase} jobs failed: "
            + "; ".join(failed)
            + ". Rerun the same command: finished stages are reused, the rest resubmitted"
        )
    log.info("%s %s: %d jobs done", _stage(number), phase, len(submitted))
    return {name: str(job.job_id) for name, job in submitted.items()}


def job_error(error: Exception) -> str:
    """The exception line of a failed job's traceback (submitit wraps it in a longer message)."""
    lines = str(error).splitlines()
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    return (raised[-1] if raised else (lines[0] if lines else type(error).__name__))[:200]
