"""Everything a lent GPU should measure, in one command that ends inside a fixed time budget.

Parts (each under its own hard time budget; a part that runs out is stopped and keeps what it
had measured, marked ``timeout``):

- ``tests``: the tests that need CUDA (test functions under ``tests/`` whose source says ``cuda``).
- ``ab``: one distillation iteration, time and peak memory, of the official MTT code
  (``--reference``: a checkout of GeorgeCazenavette/mtt-distillation, run unmodified through
  ``benchmarks/mtt_reference.py``) beside ours (``DistillationModule`` under a Lightning Trainer,
  ``bench_distill.py``'s ``lightning`` child) with ``unroll=full`` and ``unroll=recompute``; same
  expert vectors, same real initial images, same shapes; CIFAR-10 and CIFAR-100 at IPC 10,
  syn_steps 30, all images per step (batch_syn as the paper); each a fresh process, A/B
  interleaved (official, full, recompute, then the reverse order next round).
- ``matching``: DC / DSA / DM s/iteration (``bench_matching.py``) and CAFE (``bench_cafe_kip.py``)
  at CIFAR-10 IPC 10.
- ``ipc1``: a near-paper-scale CIFAR-10 IPC 1 row: experts (50 epochs each, as many as fit in the
  experts' share of the budget, several processes filling one store), then MTT (eps 0) and
  pruning (eps 0.1) with the published row (5,000 iterations, cut by ``trainer.max_time`` where
  the budget ends first), each evaluated on 5 ConvNets x 1,000 epochs, beside the paper's
  46.3 / 46.4. The row says how many experts and iterations fitted.

Outputs under ``--out``: ``results.json`` (rewritten after every measurement), ``results.md``,
``logs.tar.gz`` (each child's stderr); scratch (data, experts, logs) under ``--work``.
``--dry-run`` runs every part at toy size on the CPU (tiny random CIFAR written here, 2
iterations) and checks the outputs' format; without ``--reference`` the official rows say
``reference not given``.

    python benchmarks/gpu_check.py --write-subset .carry/cifar --source ../shared/data
    python benchmarks/gpu_check.py --out /tmp/gpu --work /tmp/gpu_work --data .carry/cifar \\
        --reference .carry/mtt-distillation                              # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry [--reference .carry/mtt-distillation]

See docs/gpu.md for the command that runs it on a lent machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("tests", "ab", "matching", "ipc1")
BUDGET_S = {"tests": 45, "ab": 210, "matching": 60, "ipc1": 180}  # 495 s; ipc1 takes what is left
TOTAL_S = 510  # 8.5 minutes: the whole command, under the 9 the lent machine allows
PAPER_IPC1 = {"MTT": 46.3, "pruning (eps 0.1)": 46.4}  # Table I, CIFAR-10 IPC 1 (REFERENCE.md A)
STATUSES = {"ok", "timeout", "error", "oom", "reference not given", "skipped", "not run"}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the official code's, no ZCA
# the official code's published MTT rows (REFERENCE.md A) for the A/B, syn_steps set to 30
AB_ROWS = {
    "cifar10": dict(classes=10, ref="CIFAR10", lr_img=100, lr_lr=1e-5, lr_teacher=0.001),
    "cifar100": dict(classes=100, ref="CIFAR100", lr_img=1000, lr_lr=1e-5, lr_teacher=0.01),
}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


# -- data -----------------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=4)  # 2 would store the bytes as latin-1 text, 1.45x larger


def _first_per_class(data, labels, per_class: int, classes: int):
    import numpy as np

    labels = np.asarray(labels)
    idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(classes)])
    idx.sort()
    return np.asarray(data)[idx], labels[idx].tolist()


def write_subset(
    source: Path, dest: Path, c10_train=1000, c10_test=200, c100_train=20, c100_test=10
) -> dict:
    """The first ``n`` images of every class of each split, in the official archive layout.

    CIFAR-10: ``data_batch_1..5`` (the train subset split in 5), ``test_batch``, ``batches.meta``;
    CIFAR-100: ``train``, ``test``, ``meta``. Both readers (ours and torchvision's) take it as is.
    The defaults make 46 MB (CIFAR-10 10,000 train + 2,000 test; CIFAR-100 2,000 + 1,000).
    """
    import numpy as np

    sizes = {}
    for name, train_n, test_n in (
        ("cifar10", c10_train, c10_test),
        ("cifar100", c100_train, c100_test),
    ):
        src, out = Path(source) / FOLDERS[name], Path(dest) / FOLDERS[name]
        out.mkdir(parents=True, exist_ok=True)
        k, key = (10, "labels") if name == "cifar10" else (100, "fine_labels")
        if name == "cifar10":
            parts = [_load(src / f"data_batch_{i}") for i in range(1, 6)]
            data = np.concatenate([p["data"] for p in parts])
            labels = sum((list(p[key]) for p in parts), [])
            tr, test = (data, labels), _load(src / "test_batch")
            meta = "batches.meta"
        else:
            t = _load(src / "train")
            tr, test, meta = (t["data"], t[key]), _load(src / "test"), "meta"
        x, y = _first_per_class(*tr, train_n, k)
        if name == "cifar10":
            for i, chunk in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
                _dump(
                    out / f"data_batch_{i}",
                    {
                        "data": x[chunk],
                        key: [y[j] for j in chunk],
                        "batch_label": f"subset batch {i} of 5",
                    },
                )
        else:
            _dump(out / "train", {"data": x, key: y})
        tx, ty = _first_per_class(test["data"], test[key], test_n, k)
        _dump(out / ("test_batch" if name == "cifar10" else "test"), {"data": tx, key: ty})
        (out / meta).write_bytes((src / meta).read_bytes())
        sizes[name] = {"train": len(y), "test": len(ty)}
    (Path(dest) / "subset.json").write_text(json.dumps(sizes))
    return sizes


def write_tiny(dest: Path, c10_train=12, c10_test=3, c100_train=2, c100_test=1) -> None:
    """Random images around a colour per class, official layout: the dry run's data."""
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = (("cifar10", 10, c10_train, c10_test), ("cifar100", 100, c100_train, c100_test))
    for name, k, n_tr, n_te in sizes:
        out = Path(dest) / FOLDERS[name]
        out.mkdir(parents=True, exist_ok=True)
        key = "labels" if name == "cifar10" else "fine_labels"
        colour = rng.integers(0, 256, size=(k, 3))

        def make(per_class, k=k, colour=colour):
            y = np.repeat(np.arange(k), per_class)
            x = colour[y][:, :, None] + rng.normal(0, 25, size=(len(y), 3, 1024))
            return np.clip(x, 0, 255).astype(np.uint8).reshape(len(y), 3072), y.tolist()

        (x, y), (tx, ty) = make(n_tr), make(n_te)
        if name == "cifar10":
            for i, chunk in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
                _dump(out / f"data_batch_{i}", {"data": x[chunk], key: [y[j] for j in chunk]})
            _dump(out / "test_batch", {"data": tx, key: ty})
            _dump(out / "batches.meta", {"label_names": [f"class{c}" for c in range(k)]})
        else:
            _dump(out / "train", {"data": x, key: y})
            _dump(out / "test", {"data": tx, key: ty})
            _dump(out / "meta", {"fine_label_names": [f"class{c}" for c in range(k)]})


# -- running children under a deadline ----------------------------------------------------------
class Clock:
    def __init__(self, total_s: float):
        self.t0 = time.monotonic()
        self.end = self.t0 + total_s

    def left(self, deadline: float) -> float:
        return min(deadline, self.end) - time.monotonic()


def _stop(proc: subprocess.Popen) -> None:
    """End the child's own process group (it was started in a new session): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _own_group_dies_with_parent() -> None:
    """In the child: its own process group (so a budget's end stops all of it), and SIGKILL when
    gpu_check itself dies (a lent machine's time limit kills gpu_check, which cannot then stop
    its children: they must not run on while the machine is held)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the budgets still stop every child
        pass


def start(cmd: list[str], log: Path, cwd: Path = ROOT, capture=False) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), stderr to ``log``; stdout too,
    unless ``capture`` (then the caller must read it: ``finish``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as err:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=subprocess.PIPE if capture else err,
            stderr=err,
            text=True,
            preexec_fn=_own_group_dies_with_parent,
            env=env,
        )


def finish(proc: subprocess.Popen, seconds: float) -> tuple[str, bool]:
    """(stdout, timed_out): wait at most ``seconds``, then stop the child's process group."""
    try:
        out, _ = proc.communicate(timeout=max(seconds, 0.1))
        return out or "", False
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, _ = proc.communicate()
        return out or "", True


def run(cmd: list[str], seconds: float, log: Path, cwd: Path = ROOT) -> tuple[str, bool, int]:
    proc = start(cmd, log, cwd, capture=True)
    out, timed_out = finish(proc, seconds)
    with open(log, "a") as f:
        f.write("\n--- stdout ---\n" + out)
    return out, timed_out, proc.returncode


def result_line(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return None


def last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else "no output"


# -- part (a): CUDA tests -----------------------------------------------------------------------
def cuda_tests(root: Path = ROOT) -> list[str]:
    """Node ids of the test functions under tests/ whose source (decorators included) uses CUDA:
    ``torch.cuda``, ``.cuda(`` or a ``"cuda"`` device string."""
    uses = re.compile(r"torch\.cuda|\.cuda\(|[\"']cuda")
    ids = []
    for path in sorted((root / "tests").glob("test_*.py")):
        text = path.read_text()
        if not uses.search(text):
            continue
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if uses.search("\n".join(text.splitlines()[first - 1 : node.end_lineno])):
                    ids.append(f"tests/{path.name}::{node.name}")
    return ids


def part_tests(ctx) -> dict:
    ids = cuda_tests()
    xml = ctx.work / "tests_junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-m",
        "slow or not slow",
        f"--junitxml={xml}",
        *ids,
    ]
    out, timed_out, rc = run(cmd, ctx.left(), ctx.log("tests"))
    rows = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                hit = case.find(tag)
                if hit is not None:
                    outcome = {"failure": "failed", "error": "error"}.get(tag, "skipped")
                    message = (hit.get("message") or "")[:200]
            rows.append(
                {
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "outcome": outcome,
                    "time_s": float(case.get("time") or 0),
                    "message": message,
                }
            )
    status = "timeout" if timed_out else ("ok" if rc == 0 else "error")
    note = f"{len(ids)} test functions use CUDA"
    if rows and all(r["outcome"] == "skipped" for r in rows):
        note += "; all skipped (no CUDA device)"
    return {"status": status, "rows": rows, "note": note}


# -- part (b): official MTT code beside ours ----------------------------------------------------
def _reference_shapes(reference: Path, classes: int) -> list[tuple]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtt_networks", reference / "networks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.ConvNet(3, classes, 128, 3, "relu", "instancenorm", "avgpooling", (32, 32))
    return [tuple(p.shape) for p in net.parameters()]


def write_ab_inputs(ctx, name: str, ipc: int) -> Path:
    """One expert (start, middle, target: ConvNet-3 width 128) and ipc real images per class,
    normalised as the official code does without ZCA; for ours (``inputs.pt``) and, when the
    reference is given, the same vectors as its replay buffer."""
    import numpy as np
    import torch

    from datamodules.cifar import read_cifar
    from lightning_modules.condense.evaluation import init_parameters
    from lightning_modules.nets import FlatParams, build_classifier

    k = AB_ROWS[name]["classes"]
    folder = ctx.work / f"ab_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    net = init_parameters(build_classifier("convnet", num_classes=k, depth=3, width=128), g)
    layout = FlatParams(net)
    start = layout.flatten(net).detach()
    target = start + 0.01 * torch.randn(start.numel(), generator=g) * start.abs().mean()
    snapshots = torch.stack([start, (start + target) / 2, target])

    x, y = read_cifar(name, ctx.data, "train")
    pick = torch.cat([torch.nonzero(y == c).flatten()[:ipc] for c in range(k)])
    if len(pick) != k * ipc:
        raise RuntimeError(f"the {name} data has fewer than {ipc} train images of some class")
    images = x[pick].float() / 255
    images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    labels = torch.arange(k).repeat_interleave(ipc)
    torch.save({"snapshots": snapshots, "images": images, "labels": labels}, folder / "inputs.pt")
    if ctx.reference:
        shapes = _reference_shapes(ctx.reference, k)
        if shapes != [tuple(s) for s in layout.shapes]:
            raise RuntimeError(f"official ConvNet parameters {shapes} differ from ours")
        sizes = [int(np.prod(s)) for s in shapes]
        traj = [[t.view(s).clone() for t, s in zip(v.split(sizes), shapes)] for v in snapshots]
        buf = folder / "buffers" / f"{AB_ROWS[name]['ref']}_NO_ZCA" / "ConvNet"
        buf.mkdir(parents=True, exist_ok=True)
        torch.save([traj], buf / "replay_buffer_0.pt")
    return folder


def ab_measure(ctx, name: str, system: str, folder: Path, rnd: int) -> dict:
    row = AB_ROWS[name]
    ipc, steps, iters = ctx.ab["ipc"], ctx.ab["syn_steps"], ctx.ab["iterations"]
    log = ctx.log(f"ab_{name}_{system}_r{rnd}")
    if system == "official":
        flags = dict(
            dataset=row["ref"], model="ConvNet", ipc=ipc, syn_steps=steps, expert_epochs=2,
            max_start_epoch=1, lr_img=row["lr_img"], lr_lr=row["lr_lr"],
            lr_teacher=row["lr_teacher"], Iteration=iters, eval_it=iters + 10, num_eval=1,
            epoch_eval_train=0, pix_init="real", data_path=ctx.data,
            buffer_path=folder / "buffers",
        )  # fmt: skip
        if ctx.ab["batch_syn"]:
            flags["batch_syn"] = ctx.ab["batch_syn"]
        script = ROOT / "benchmarks" / "mtt_reference.py"
        cmd = [sys.executable, str(script), "--reference", str(ctx.reference),
               "--workdir", str(folder / f"official_r{rnd}"), "--",
               *[x for k, v in flags.items() for x in (f"--{k}", str(v))]]  # fmt: skip
    else:
        spec = dict(
            kind="lightning",
            device=ctx.device,
            ipc=ipc,
            width=128,
            depth=3,
            syn_steps=steps,
            repeats=iters,
            offload="auto",
            threads=ctx.threads,
            num_classes=row["classes"],
            batch_syn=ctx.ab["batch_syn"],
            inputs=str(folder / "inputs.pt"),
            unroll=system.split("_")[1],
        )
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_distill.py"),
            "--child",
            json.dumps(spec),
        ]
    out, timed_out, rc = run(cmd, ctx.left(), log)
    got = result_line(out)
    base = {
        "dataset": name,
        "ipc": ipc,
        "syn_steps": steps,
        "batch_syn": ctx.ab["batch_syn"] or "all",
        "system": system,
        "round": rnd,
    }
    if got and "error" not in got:
        return {**base, "status": "ok", "time_s": got["time_s"], "peak_mb": got.get("peak_mb")}
    error = (got or {}).get("error") or last_error(log)
    status = "timeout" if timed_out else ("oom" if "out of memory" in error.lower() else "error")
    return {**base, "status": status, "time_s": None, "peak_mb": None, "error": error}


