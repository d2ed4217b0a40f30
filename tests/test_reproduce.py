"""task=reproduce: the row and Table III end to end at tiny size, reuse of finished stages,
recomputation of changed ones, one-line errors, the quickstart preset and the paper numbers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import train
from datamodules.syn_set import SyntheticSet
from lightning_modules.errors import UserError
from lightning_modules.tasks import reproduce
from lightning_modules.tasks.common import net_options
from lightning_modules.tasks.reproduce import paper_numbers

ALL = ["random", "forgetting", "herding", "dsa", "dm", "mtt", "pruning"]


def tiny(data: Path, *extra: str) -> list[str]:
    """Overrides for a reproduce run of seconds on the tiny data with a tiny net."""
    return [
        "task=reproduce",
        "ipc=1",
        f"dataset.data_dir={data}",
        "dataset.download=false",
        "dataset.zca=false",
        "net.width=8",
        "net.depth=2",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "reproduce.experts=2",
        "reproduce.expert_epochs=2",
        "reproduce.iterations=2",
        "reproduce.syn_steps=2",
        "reproduce.eval_epochs=2",
        "reproduce.num_eval=1",
        "coreset.forgetting_epochs=2",
        *extra,
    ]


def run_in(compose, out: Path, *overrides: str) -> dict:
    cfg = compose(*overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return train.run(cfg)


def set_files(workdir: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in workdir.glob("*/set.pt")}


def test_row_end_to_end_then_reused_then_recomputed(
    compose, tiny_data, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)  # the default expert store is relative to the working directory
    caplog.set_level(logging.INFO, logger="lightning_modules.tasks.reproduce")
    first = tmp_path / "first"
    summary = run_in(compose, first, *tiny(tiny_data, "reproduce.full=true"))

    # the row: every method and the full split measured, the paper's numbers beside them
    row = json.loads((first / "row.json").read_text())
    assert row["columns"] == ALL + ["full"]
    for column in ALL + ["full"]:
        result = row["measured"]["acc"][column]["convnet"]
        assert 0 <= result["mean"] <= 100 and len(result["accs"]) == 1
        assert summary[f"acc_{column}"] == result["mean"]
    assert row["paper"]["acc"] == paper_numbers.table1("cifar10", 1)
    markdown = (first / "row.md").read_text()
    assert markdown == summary["row_md"]
    for text in ("Random", "Forgetting", "Herding", "MTT (ε=0)", "pruning (ε=0.1)", "full dataset"):
        assert text in markdown
    assert "| paper" in markdown and "| measured here, ConvNet (scale:" in markdown
    paper_line = next(line for line in markdown.splitlines() if line.startswith("| paper"))
    assert paper_line.split("|")[2:10] == [
        " 14.4 ",
        " 13.5 ",
        " 21.5 ",
        " 28.8 ",
        " 26.0 ",
        " 46.3 ",
        " 46.4 ",
        " 84.8 ",
    ]
    saved = json.loads((first / "summary.json").read_text())
    assert saved["row"]["paper"]["pruning"] == 46.4 and "measured" in saved["row"]
    for method in ALL:
        assert (first / "sets" / f"{method}.png").exists()
    assert row["images"]["all sets"] == "sets/compare.png" and (first / "sets/compare.png").exists()
    assert "[all sets](sets/compare.png)" in markdown

    # each stage ran as its sub-task in its own folder with its own summary.json
    workdir = Path(summary["workdir"])
    assert workdir.parent == tmp_path / "outputs" / "reproduce_cache"
    for method, task in [
        ("pruning", "distill"),
        ("mtt", "distill"),
        ("random", "coreset"),
        ("dsa", "distill"),
        ("dm", "distill"),
    ]:
        stage_summary = json.loads((workdir / method / "summary.json").read_text())
        assert stage_summary["task"] == task
    assert SyntheticSet.load(workdir / "pruning" / "set.pt").method == "distill"
    assert SyntheticSet.load(workdir / "mtt" / "set.pt").method == "mtt"
    assert SyntheticSet.load(workdir / "dsa" / "set.pt").method == "dsa"
    assert SyntheticSet.load(workdir / "dm" / "set.pt").lr is None
    assert json.loads((workdir / "mtt" / "summary.json").read_text())["eps"] == 0.0
    assert len(list((tmp_path / "trajectories" / "cifar10" / "convnet").glob("expert_*.pt"))) == 2
    before = set_files(workdir)
    assert sorted(before) == sorted(ALL)

    # the same command again: nothing recomputed, every evaluation read from the cache
    caplog.clear()
    second = tmp_path / "second"
    again = run_in(compose, second, *tiny(tiny_data, "reproduce.full=true"))
    assert set_files(workdir) == before
    assert again["reused"] == dict.fromkeys(ALL, True)
    assert "experts: 2 in" in caplog.text and "reused" in caplog.text
    evaluations = json.loads((second / "stages.json").read_text())["evaluations"]
    assert all(r["convnet"]["cached"] for r in evaluations.values())
    # row.json says what was measured, not how: the rerun writes the same row
    assert json.loads((second / "row.json").read_text())["measured"] == row["measured"]
    assert again["acc_pruning"] == summary["acc_pruning"]

    # a changed distillation setting recomputes the distilled sets only
    caplog.clear()
    third = run_in(compose, tmp_path / "third", *tiny(tiny_data, "reproduce.iterations=3"))
    assert third["reused"] == {
        "random": True,
        "forgetting": True,
        "herding": True,
        "dsa": False,  # reproduce.iterations sets every distillation's iterations
        "dm": False,
        "mtt": False,
        "pruning": False,
    }
    assert "settings changed" in caplog.text and "distill.iterations: 2 -> 3" in caplog.text
    after = set_files(workdir)
    assert all(after[m] == before[m] for m in ("random", "forgetting", "herding"))
    assert all(after[m] != before[m] for m in ("mtt", "pruning"))
    assert json.loads((workdir / "pruning" / "summary.json").read_text())["iterations"] == 3


def test_unfinished_distillation_continues_from_its_checkpoint(
    compose, tiny_data, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    overrides = tiny(tiny_data, "reproduce.methods=[pruning]", "distill.checkpoint_every=1")
    run_in(compose, tmp_path / "first", *overrides)
    (workdir,) = (tmp_path / "outputs" / "reproduce_cache").iterdir()
    stage = workdir / "pruning"
    # what a kill after the last checkpoint leaves: no set, the stage not marked done
    record = json.loads((stage / "stage.json").read_text())
    (stage / "stage.json").write_text(json.dumps({"key": record["key"], "done": False}))
    (stage / "set.pt").unlink()
    (stage / "summary.json").unlink()
    caplog.set_level(logging.INFO)
    summary = run_in(compose, tmp_path / "second", *overrides)
    assert summary["reused"] == {"pruning": False}
    assert "resuming, 2 iterations" in caplog.text
    assert "resuming distillation from" in caplog.text  # the distill task itself resumed
    assert SyntheticSet.load(stage / "set.pt").method == "distill"


@pytest.mark.slow
def test_cross_arch_table(compose, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = run_in(
        compose,
        tmp_path / "run",
        *tiny(
            tiny_data,
            "table=cross_arch",
            "ipc=10",
            "dataset.train_per_class=10",
            "reproduce.eval_epochs=1",
        ),
    )
    row = json.loads((tmp_path / "run" / "row.json").read_text())
    assert row["table"] == "cross_arch" and row["nets"] == list(paper_numbers.CROSS_ARCH_NETS)
    assert set(row["measured"]["acc"]) == {"mtt", "pruning"}
    for method in ("mtt", "pruning"):
        for net in paper_numbers.CROSS_ARCH_NETS:
            assert 0 <= summary[f"acc_{method}_{net}"] <= 100
    assert row["paper"]["acc"] == paper_numbers.CROSS_ARCH
    markdown = (tmp_path / "run" / "row.md").read_text()
    for name in ("ConvNet", "AlexNet", "VGG11", "ResNet18"):
        assert name in markdown
    lines = markdown.splitlines()
    assert any(
        line.startswith("| pruning (ε=0.1), paper | 65.4 | 35.8 | 52.9 | 51.8 |") for line in lines
    )
    assert any(
        line.startswith("| MTT (ε=0), paper | 64.3 | 34.2 | 50.3 | 46.4 |") for line in lines
    )
    # on a subset the experts live in the work dir, apart from full-data experts
    assert Path(row["expert_store"]) == Path(row["workdir"]) / "experts" / "convnet"


@pytest.mark.parametrize(
    "override,match",
    [
        ("table=table2", "table must be one of row, cross_arch, kip"),
        (
            "reproduce.methods=[random,kmeans]",
            "reproduce.methods must be a non-empty list of one of",
        ),
        ("reproduce.eps=0", "reproduce.eps must be a number in \\(0, 1\\)"),
        ("reproduce.nets=[lenet]", "reproduce.nets must be a non-empty list of one of convnet"),
        ("trainer.devices=2", "one device"),
    ],
)
def test_bad_settings_are_one_line_errors(
    compose, tiny_data, tmp_path, monkeypatch, override, match
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=match):
        run_in(compose, tmp_path / "run", *tiny(tiny_data, override))
    assert not (tmp_path / "trajectories").exists()  # refused before any work


def test_experts_too_short_for_expert_epochs(compose, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = tiny(tiny_data, "reproduce.expert_epochs=1", "reproduce.methods=[mtt]")
    with pytest.raises(UserError, match="raise reproduce.expert_epochs to at least 2"):
        run_in(compose, tmp_path / "run", *overrides)


def test_bad_table_through_train_py(tiny_data, tmp_path):
    from tests.conftest import run_train

    r = run_train(*tiny(tiny_data, "table=3"), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("error: table must be one of row, cross_arch, kip, got 3")
    )


def test_quickstart_preset_is_a_consistent_small_reproduce_run(compose):
    cfg = compose("+experiment=quickstart")
    assert cfg.task.name == "reproduce" and cfg.ipc == 1
    settled = reproduce.settle(cfg)
    # experts, distillation and evaluation all use the same narrow ConvNet
    assert settled.net.width == 32 and net_options(settled.net)["width"] == 32
    assert settled.teacher.num_experts == settled.distill.max_experts == 2
    assert settled.distill.iterations == 50 and settled.distill.syn_steps == 10
    assert settled.distill.lr_lr == 1e-7 and settled.distill.lr_teacher == 0.01  # the IPC 1 row
    assert settled.distill.lr_img == 1000 and not settled.dataset.zca  # dataset.zca=false wins
    assert settled.distill.preset == "none"  # applied once: the stages run exactly these values
    need = settled.distill.max_start_epoch - 1 + settled.distill.expert_epochs
    assert need <= settled.teacher.epochs  # no capping needed at this scale
    assert settled.evaluate.epochs == 200 and settled.evaluate.num_eval == 2
    assert reproduce.chosen_methods(settled, "row") == ["random", "mtt", "pruning"]
    # the work dir separates scales: another width is another folder
    other = reproduce.settle(compose("+experiment=quickstart", "net.width=16"))
    assert reproduce.default_workdir(settled) != reproduce.default_workdir(other)


def test_scale_knobs_write_the_sub_task_keys(compose):
    cfg = reproduce.settle(
        compose("task=reproduce", "reproduce.experts=3", "reproduce.syn_steps=7", "ipc=10")
    )
    assert cfg.teacher.num_experts == 3 and cfg.distill.syn_steps == 7
    assert cfg.distill.max_start_epoch == 20 and cfg.distill.iterations == 5000  # the preset
    assert cfg.evaluate.epochs == 1000 and cfg.evaluate.num_eval == 5
    assert cfg.dataset.zca  # dataset.zca: null follows the row (CIFAR-10 IPC 10: ZCA on)
    assert not reproduce.settle(
        compose("task=reproduce", "ipc=10", "dataset.zca=false")
    ).dataset.zca
    # a sub-task key given directly is kept when the knob is null
    cfg = reproduce.settle(compose("task=reproduce", "distill.iterations=11"))
    assert cfg.distill.iterations == 11


def test_evaluate_set_builds_nets_with_the_given_options():
    from lightning_modules.condense.evaluation import evaluate_set
    from lightning_modules.nets import build_classifier

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 0, 1])
    out = evaluate_set(
        images, labels, images, labels, nets=["convnet"], num_classes=2, lr=0.01, num_eval=1,
        epochs=1, progress=False, return_nets=True, net_options={"convnet": {"width": 8}},
    )  # fmt: skip
    net = out["_nets"]["convnet"][0]
    expected = build_classifier("convnet", 3, 2, 32, width=8)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in expected.parameters())
    default = evaluate_set(
        images, labels, images, labels, nets=["convnet"], num_classes=2, lr=0.01, num_eval=1,
        epochs=1, progress=False, return_nets=True,
    )["_nets"]["convnet"][0]  # fmt: skip
    assert sum(p.numel() for p in default.parameters()) > sum(p.numel() for p in net.parameters())


def test_paper_numbers_are_complete():
    methods = {"random", "forgetting", "herding", "dsa", "dm", "cafe", "mtt", "pruning"}
    for dataset in ("cifar10", "cifar100"):
        for ipc in (1, 10, 50):
            row = paper_numbers.table1(dataset, ipc)
            kip = set() if (dataset, ipc) == ("cifar100", 50) else {"kip"}  # not reported
            assert set(row) == methods | kip | {"full"}
            assert row["pruning"] >= row["mtt"]  # the paper's claim, as published
    assert paper_numbers.table1("cifar10", 10)["herding"] == 31.6
    assert paper_numbers.table1("cifar100", 10)["pruning"] == 43.1
    assert paper_numbers.table1("cifar10", 3) == {}
    assert paper_numbers.cross_arch("cifar10", 10)["mtt"]["resnet18"] == 46.4
    assert paper_numbers.cross_arch("cifar10", 1) == {}
    # REFERENCE.md C: CAFE 31.6/50.9/62.3 | 14.0/31.5/42.9; KIP width 128 from Table II
    cafe = [
        paper_numbers.table1(d, i)["cafe"] for d in ("cifar10", "cifar100") for i in (1, 10, 50)
    ]
    assert cafe == [31.6, 50.9, 62.3, 14.0, 31.5, 42.9]
    assert [paper_numbers.table1("cifar10", i)["kip"] for i in (1, 10, 50)] == [38.3, 57.6, 65.8]
    assert paper_numbers.KIP_TABLE2[("cifar100", 10)] == {128: 32.8, 1024: 28.3}


def test_row_with_cafe_and_kip_columns(compose, tiny_data, tmp_path, monkeypatch):
    """reproduce.methods=[cafe,kip]: each distilled by task=distill method=<name> in its own
    stage, the paper's CAFE (Table I) and KIP (Table II, width 128) numbers beside them."""
    monkeypatch.chdir(tmp_path)
    keys = (
        "+reproduce.method_keys={cafe: {window: 2, max_outer: 3, max_inner: 2, batch_test: 4, "
        "batch_real: 8}, kip: {rf_models: 2, batch_real: 8, chunk: 16}}"
    )
    out = tmp_path / "row"
    summary = run_in(compose, out, *tiny(tiny_data, "reproduce.methods=[cafe,kip]", keys))
    row = json.loads((out / "row.json").read_text())
    assert row["columns"][:2] == ["cafe", "kip"]
    paper_line = next(line for line in summary["row_md"].splitlines() if line.startswith("| paper"))
    assert paper_line.split("|")[2:4] == [" 31.6 ", " 38.3 "]
    assert "CAFE (+DSA)" in summary["row_md"] and "KIP (width 128)" in summary["row_md"]
    workdir = Path(summary["workdir"])
    for method in ("cafe", "kip"):
        assert SyntheticSet.load(workdir / method / "set.pt").method == method
        assert json.loads((workdir / method / "summary.json").read_text())["iterations"] == 2


