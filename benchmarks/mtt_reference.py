"""Time the official MTT code (GeorgeCazenavette/mtt-distillation, ``distill.py``) as it is.

The official script is run unmodified, in this process, with ``runpy`` and its own command line;
nothing of it is copied here. What this runner adds around it:

- a stand-in ``wandb`` module (the official script logs through wandb; the GPU machine has no
  wandb and no internet). Its ``log`` is the clock: ``distill.py`` logs ``Progress`` at the start
  of every iteration and ``Grand_Loss`` after the image/lr update, so one iteration is the time
  between the two (device-synchronised). Iteration 0 (the script's evaluation at iteration 0,
  cuDNN warm-up) is not timed; peak memory is ``torch.cuda.max_memory_allocated`` from the start
  of iteration 1 minus what was allocated then (the same "peak above the start" as
  ``bench_distill.py``; on the CPU the peak resident set minus the resident set then).
- torchvision's CIFAR md5 check is answered "intact": the subset written by
  ``gpu_check.py --write-subset`` has the official layout but not the official bytes, and the
  script calls ``datasets.CIFAR10(..., download=True)``, which would try the network.
- without CUDA (the CPU dry run) ``torch.Tensor.cuda`` returns the tensor itself, because the
  official script moves its saved images with ``.cuda()`` unconditionally; said on stderr.

    python benchmarks/mtt_reference.py --reference .carry/mtt-distillation --workdir /tmp/w -- \\
        --dataset CIFAR10 --ipc 10 --syn_steps 30 --Iteration 5 ...

Prints ``RESULT {"time_s": ..., "peak_mb": ..., "times": [...]}`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import sys
import time
import types
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Clock:
    def __init__(self, torch):
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.started: float | None = None
        self.times: list[float] = []
        self.base: int | None = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def log(self, data: dict, step: int | None = None, **_) -> None:
        if "Progress" in data:
            it = int(data["Progress"])
            self.sync()
            if it == 1 and self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
                self.base = self.torch.cuda.memory_allocated()
            elif it == 1:
                self.base = _rss_bytes()
            self.started = time.perf_counter() if it >= 1 else None
        elif "Grand_Loss" in data and self.started is not None:
            self.sync()
            self.times.append(time.perf_counter() - self.started)
            self.started = None

    def result(self) -> dict:
        peak = None
        if self.cuda and self.base is not None:
            peak = (self.torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:  # the process's peak resident set (since its start)
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / 2**20
        if not self.times:
            return {"error": "no timed iteration (needs --Iteration >= 1)"}
        return {"time_s": statistics.median(self.times), "peak_mb": peak, "times": self.times}


def _fake_wandb(clock: _Clock) -> types.ModuleType:
    """The parts of wandb that ``distill.py`` touches; ``log`` feeds the clock."""
    wandb = types.ModuleType("wandb")
    state = {}

    def init(config=None, **_):
        items = dict(vars(config)) if config is not None else {}
        state["config"] = types.SimpleNamespace(_items=items)
        wandb.config = state["config"]
        wandb.run = types.SimpleNamespace(name="gpu_check")

    wandb.init = init
    wandb.log = clock.log
    wandb.finish = lambda *a, **k: None
    wandb.Histogram = lambda *a, **k: None
    wandb.Image = lambda *a, **k: None
    return wandb


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reference", required=True, help="folder holding the official distill.py")
    p.add_argument("--workdir", required=True, help="cwd of the script (its logged_files/)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then distill.py's own arguments")
    a = p.parse_args(argv)
    ref = Path(a.reference).resolve()
    script = ref / "distill.py"
    if not script.exists():
        raise SystemExit(f"no distill.py in {ref}")
    import torch
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    clock = _Clock(torch)
    sys.modules["wandb"] = _fake_wandb(clock)
    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        cls._check_integrity = lambda self: True
    tv_cifar.check_integrity = lambda *args, **kwargs: True  # the meta file's md5
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        print("mtt_reference: no CUDA, torch.Tensor.cuda made a no-op", file=sys.stderr)
    sys.path.insert(0, str(ref))
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(a.workdir)
    rest = a.args[1:] if a.args[:1] == ["--"] else a.args
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    print("RESULT " + json.dumps(clock.result()), flush=True)


if __name__ == "__main__":
    main()