def part_ab(ctx) -> dict:
    systems = ["official", "ours_full", "ours_recompute"]
    rows, failed = [], set()
    folders = {}
    for name in AB_ROWS:
        folders[name] = write_ab_inputs(ctx, name, ctx.ab["ipc"])
        if not ctx.reference:
            rows.append(
                {
                    "dataset": name,
                    "ipc": ctx.ab["ipc"],
                    "syn_steps": ctx.ab["syn_steps"],
                    "batch_syn": ctx.ab["batch_syn"] or "all",
                    "system": "official",
                    "round": 0,
                    "status": "reference not given",
                    "time_s": None,
                    "peak_mb": None,
                }
            )
    status = "ok"
    for rnd in range(1, ctx.ab["rounds"] + 1):
        for name in AB_ROWS:
            for system in systems if rnd % 2 else systems[::-1]:
                if (system == "official" and not ctx.reference) or (name, system) in failed:
                    continue
                if ctx.left() < 5:
                    status = "timeout"
                    break
                r = ab_measure(ctx, name, system, folders[name], rnd)
                rows.append(r)
                ctx.save_rows("ab", rows)
                if r["status"] == "timeout":
                    status = "timeout"
                elif r["status"] != "ok":
                    failed.add((name, system))  # an OOM or a crash: not tried again
    summary = []
    for name in AB_ROWS:
        for system in systems:
            ok = [
                r
                for r in rows
                if (r["dataset"], r["system"]) == (name, system) and r["status"] == "ok"
            ]
            other = [
                r["status"]
                for r in rows
                if (r["dataset"], r["system"]) == (name, system) and r["status"] != "ok"
            ]
            peaks = [r["peak_mb"] for r in ok if r["peak_mb"] is not None]
            summary.append(
                {
                    "dataset": name,
                    "system": system,
                    "runs": len(ok),
                    "time_s": statistics.median([r["time_s"] for r in ok]) if ok else None,
                    "peak_mb": max(peaks) if peaks else None,
                    "status": "ok" if ok else (other[0] if other else "not run"),
                }
            )
    for r in summary:  # ours against the official code on the same dataset
        ref = next(o for o in summary if (o["dataset"], o["system"]) == (r["dataset"], "official"))
        for key in ("time_s", "peak_mb"):
            both = r[key] is not None and ref[key]  # the CPU dry run has no official peak
            r[f"{key}_vs_official"] = r[key] / ref[key] if both else None
    return {"status": status, "rows": rows, "summary": summary}