def test_table_kip(compose, tiny_data, tmp_path, monkeypatch):
    """table=kip (Table II): the KIP set on ConvNets of each reproduce.kip_widths, the pruning
    set on the row's width, the paper's Table II beside them."""
    monkeypatch.chdir(tmp_path)
    keys = "+reproduce.method_keys={kip: {rf_models: 2, batch_real: 8, chunk: 16}}"
    out = tmp_path / "table2"
    summary = run_in(
        compose,
        out,
        *tiny(tiny_data, "table=kip", "reproduce.kip_widths=[16,4]", keys),
    )
    row = json.loads((out / "row.json").read_text())
    assert row["table"] == "kip"
    assert row["cells"] == [
        {"method": "kip", "width": "width 16"},
        {"method": "kip", "width": "width 4"},
        {"method": "pruning", "width": "width 8"},
    ]
    measured = row["measured"]["acc"]
    assert set(measured["kip"]) == {"width 16", "width 4"} and set(measured["pruning"]) == {
        "width 8"
    }
    for key in ("acc_kip_width16", "acc_kip_width4", "acc_pruning_width8"):
        assert 0 <= summary[key] <= 100
    # the KIP set was evaluated on ConvNets of those widths: the caches name them
    caches = [
        json.loads(p.read_text()) for p in (Path(summary["workdir"]) / "kip").glob("eval/*.json")
    ]
    assert sorted(c["key"]["options"]["width"] for c in caches) == [4, 16]
    # CIFAR-10 IPC 1 in the paper: KIP-1024 49.9, KIP-128 38.3, ours (128) 46.4; none at 16 / 4
    assert "Table II: cifar10 IPC 1" in summary["row_md"] and "| — | — | — |" in summary["row_md"]


def test_table_kip_paper_line_at_the_published_widths(compose):
    from lightning_modules.tasks.reproduce.tables import kip_table

    cfg = compose("task=reproduce", "table=kip", "ipc=10")
    info = {"short": "s", "long": "l"}
    r = {"accs": [1.0], "mean": 1.0, "std": 0.0}
    results = {"kip": {"width 1024": r, "width 128": r}, "pruning": {"width 128": r}}
    markdown, record = kip_table(
        cfg, ["kip", "pruning"], ["width 1024", "width 128"], results, info, {}
    )
    assert record["paper"]["acc"] == {
        "kip width 1024": 62.7,
        "kip width 128": 57.6,
        "pruning width 128": 65.5,
    }
    assert "| 62.7 | 57.6 | 65.5 |" in markdown
