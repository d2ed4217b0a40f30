# ruff: noqa: E501  (the bad-value table reads best one case a line)
"""The configuration schema (lightning_modules/schema): every key of every conf/ option has a line,
every shipped option passes, and a table of bad values (one per key group, every value class)
is refused with one line naming the key and the value; through train.py: exit 2 and nothing on
disk, the run folder included."""

from __future__ import annotations

import os

import pytest

from lightning_modules.errors import UserError
from lightning_modules.schema import validate
from lightning_modules.schema.keys import DSA_GROUPS, KEYS, NESTED
from tests.conftest import ROOT, run_train

GROUPS = ("dataset", "net", "eps_net", "method", "trainer", "logger")
TASKS = sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def every_option_config():
    """``(overrides, cfg)`` for each task, each option of each group (under task=reproduce, which
    has every block) and each experiment."""
    from hydra import compose, initialize_config_dir

    runs = [[f"task={t}"] for t in TASKS]  # each task's own blocks
    runs += [["task=reproduce", f"{g}={o}"] for g in GROUPS for o in options(g)]
    runs += [[f"+experiment={e}"] for e in options("experiment")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for overrides in runs:
            yield overrides, compose("config", overrides=overrides)


def leaves(data: dict, prefix: str = ""):
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value and key not in NESTED:
            yield from leaves(value, key + ".")
        else:
            yield key


@pytest.fixture(scope="module")
def shipped():
    from omegaconf import OmegaConf

    return [(o, c, OmegaConf.to_container(c)) for o, c in every_option_config()]


def test_every_key_of_every_conf_option_has_a_schema_line(shipped):
    """A key added to conf/ without its line in lightning_modules/schema/keys.py fails here."""
    missing = {k for _, _, data in shipped for k in leaves(data) if k != "hydra"} - set(KEYS)
    missing = {k for k in missing if not k.startswith("hydra.")}
    assert not missing, f"add these keys to lightning_modules/schema/keys.py: {sorted(missing)}"


def test_no_schema_line_is_stale(shipped):
    present = {k for _, _, data in shipped for k in leaves(data)}
    assert not set(KEYS) - present, "keys.py lists keys no conf/ option has"


def test_every_shipped_option_passes(shipped, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # trainer=ddp asks for a GPU
    for _, cfg, _ in shipped:
        validate(cfg, composed=True)  # raises on the first refused key


def test_the_choice_lists_are_the_code_s_own():
    """The schema names choices without importing torch; they must stay those the code has."""
    from datamodules.tabular import TABLES
    from datamodules.toy_densities import DENSITIES
    from lightning_modules.condense.coresets import METHODS as CORESETS
    from lightning_modules.condense.dsa import GROUP_DRAWS
    from lightning_modules.condense.evaluation import PROTOCOLS
    from lightning_modules.condense.unroll import MODES
    from lightning_modules.diffusion.schedules import SAMPLERS, SCHEDULES
    from lightning_modules.nets.classifiers import CLASSIFIERS
    from lightning_modules.nets.eps_mlp import ACTIVATIONS
    from lightning_modules.tasks.matching_settings import KIP_KERNELS, METHODS
    from lightning_modules.tasks.reproduce.config import METHODS as COLUMNS
    from lightning_modules.tasks.reproduce.config import TABLES as PAPER_TABLES
    from lightning_modules.tt.bases import BASES

    def choices(key):
        kind = KEYS[key]
        kinds = getattr(kind, "options", (kind,))
        kinds = [getattr(k, "of", k) for k in kinds]
        return {c for k in kinds for c in getattr(k, "choices", ())}

    assert choices("dataset.density") == set(DENSITIES)
    assert set(TABLES) <= choices("dataset.name")
    assert choices("coreset.method") == set(CORESETS)
    assert set(GROUP_DRAWS) == set(DSA_GROUPS)
    assert choices("evaluate.protocol") == set(PROTOCOLS)
    assert choices("distill.unroll") == set(MODES)
    assert choices("ddpm.sampler") == set(SAMPLERS)
    assert choices("ddpm.schedule") == set(SCHEDULES)
    assert choices("net.name") == set(CLASSIFIERS) == choices("evaluate.nets")
    assert choices("eps_net.activation") == set(ACTIVATIONS)
    assert choices("method.kernel") == set(KIP_KERNELS)
    assert choices("method.name") == set(METHODS)
    assert choices("reproduce.methods") == set(COLUMNS)
    assert choices("table") == set(PAPER_TABLES)
    assert choices("eps_net.basis") == set(BASES)


# ------------------------------------------------------------------------- the bad-value table
BAD = [
    # (overrides, the key and value the one line names); a comment says the value class
    (["threads=0"], "threads must be a whole number in [1, 1024] or null, got 0"),  # zero
    (["threads=abc"], "threads must be"),  # wrong string
    (["seed=-1"], "seed must be a whole number in [0, 4294967295], got -1"),  # negative
    (["ipc=2.0"], "ipc must be a positive whole number, got 2.0"),  # float for int
    (["resume=yes"], "resume must be true or false, got 'yes'"),  # wrong string for a boolean
    (["task.epochs=2.0"], "task.epochs must be a positive whole number, got 2.0"),
    (["task.lr=nan"], "task.lr must be a positive number, got nan"),  # NaN
    (["task.lr=inf"], "task.lr must be a positive number, got inf"),  # inf
    (["task.momentum=-0.5"], "task.momentum must be a number in [0, 1), got -0.5"),
    (["task.schedule=linear"], "task.schedule must be one of cosine, step, constant"),
    (["dataset.zca=maybe"], "dataset.zca must be true or false or null, got 'maybe'"),
    (["dataset.batch_size=0"], "dataset.batch_size must be a positive whole number, got 0"),
    (["net.width=0"], "net.width must be a positive whole number, got 0"),
    (["net.norm=weird"], "net.norm must be one of instancenorm"),
    (["task=teacher", "teacher.weight_decay=-1"], "teacher.weight_decay must be a finite number >= 0"),
    (["task=teacher", "teacher.momentum=nan"], "teacher.momentum must be a number in [0, 1), got nan"),
    (["task=coreset", "coreset.never_learned=middle"], "coreset.never_learned must be one of"),
    (["task=distill", "distill.lr_img=nan"], "distill.lr_img must be a positive number or null, got nan"),
    (["task=distill", "distill.lr_lr=-1"], "distill.lr_lr must be a positive number or null"),
    (["task=distill", "distill.momentum=inf"], "distill.momentum must be a number in [0, 1), got inf"),
    (["task=distill", "distill.eps=1"], "distill.eps must be a number in [0, 1) or null, got 1"),
    (["task=distill", "distill.dsa_strategy=blur"], "distill.dsa_strategy must be 'none' or groups"),
    (["task=distill", "method=kip", "method.reg=nan"], "method.reg must be a positive number, got nan"),
    (["task=distill", "method=dc", "method.lr_net=nan"], "method.lr_net must be a positive number"),
    (["task=evaluate", "evaluate.momentum=nan"], "evaluate.momentum must be a number in [0, 1)"),
    (["task=evaluate", "evaluate.device=gpu0"], "evaluate.device must be one of auto, cpu, cuda"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.grad_clip=-1"], "ddpm.grad_clip must be a positive"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.clip_margin=-5"], "ddpm.clip_margin must be a finite number >= 0"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.eta=1.5"], "ddpm.eta must be a number in [0, 1], got 1.5"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.lr=nan"], "ddpm.lr must be a finite number >= 0, got nan"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.timesteps=1000000000"], "ddpm.timesteps must be a whole number in [1, 100000]"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.timesteps=1e9"], "ddpm.timesteps must be a whole number in [1, 100000], got 1000000000.0"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.sample_steps=5000"], "ddpm.sample_steps must be at most ddpm.timesteps (1000), got 5000"),  # relation
    (["task=ddpm", "dataset=swiss_roll", "ddpm.beta_start=0.5"], "ddpm.beta_start must be at most ddpm.beta_end (0.02), got 0.5"),  # relation
    (["task=ddpm", "dataset=swiss_roll", "dataset.dim=4"], "dataset.dim must be 2 or 3"),  # relation
    (["task=ddpm", "dataset=moons", "dataset.num_samples=0"], "dataset.num_samples must be a whole number in [1, 10000000], got 0"),
    (["task=ddpm", "dataset=tabular", "dataset.name=cifar10"], "dataset.name must be one of digits"),  # relation
    (["task=ddpm", "eps_net=ftt", "eps_net.num_basis=2"], "eps_net.num_basis must exceed eps_net.degree (2), got 2"),  # relation
    (["task=ddpm", "eps_net=ftt", "als.samples=many"], "als.samples must be one of auto or a positive whole number"),
    (["task=ddpm", "eps_net=unet", "eps_net.dropout=1.0"], "eps_net.dropout must be a number in [0, 1)"),
    (["task=reproduce", "reproduce.methods=[mtt,foo]"], "reproduce.methods must be a non-empty list of one of"),
    (["task=reproduce", "+reproduce.method_keys.dsa.outer_loop=0"], "reproduce.method_keys.dsa.outer_loop: method.outer_loop must be"),
    (["trainer.devices=-1"], "trainer.devices must be"),
    (["trainer.accelerator=quantum"], "trainer.accelerator must be one of auto, cpu, gpu"),
    (["trainer.strategy=foo"], "trainer.strategy must be auto or one of ddp, "),  # relation (Lightning's registry)
    (["+trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be a finite number >= 0 or null, got -1"),  # an added Trainer key
    (["task=ddpm", "eps_net=ftt", "dmrg.tol=1"], "dmrg.tol must be a number in [0, 1), got 1"),
    (["task=ddpm", "eps_net=ftt", "riemannian.shrink=1"], "riemannian.shrink must be a number in (0, 1), got 1"),
    (["paths.data_dir=null"], "paths.data_dir must be a path, got None"),
    (["task.epochs=true"], "task.epochs must be a positive whole number, got True"),  # a boolean for a count
    (["logger=csv", "logger.flush_logs_every_n_steps=0"], "logger.flush_logs_every_n_steps must be a positive"),
    (["+ddpm.learning_rate=0.1"], "ddpm.learning_rate is not a key of this configuration"),  # a typo
    (["+ddpm.lr=0.1"], "ddpm.lr is a key of task=ddpm; this run is task=classify"),  # another task's key
    (["task=classify", "+trainer.max_epochs=3"], "trainer.max_epochs is set by task=classify"),  # relation
]  # fmt: skip


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_value_is_refused_in_one_line_naming_the_key(compose, overrides, message):
    with pytest.raises(UserError) as e:
        validate(compose(*overrides), composed=True)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_accelerator_gpu_needs_a_gpu(compose, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="trainer.accelerator=gpu but this machine has no CUDA"):
        validate(compose("trainer=ddp"))


def test_good_values_pass(compose):
    validate(
        compose("task=classify", "dataset.train_per_class=5", "task.epochs=2", "threads=1"), True
    )
    validate(compose("task=ddpm", "dataset=swiss_roll", "ddpm.sample_steps=50", "ddpm.eta=1"))
    validate(compose("task=distill", "distill.batch_syn=all", "distill.offload=true"))
    validate(compose("task=classify", "+trainer.max_time=00:00:01:00"))  # an open Trainer key
    validate(compose("task=reproduce", "+reproduce.method_keys.dsa.outer_loop=2"))


# ---------------------------------------------------- through train.py: exit 2, nothing on disk
CLI = [
    ["threads=0"],
    ["task.epochs=2.0"],
    ["task=distill", "distill.lr_img=nan"],
    ["task=ddpm", "dataset=swiss_roll", "ddpm.grad_clip=-1"],
    ["task=ddpm", "dataset=swiss_roll", "ddpm.sample_steps=5000"],
    ["dataset.zca=maybe"],
    ["-m", "threads=1,0"],  # a multirun: every job is checked before the sweep folder exists
    ["hydra/launcher=local", "task=teacher"],  # a launcher without -m would run locally
    ["ddpm.foo=1"],  # Hydra's composition error (a key without +): one line too
    ["task.lr=[1"],  # a malformed override
]


@pytest.mark.parametrize("overrides", CLI, ids=[" ".join(o) for o in CLI])
def test_train_py_prints_one_line_exits_2_and_writes_nothing(overrides, tmp_path):
    runs = tmp_path / "runs"
    r = run_train(*overrides, f"paths.runs_dir={runs}", "logger=csv", cwd=tmp_path, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert not runs.exists() and os.listdir(tmp_path) == [], os.listdir(tmp_path)


# ------------------------------------------------- library errors, non-finite results, strict JSON
def test_a_library_error_on_a_user_value_is_one_line_naming_the_override():
    import torch

    from lightning_modules.schema.translate import translate

    try:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=-1.0)
    except ValueError as e:
        line = translate(e, ["task=classify", "task.momentum=-1.0", "seed=3"])
    assert line == "torch refused a value: Invalid momentum value: -1.0 (set by task.momentum=-1.0)"
    assert translate(ValueError("raised by this project"), ["seed=3"]) is None  # a bug: traceback


def test_summary_json_is_strict_and_says_which_values_were_not_finite(tmp_path):
    import json

    from lightning_modules.tasks.common import diverged, finite_metrics
    from lightning_modules.utils.files import write_json

    metrics = finite_metrics({"final_loss": float("nan"), "acc": 0.5, "per": [1.0, float("inf")]})
    assert diverged(metrics) == ["final_loss=nan"] and diverged({"acc": float("nan")}) == []
    write_json(tmp_path / "s.json", metrics)
    text = (tmp_path / "s.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["final_loss"] is None and data["per"] == [1.0, None] and data["acc"] == 0.5
    assert data["non_finite"] == {"final_loss": "nan", "per[1]": "inf"}


def test_a_diverged_classifier_is_an_error_and_no_feature_net_is_written(compose, tiny_data):
    """task.lr=1e30 is a positive number (the schema lets it through) and trains to NaN."""
    from pathlib import Path

    import train

    cfg = compose(
        "task=classify", f"dataset.data_dir={tiny_data}", "dataset.download=false",
        "task.epochs=1", "task.lr=1e30", "net.width=8", "logger=none", "threads=1",
        "trainer.enable_progress_bar=false",
    )  # fmt: skip
    with pytest.raises(
        UserError, match=r"training diverged: the network's weights and test loss .*task.lr"
    ):
        train.run(cfg)
    assert not (Path(cfg.paths.output_dir) / "feature_extractor.pt2").exists()
    assert not (Path(cfg.paths.output_dir) / "summary.json").exists()


def test_every_published_row_fits_the_schema():
    """A row fills null keys (conf/preset/<method>/...); the filled config is checked again, so
    a row value the schema refuses would stop that setting from running at all."""
    import yaml

    from lightning_modules.schema import problem

    rows = sorted((ROOT / "conf" / "preset").rglob("*.yaml"))
    assert rows
    for path in rows:
        for key, value in yaml.safe_load(path.read_text()).items():
            name = next(
                (f"{g}.{key}" for g in ("distill", "method", "dataset") if f"{g}.{key}" in KEYS),
                None,
            )
            assert name is not None, f"{path}: {key} is no distill.*, method.* or dataset.* key"
            assert problem(name, value) is None, f"{path}: {problem(name, value)}"


def test_a_library_error_wrapped_by_hydra_instantiate_is_translated_too():
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from lightning_modules.schema.translate import translate

    with pytest.raises(InstantiationException) as e:
        instantiate({"_target_": "lightning.pytorch.Trainer", "strategy": "foo", "logger": False})
    line = translate(e.value, ["task=classify", "trainer.strategy=foo"])
    assert line.startswith("lightning refused a value: You selected an invalid strategy name")
    assert line.endswith("(set by trainer.strategy=foo)") and "\n" not in line