# -- part (c): DC / DSA / DM / CAFE --------------------------------------------------------------
def part_matching(ctx) -> dict:
    m = ctx.matching
    rows, status = [], "ok"
    jobs = [
        (
            "bench_matching.py",
            [
                "--methods",
                "dm,dsa,dc",
                "--width",
                str(m["width"]),
                "--ipc",
                str(m["ipc"]),
                "--batch-real",
                str(m["batch_real"]),
                "--steps",
                str(m["steps"]),
            ],
        ),
        (
            "bench_cafe_kip.py",
            [
                "--variants",
                "cafe",
                "--width",
                str(m["width"]),
                "--ipc",
                str(m["ipc"]),
                "--batch-real",
                str(m["batch_real"]),
                "--batch-test",
                str(m["batch_test"]),
            ],
        ),
    ]
    for script, args in jobs:
        if ctx.left() < 5:
            status = "timeout"
            break
        out_json = ctx.work / f"{script}.json"
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--device",
            ctx.device,
            "--json",
            str(out_json),
            *args,
        ]
        _, timed_out, rc = run(cmd, ctx.left(), ctx.log(script))
        if out_json.exists():
            rows += json.loads(out_json.read_text())["rows"]
        if timed_out or rc != 0:
            status = "timeout" if timed_out else "error"
            rows.append({"method": script, "status": status, "error": last_error(ctx.log(script))})
        ctx.save_rows("matching", rows)
    return {
        "status": status,
        "rows": rows,
        "note": f"CIFAR-10 shapes, IPC {m['ipc']}, "
        f"ConvNet-3 width {m['width']}, real batch {m['batch_real']} per class",
    }


