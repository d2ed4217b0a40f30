"""task=reproduce with DATM / PAD columns: their published numbers, their sets evaluated on soft
and on hard labels (never mixed), cached, and the cross-architecture table accepting them.

The DATM distillation itself is ``task=distill method=datm`` (written separately); here a stand-in
stage writes a soft-label set so that what this file checks (stage wiring, evaluation, tables)
does not depend on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

from datamodules.syn_set import SyntheticSet
from lightning_modules.tasks.reproduce import config, paper_numbers, stages, tables
from tests.test_reproduce import run_in, tiny


def fake_soft_label_distillation(monkeypatch):
    """``task=distill method=datm|pad`` replaced by a stand-in writing a soft-label set of random
    real images (the stage's caching, evaluation and tables are the real ones)."""
    real_run_stage = stages.run_stage
    calls = []

    def config_without_method_file(cfg, method):
        sub = cfg.copy()
        with open_dict(sub):
            sub.method = OmegaConf.create({"name": method})
            sub.distill.eps = 0.0
        return sub

    def run_stage(sub, out_dir):
        method = (sub.get("method") or {}).get("name")
        if sub.task.name != "distill" or method not in config.SOFT_LABEL_METHODS:
            return real_run_stage(sub, out_dir)
        from lightning_modules.tasks.common import build_datamodule

        calls.append(method)
        dm = build_datamodule(sub)
        dm.setup()
        g = torch.Generator().manual_seed(0)
        ipc = int(sub.ipc)
        images = torch.cat([dm.real_images(c, ipc, g) for c in range(dm.num_classes)])
        labels = torch.arange(dm.num_classes).repeat_interleave(ipc)
        soft = 3.0 * F.one_hot(labels, dm.num_classes).float()
        SyntheticSet(
            images, labels, 0.01, dm.transform.state_dict(), dm.name, ipc, method, {},
            soft_labels=soft,
        ).save(Path(out_dir) / "set.pt")  # fmt: skip
        return {"iterations": 0}

    monkeypatch.setattr(stages, "soft_label_stage_config", config_without_method_file)
    monkeypatch.setattr(stages.start_window, "fitted_to_experts", lambda sub, epochs: sub)
    monkeypatch.setattr(stages, "run_stage", run_stage)
    return calls


def test_row_with_datm_column_reports_acc_soft_and_acc_hard(
    compose, tiny_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    calls = fake_soft_label_distillation(monkeypatch)
    out = tmp_path / "row"
    summary = run_in(compose, out, *tiny(tiny_data, "reproduce.methods=[random,datm]"))
    row = json.loads((out / "row.json").read_text())
    assert row["columns"] == ["random", "datm_soft", "datm_hard", "full"]
    measured = row["measured"]["acc"]
    assert set(measured) == {"random", "datm_soft", "datm_hard"}
    assert summary["acc_datm_soft"] == measured["datm_soft"]["convnet"]["mean"]
    assert summary["acc_datm_hard"] == measured["datm_hard"]["convnet"]["mean"]
    # the soft and hard evaluations train different networks on the same images
    workdir = Path(summary["workdir"])
    cached = sorted(p.name for p in (workdir / "datm" / "eval").glob("*.json"))
    assert len(cached) == 2
    keys = [json.loads((workdir / "datm" / "eval" / n).read_text())["key"] for n in cached]
    assert sorted(k["labels"] for k in keys) == ["hard", "soft"]
    # the published DATM number stands over acc_soft, none over acc_hard
    paper_line = next(line for line in summary["row_md"].splitlines() if line.startswith("| paper"))
    assert paper_line.split("|")[2:6] == [" 14.4 ", " 46.9 ", " — ", " 84.8 "]
    assert "DATM: its paper" in paper_line
    assert "DATM, acc_soft" in summary["row_md"] and "DATM, acc_hard" in summary["row_md"]
    assert row["paper"]["soft_label_sources"]["datm"].startswith("Guo et al.")
    assert calls == ["datm"]
    # a rerun reuses the set and both evaluations
    again = run_in(compose, tmp_path / "again", *tiny(tiny_data, "reproduce.methods=[random,datm]"))
    assert calls == ["datm"]
    assert again["acc_datm_soft"] == summary["acc_datm_soft"]
    details = json.loads((tmp_path / "again" / "stages.json").read_text())
    assert details["evaluations"]["datm_soft"]["convnet"]["cached"] is True


def test_published_datm_and_pad_numbers():
    soft = [
        paper_numbers.published_row(d, i)[m]
        for m in ("datm", "pad")
        for d in ("cifar10", "cifar100")
        for i in (1, 10, 50)
    ]
    assert soft == [46.9, 66.8, 76.1, 27.9, 47.2, 55.0, 47.2, 67.4, 77.0, 28.4, 47.8, 55.9]
    assert "datm" not in paper_numbers.published_row("cifar10", 10, ["mtt"])
    assert paper_numbers.table1("cifar10", 10).keys().isdisjoint({"datm", "pad"})


def test_cross_arch_table_accepts_soft_label_sets(compose):
    cfg = compose("task=reproduce", "table=cross_arch", "reproduce.methods=[mtt,pruning,datm,pad]")
    methods = config.chosen_methods(cfg, "cross_arch")
    assert methods == ["mtt", "pruning", "datm", "pad"]
    assert config.chosen_methods(compose("task=reproduce", "table=cross_arch"), "cross_arch") == [
        "mtt",
        "pruning",
    ]
    nets = list(paper_numbers.CROSS_ARCH_NETS)

    def result(mean):
        return {net: {"accs": [mean], "mean": mean, "std": 0.0} for net in nets}

    results = {"mtt": result(40.0), "pruning": result(41.0)}
    for method, base in (("datm", 50.0), ("pad", 52.0)):
        results[f"{method}_soft"], results[f"{method}_hard"] = result(base), result(base - 10)
    info = {"short": "tiny", "long": "tiny"}
    markdown, record = tables.cross_arch_table(cfg, methods, nets, results, info, {})
    lines = markdown.splitlines()
    assert any(line.startswith("| DATM, acc_soft, measured here") for line in lines)
    assert any(line.startswith("| PAD, acc_hard, measured here") and "42.0 ± 0.0" in line
               for line in lines)  # fmt: skip
    assert not any(line.startswith("| DATM, paper") for line in lines)  # none published here
    assert any(line.startswith("| pruning (ε=0.1), paper | 65.4") for line in lines)
    assert set(record["measured"]["acc"]) == set(results)
