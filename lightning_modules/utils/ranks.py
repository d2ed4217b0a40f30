"""Which process this is, before Lightning or Fabric has set up the process group.

Lightning sets the rank once the Trainer or Fabric starts; files written earlier (the run's
config) and the shared-folder check need it from the environment, the way the launchers set it:
``RANK`` (torchrun, Lightning's own launcher), ``SLURM_PROCID`` (srun), or ``NODE_RANK`` with
``LOCAL_RANK`` (one process per node started by hand, ``trainer.devices`` per node).
"""

from __future__ import annotations

import os


def global_rank(devices_per_node: int = 1) -> int:
    """This process's global rank as the environment tells it (0 when nothing says)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env["SLURM_PROCID"])
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    return node * max(1, int(devices_per_node)) + int(env.get("LOCAL_RANK", 0))


def multi_node_environment() -> bool:
    """True when a launcher or the user has set up processes on several nodes."""
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", 1)) > 1 or int(env.get("SLURM_NNODES", 1)) > 1
    by_hand = "MASTER_ADDR" in env and ("NODE_RANK" in env or "GROUP_RANK" in env)
    return slurm or by_hand or "WORLD_SIZE" in env