# -- part (d): the CIFAR-10 IPC 1 row -----------------------------------------------------------
def part_ipc1(ctx) -> dict:
    p = ctx.ipc1
    work = ctx.work / "ipc1"
    store = work / "experts"
    common = [
        f"paths.data_dir={ctx.data}",
        "dataset.download=false",
        "dataset=cifar10",
        f"dataset.zca={str(p['zca']).lower()}",
        f"paths.cache_dir={work / 'cache'}",
        "logger=none",
        f"net.width={p['width']}",
        f"paths.runs_dir={work / 'runs'}",
    ]
    if ctx.threads:
        common.append(f"threads={ctx.threads}")
    budget = ctx.left()
    t_experts = p["experts_s"] or 0.35 * budget
    t0 = time.monotonic()
    # experts: several processes fill one store (each claims indices with a lock) until the
    # experts' share of the budget ends; the experts finished by then are the store
    procs = [
        start(
            [
                sys.executable,
                "train.py",
                "task=teacher",
                *common,
                f"teacher.out={store}",
                f"teacher.num_experts={p['max_experts']}",
                f"teacher.epochs={p['expert_epochs']}",
                f"hydra.run.dir={work / f'teacher_{i}'}",
            ],
            ctx.log(f"ipc1_teacher_{i}"),
        )
        for i in range(p["teacher_procs"])
    ]
    until = time.monotonic() + t_experts
    teacher_timeout = False
    for proc in procs:
        _, timed_out = finish(proc, until - time.monotonic())
        teacher_timeout |= timed_out
    from datamodules.trajectories import ExpertStore

    experts = ExpertStore(store).indices() if store.exists() else []  # finished ones only
    row_base = {
        "experts": len(experts),
        "expert_epochs": p["expert_epochs"],
        "experts_s": round(time.monotonic() - t0, 1),
    }
    if not experts:
        return {
            "status": "timeout" if teacher_timeout else "error",
            "rows": [],
            "note": "no expert finished: " + last_error(ctx.log("ipc1_teacher_0")),
        }
    left = ctx.left()
    extra = list(p["distill_keys"])
    run_s = p["max_time_s"] or max(int(left - 50), 10)
    extra.append(f"+trainer.max_time=00:00:{run_s // 60:02d}:{run_s % 60:02d}")
    runs = {}
    for label, eps in (("MTT", 0.0), ("pruning (eps 0.1)", 0.1)):
        folder = work / f"distill_eps{eps}"
        cmd = [
            sys.executable,
            "train.py",
            "task=distill",
            *common,
            "ipc=1",
            f"distill.eps={eps}",
            f"distill.trajectories={store}",
            "distill.eval_every=0",
            *extra,
            f"hydra.run.dir={folder}",
        ]
        runs[label] = (folder, start(cmd, ctx.log(f"ipc1_distill_eps{eps}")))
    t1, rows, status = time.monotonic(), [], "ok"
    for label, (folder, proc) in runs.items():
        _, timed_out = finish(proc, ctx.left())
        log = ctx.log(f"ipc1_distill_eps{0.1 if label.startswith('pruning') else 0.0}")
        summary = folder / "summary.json"
        row = {"method": label, "paper": PAPER_IPC1[label], **row_base}
        if summary.exists():
            s = json.loads(summary.read_text())
            row.update(
                status="ok",
                final_acc=s.get("final_acc"),
                final_std=s.get("final_acc_convnet_std"),
                iterations=s.get("iterations"),
                learned_lr=s.get("learned_lr"),
                wall_s=round(time.monotonic() - t1, 1),
            )
        else:
            row.update(status="timeout" if timed_out else "error", error=last_error(log))
        status = row["status"] if row["status"] != "ok" else status
        rows.append(row)
        ctx.save_rows("ipc1", rows)
    note = (
        f"CIFAR-10 subset ({ctx.subset_note}); {len(experts)} experts x {p['expert_epochs']} "
        f"epochs in {row_base['experts_s']:.0f} s ({p['teacher_procs']} processes at once); MTT "
        "and pruning at once, the published row (5,000 iterations) cut by trainer.max_time "
        f"({run_s} s), so 'iterations' says "
        "how many fitted; test accuracy of the final set (not the best checkpoint), % on the "
        "subset's test split"
    )
    return {"status": status, "rows": rows, "note": note}


# -- outputs ------------------------------------------------------------------------------------
def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict) -> str:
    parts = results["parts"]
    lines = [
        f"# gpu_check on {results['device']}",
        "",
        f"torch {results['torch']}; "
        f"{'dry run (toy sizes, CPU)' if results['dry_run'] else 'full run'}; "
        f"{results['wall_s']:.0f} s of a {results['total_s']} s budget",
        "",
    ]
    for name in PARTS:
        part = parts.get(name)
        if not part:
            continue
        lines += [
            f"## {name}: {part['status']} ({part.get('wall_s', 0):.0f} s of "
            f"{part.get('budget_s', 0):.0f} s)",
            "",
        ]
        if part.get("note"):
            lines += [part["note"], ""]
        if name == "tests":
            lines += ["| test | outcome | s | message |", "|---|---|---|---|"]
            lines += [
                f"| {r['test']} | {r['outcome']} | {r['time_s']:.1f} | {r['message']} |"
                for r in part["rows"]
            ]
        elif name == "ab":
            lines += [
                "| dataset | system | s / iteration (median of runs) | peak MB | time / official "
                "| peak / official | runs | status |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['dataset']} | {r['system']} | {_fmt(r['time_s'])} | "
                f"{_fmt(r['peak_mb'], 0)} | {_fmt(r.get('time_s_vs_official'), 2)} | "
                f"{_fmt(r.get('peak_mb_vs_official'), 2)} | {r['runs']} | {r['status']} |"
                for r in part.get("summary", [])
            ]
            lines += [
                "",
                "Each run: "
                + "; ".join(
                    f"{r['dataset']} {r['system']} r{r.get('round')} {_fmt(r['time_s'])} s "
                    f"{_fmt(r['peak_mb'], 0)} MB ({r['status']})"
                    for r in part["rows"]
                ),
            ]
        elif name == "matching":
            lines += [
                "| method | per-class passes | image step s | inner loop s | s / iteration "
                "| peak MB | status |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['method']} | {r.get('variant', '-')} | "
                f"{_fmt(r.get('image_step_s'))} | "
                f"{_fmt(r.get('inner_s'))} | {_fmt(r.get('s_per_iter'))} | "
                f"{_fmt(r.get('peak_mb'), 0)} | {r.get('status', 'ok')} |"
                for r in part["rows"]
            ]
        elif name == "ipc1":
            lines += [
                "| method | test acc % (final, mean ± std) | paper | iterations | experts "
                "| status |",
                "|---|---|---|---|---|---|",
            ]
            for r in part["rows"]:
                acc = r.get("final_acc")
                acc_text = "-" if acc is None else f"{acc:.1f} ± {r.get('final_std') or 0:.1f}"
                lines.append(
                    f"| {r['method']} | {acc_text} | {r['paper']} | "
                    f"{_fmt(r.get('iterations'))} of 5000 | {r['experts']} x "
                    f"{r['expert_epochs']} epochs | {r['status']} |"
                )
        lines.append("")
    return "\n".join(lines)


def check_outputs(out: Path, parts, reference_given: bool) -> list[str]:
    """What is wrong with ``results.json`` / ``results.md`` (empty list: nothing)."""
    problems = []
    try:
        res = json.loads((out / "results.json").read_text())
    except (OSError, ValueError) as e:
        return [f"results.json unreadable: {e}"]
    if not (out / "results.md").read_text().startswith("# gpu_check"):
        problems.append("results.md does not start with its title")
    ab_keys = {"dataset", "system", "status", "time_s", "peak_mb"}
    keys = {
        "tests": {"test", "outcome"},
        "ab": ab_keys,
        "matching": {"method"},
        "ipc1": {"method", "status", "paper", "experts"},
    }
    for name in parts:
        part = res["parts"].get(name)
        if part is None:
            problems.append(f"part {name} missing")
            continue
        if part["status"] not in STATUSES:
            problems.append(f"part {name}: unknown status {part['status']!r}")
        if part["status"] in ("error", "timeout", "not run"):
            problems.append(f"part {name}: {part['status']} {part.get('note', '')}")
        if not part["rows"]:
            problems.append(f"part {name}: no rows")
        for r in part["rows"]:
            if not keys[name] <= set(r):
                problems.append(f"part {name}: row without {keys[name] - set(r)}: {r}")
        if name == "ab":
            official = {r["status"] for r in part["rows"] if r["system"] == "official"}
            want = "ok" if reference_given else "reference not given"
            if official != {want}:
                problems.append(f"ab: official rows say {official}, expected {want!r}")
            if any(r["status"] == "ok" and not r["time_s"] > 0 for r in part["rows"]):
                problems.append("ab: an ok row without a positive time")
        no_acc = [r for r in part["rows"] if r.get("status") == "ok" and "final_acc" not in r]
        if name == "ipc1" and no_acc:
            problems.append("ipc1: an ok row without final_acc")
    return problems


class Context:
    def __init__(self, a, out: Path):
        self.out = out
        self.work = Path(a.work).resolve() if a.work else out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.reference = Path(a.reference).resolve() if a.reference else None
        self.device, self.threads = a.device, a.threads
        self.clock = Clock(a.total_s)
        self.deadline = 0.0
        self.results: dict = {}

    def left(self) -> float:
        return self.clock.left(self.deadline)

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    def save_rows(self, part: str, rows: list) -> None:
        self.results["parts"].setdefault(part, {"status": "running"})["rows"] = rows
        self.write()

    def pack_logs(self) -> None:
        """Every child's stderr in one file beside the results (few files come back from a
        lent machine)."""
        import tarfile

        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            if (self.work / "logs").exists():
                tar.add(self.work / "logs", arcname="logs")

    def write(self) -> None:
        self.results["wall_s"] = time.monotonic() - self.clock.t0
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "results.md").write_text(markdown(self.results))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="output folder: results.json, results.md, logs.tar.gz")
    p.add_argument("--work", default=None, help="scratch: data, experts, logs (<out>/work)")
    p.add_argument("--data", default=None, help="CIFAR in the official layout (--write-subset's)")
    p.add_argument("--reference", default=None, help="checkout of the official MTT code")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, in this order")
    p.add_argument("--total-s", type=float, default=TOTAL_S, help="hard limit of the whole run")
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PART=S",
        help=f"a part's budget in seconds (defaults {BUDGET_S})",
    )
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, check outputs")
    p.add_argument("--device", default=None, help="cuda (default) | cpu (the dry run's)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the children")
    p.add_argument(
        "--write-subset",
        default=None,
        metavar="DIR",
        help="write the CIFAR subset that the GPU run carries into DIR; exit",
    )
    p.add_argument("--source", default="../shared/data", help="full CIFAR for --write-subset")
    a = p.parse_args(argv)
    if a.write_subset:
        sizes = write_subset(Path(a.source), Path(a.write_subset))
        total = sum(f.stat().st_size for f in Path(a.write_subset).rglob("*") if f.is_file())
        print(f"wrote {a.write_subset}: {sizes}, {total / 2**20:.1f} MiB")
        return 0
    if not a.out:
        p.error("--out is required")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    a.device = a.device or ("cpu" if a.dry_run else "cuda")
    a.threads = a.threads or (1 if a.dry_run else 0)  # the CPU is shared
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --dry-run (or --device cpu)")
    parts = [x for x in a.parts.split(",") if x]
    if unknown := set(parts) - set(PARTS):
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    budgets = dict(BUDGET_S)
    for item in a.budget:
        k, _, v = item.partition("=")
        if k not in PARTS:
            p.error(f"--budget {item}: unknown part")
        budgets[k] = float(v)
    ctx = Context(a, out)
    if a.reference and not (ctx.reference / "distill.py").exists():
        p.error(f"--reference {a.reference}: no distill.py there")
    if a.dry_run:
        ctx.data = ctx.work / "tiny_cifar"
        write_tiny(ctx.data)
        ctx.subset_note = "tiny random images, 12 train and 3 test per class"
        ctx.ab = dict(ipc=1, syn_steps=2, iterations=2, rounds=1, batch_syn=10)
        ctx.matching = dict(width=8, ipc=1, batch_real=4, batch_test=2, steps=1)
        ctx.ipc1 = dict(
            width=8,
            expert_epochs=3,
            max_experts=1000,  # more than fit: the teachers are stopped, as on the GPU
            teacher_procs=2,
            experts_s=60,  # the same kill-at-the-end path as on the GPU: many tiny experts fit
            max_time_s=5,  # the 5,000 published iterations, cut by trainer.max_time as there
            zca=False,  # its 3072 x 3072 fit is the same at any data size: slow on this CPU
            distill_keys=[
                "distill.syn_steps=2",
                "distill.eval_num=1",
                "distill.eval_epochs=2",
            ],
        )
        budgets = {k: max(v, 200) for k, v in budgets.items()}
        a.total_s = max(a.total_s, 900)
        ctx.clock = Clock(a.total_s)
    else:
        if not a.data:
            p.error("--data is required (the folder --write-subset wrote)")
        ctx.data = Path(a.data).resolve()
        sizes = ctx.data / "subset.json"
        sizes = json.loads(sizes.read_text())["cifar10"] if sizes.exists() else {}
        ctx.subset_note = f"{sizes.get('train', '?')} train, {sizes.get('test', '?')} test images"
        ctx.ab = dict(ipc=10, syn_steps=30, iterations=5, rounds=2, batch_syn=None)
        ctx.matching = dict(width=128, ipc=10, batch_real=256, batch_test=128, steps=2)
        ctx.ipc1 = dict(
            width=128,
            expert_epochs=50,
            max_experts=200,
            teacher_procs=4,
            experts_s=None,  # 35 % of the part's budget
            max_time_s=None,  # what is left, less 50 s for start-up and the evaluation
            zca=True,  # the published row's
            distill_keys=[],
        )
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    ctx.results = {
        "device": where,
        "torch": torch.__version__,
        "dry_run": a.dry_run,
        "total_s": a.total_s,
        "reference": str(ctx.reference) if ctx.reference else None,
        "budgets_s": budgets,
        "parts": {},
    }
    print(f"gpu_check on {where}: parts {parts}, {a.total_s:.0f} s in all", flush=True)
    if not ctx.reference:
        print(
            "gpu_check: reference not given (--reference): the official rows are not measured",
            flush=True,
        )
    for i, name in enumerate(parts):
        t0 = time.monotonic()
        own = budgets[name]
        if i == len(parts) - 1:  # the last part takes what the others left
            own = max(own, ctx.clock.end - t0)
        ctx.deadline = t0 + own
        ctx.results["parts"][name] = {"status": "running", "rows": [], "budget_s": own}
        ctx.write()
        if ctx.left() < 5:
            part = {"status": "not run", "rows": [], "note": "no time left"}
        else:
            try:
                part = globals()[f"part_{name}"](ctx)
            except Exception as e:  # one part's failure must not lose the others' results
                rows = ctx.results["parts"][name].get("rows", [])
                part = {"status": "error", "rows": rows, "note": f"{type(e).__name__}: {e}"}
        part.update(budget_s=own, wall_s=time.monotonic() - t0)
        ctx.results["parts"][name] = part
        ctx.write()
        ctx.pack_logs()
        print(f"  {name}: {part['status']} in {part['wall_s']:.0f} s", flush=True)
    print((out / "results.md").read_text())
    if a.dry_run:
        problems = check_outputs(out, parts, bool(ctx.reference))
        for line in problems:
            print(f"dry run: {line}", file=sys.stderr)
        print(f"dry run: outputs {'FAIL' if problems else 'ok'}", flush=True)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
