"""Expert store (write, skip, load, validate, claim) and ``task=teacher`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from datamodules.trajectories import ExpertStore, default_store_dir
from lightning_modules.errors import UserError
from lightning_modules.condense.experts import build_seeded, train_expert
from lightning_modules.utils.seeds import derive_seed
from lightning_modules.nets import FlatParams, build_classifier
from tests.conftest import ROOT, run_train


def small_net():
    return build_classifier("convnet", depth=1, width=4)


def fake_meta(net, epochs: int, **changes) -> dict:
    layout = FlatParams(net)
    meta = {
        "net": {"name": "convnet", "depth": 1, "width": 4},
        "param_names": layout.names,
        "param_shapes": [list(s) for s in layout.shapes],
        "dataset": "cifar10",
        "zca": False,
        "zca_eps": None,
        "lr": 0.01,
        "seed": 0,
        "epochs": epochs,
        "batch_size": 256,
        "dsa_strategy": "",
        "test_acc": [10.0] * (epochs + 1),
        "num_classes": 10,
        "channels": 3,
        "im_size": 32,
    }
    meta.update(changes)
    return meta


@pytest.fixture
def store_with_two(tmp_path):
    net = small_net()
    p = FlatParams(net).numel
    store = ExpertStore(tmp_path / "store")
    for index in (0, 3):
        store.write(index, torch.randn(3, p), fake_meta(net, 2, seed=index))
    return store, p


def test_default_store_dir_separates_zca():
    assert (
        default_store_dir("cifar10", False, "convnet").as_posix() == "trajectories/cifar10/convnet"
    )
    assert (
        default_store_dir("cifar100", True, "vgg11", root="x").as_posix() == "x/cifar100-zca/vgg11"
    )


def test_store_writes_lists_and_loads_lazily(store_with_two):
    store, p = store_with_two
    assert store.indices() == [0, 3] and len(store) == 2
    assert store.exists(3) and not store.exists(1)
    assert store.path(3).name == "expert_0003.pt"
    expert = store.load(3)
    assert expert.snapshots.shape == (3, p) and expert.snapshots.dtype == torch.float32
    assert expert.epochs == 2 and expert.meta["seed"] == 3
    assert torch.equal(expert.params(0), expert.snapshots[0])
    # no temporary files are left beside the experts
    assert sorted(f.name for f in store.root.iterdir()) == ["expert_0000.pt", "expert_0003.pt"]


def test_store_ignores_temporary_and_lock_files(store_with_two):
    store, _ = store_with_two
    (store.root / ".expert_0005.pt.tmp123").write_bytes(b"half")
    (store.root / "expert_0006.pt.lock").write_text("x")
    assert store.indices() == [0, 3]
    store.remove_partial(5)
    assert not (store.root / ".expert_0005.pt.tmp123").exists()


def test_check_accepts_matching_store(store_with_two):
    store, p = store_with_two
    store.check(net="convnet", dataset="cifar10", zca=False, num_params=p)
    store.check(net={"name": "convnet", "width": 4, "_target_": "x"}, dataset="cifar10", zca=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"net": "alexnet"}, "trained with net=convnet, not net=alexnet"),
        ({"net": {"name": "convnet", "width": 128}}, "net.width=4, not 128"),
        ({"dataset": "cifar100"}, "trained on cifar10, not dataset=cifar100"),
        ({"zca": True}, "dataset.zca=false, this run has dataset.zca=true"),
        ({"num_params": 7}, "parameters per snapshot, the configured net has 7"),
    ],
)
def test_check_rejects_mismatch(store_with_two, kwargs, match):
    store, _ = store_with_two
    args = {"net": "convnet", "dataset": "cifar10", "zca": False, **kwargs}
    with pytest.raises(UserError, match=match):
        store.check(**args)


def test_empty_store_names_the_teacher_command(tmp_path):
    store = ExpertStore(tmp_path / "nothing")
    with pytest.raises(UserError) as e:
        store.check(net="convnet", dataset="cifar10", zca=True)
    msg = str(e.value)
    assert "no expert trajectories" in msg and "\n" not in msg
    assert "python train.py task=teacher dataset=cifar10 dataset.zca=true net=convnet" in msg
    assert f"teacher.out={tmp_path / 'nothing'}" in msg


def test_corrupt_truncated_and_foreign_files_are_user_errors(store_with_two, tmp_path):
    store, _ = store_with_two
    data = store.path(0).read_bytes()
    store.path(0).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"expert_0000.pt is truncated or corrupt.*delete it"):
        store.load(0)
    torch.save({"weights": torch.zeros(3)}, store.path(3))
    with pytest.raises(UserError, match="not a valid expert"):
        store.load(3)
    with pytest.raises(UserError, match=r"expert_0001.pt does not exist .*holds indices 0, 3"):
        store.load(1)
    # check() reports a corrupt expert the same way
    with pytest.raises(UserError, match="truncated or corrupt"):
        store.check(net="convnet", dataset="cifar10", zca=False)


def test_snapshot_count_must_match_epochs(tmp_path):
    net = small_net()
    store = ExpertStore(tmp_path)
    store.write(0, torch.zeros(2, FlatParams(net).numel), fake_meta(net, 5))
    with pytest.raises(UserError, match="2 snapshots for 5 epochs"):
        store.load(0)


def test_claim_is_exclusive_and_released(tmp_path):
    store = ExpertStore(tmp_path)
    first = store.claim(4)
    assert first.held
    assert not store.claim(4).held  # a second claimant (separate open file) is refused
    assert store.claim(5).held
    first.release()
    again = store.claim(4)
    assert again.held
    with again:
        pass
    assert not store.path(4).with_name("expert_0004.pt.lock").exists()  # removed on success


def test_claim_of_a_killed_process_is_not_stale(tmp_path):
    """A process that dies holding a claim leaves a lock file, but no lock: the index is free."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]);"
        "from datamodules.trajectories import ExpertStore;"
        "c = ExpertStore(sys.argv[1]).claim(0); print(c.held, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "True"
        assert not ExpertStore(tmp_path).claim(0).held
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / "expert_0000.pt.lock").exists()
    assert ExpertStore(tmp_path).claim(0).held


def test_build_seeded_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = (build_seeded(small_net, derive_seed(0, "expert", i)) for i in (1, 1, 2))
    assert torch.equal(state, torch.random.get_rng_state())
    a, b, c = (FlatParams(n).flatten(n) for n in (a, b, c))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert derive_seed(1, "expert", 0) != derive_seed(0, "expert", 1)


def test_train_expert_records_every_epoch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 32, 32, generator=g), torch.arange(40) % 10
    net = build_seeded(small_net, 7)
    init = FlatParams(net).flatten(net)
    seen = []
    snaps, acc = train_expert(
        net,
        x,
        y,
        x[:20],
        y[:20],
        epochs=3,
        seed=7,
        lr=0.1,
        batch_size=16,
        on_epoch=lambda e, a: seen.append(e),
    )
    assert snaps.shape == (4, FlatParams(net).numel) and snaps.dtype == torch.float32
    assert torch.equal(snaps[0], init) and torch.equal(snaps[-1], FlatParams(net).flatten(net))
    assert all(not torch.equal(snaps[e], snaps[e + 1]) for e in range(3))
    assert len(acc) == 4 and seen == [0, 1, 2, 3]
    snaps2, _ = train_expert(
        build_seeded(small_net, 7), x, y, x[:20], y[:20], epochs=3, seed=7, lr=0.1, batch_size=16
    )
    assert torch.equal(snaps, snaps2)  # same seed, same trajectory


def teacher_overrides(data, store, *extra):
    return [
        "task=teacher",
        "dataset=cifar10",
        f"dataset.data_dir={data}",
        "dataset.download=false",
        "teacher.num_experts=2",
        "teacher.epochs=2",
        "teacher.dsa=false",
        f"teacher.out={store}",
        "net.width=16",
        "logger=csv",
        *extra,
    ]


def test_teacher_task_in_process(tiny_data, tmp_path, compose):
    import train

    store_dir = tmp_path / "store"
    cfg = compose(*teacher_overrides(tiny_data, store_dir))
    summary = train.run(cfg)
    assert summary["experts_trained"] == 2 and summary["experts_in_store"] == 2
    store = ExpertStore(store_dir)
    expert = store.load(1)
    meta = expert.meta
    assert expert.snapshots.shape == (3, summary["num_params"])
    assert (
        meta["net"]["name"] == "convnet"
        and meta["net"]["width"] == 16
        and "_target_" not in meta["net"]
    )
    assert meta["dataset"] == "cifar10" and meta["zca"] is False and len(meta["test_acc"]) == 3
    assert meta["lr"] == 0.01 and meta["momentum"] == 0 and meta["batch_size"] == 256
    assert meta["seed"] == derive_seed(cfg.seed, "expert", 1) and meta["index"] == 1
    assert (tmp_path / "outputs" / "run" / "expert_test_acc.png").stat().st_size > 0
    # the trajectory is that of a net built from the recorded seed
    net = build_seeded(lambda: build_classifier("convnet", width=16), meta["seed"])
    assert torch.equal(expert.snapshots[0], FlatParams(net).flatten(net))
    # a different recipe must not be mixed into the same store
    with pytest.raises(UserError, match="trained with epochs=2, this run has teacher.epochs=3"):
        train.run(compose(*teacher_overrides(tiny_data, store_dir, "teacher.epochs=3")))
    with pytest.raises(UserError, match="net.width=16, not 8"):
        train.run(compose(*teacher_overrides(tiny_data, store_dir, "net.width=8")))


def test_teacher_leaves_an_index_claimed_elsewhere(tiny_data, tmp_path, compose):
    """Another process training expert 0 (holding its claim): this run trains only expert 1."""
    import train

    store_dir = tmp_path / "store"
    other = ExpertStore(store_dir).claim(0)
    assert other.held
    try:
        summary = train.run(compose(*teacher_overrides(tiny_data, store_dir)))
    finally:
        other.release()
    assert summary["trained_indices"] == [1] and summary["experts_busy_elsewhere"] == 1
    assert ExpertStore(store_dir).indices() == [1]
    # the rerun (claim released, e.g. the other process died) fills the gap and skips expert 1
    summary = train.run(compose(*teacher_overrides(tiny_data, store_dir)))
    assert summary["trained_indices"] == [0] and summary["experts_skipped"] == 1
    assert ExpertStore(store_dir).indices() == [0, 1]


def test_teacher_refuses_a_spawn_strategy(tiny_data, tmp_path, compose):
    """Several devices run under trainer=ddp (tests/test_resume_ddp.py); spawn cannot run a loop."""
    import train

    cfg = compose(
        *teacher_overrides(
            tiny_data, tmp_path / "s", "trainer=ddp_cpu", "trainer.strategy=ddp_spawn"
        )
    )
    with pytest.raises(UserError, match="use trainer.strategy=ddp"):
        train.run(cfg)


@pytest.mark.slow
def test_teacher_cli_writes_two_experts_and_rerun_skips(tiny_data, tmp_path):
    """The issue's acceptance command (on tiny data): two files, and a second run skips them."""
    store_dir = tmp_path / "store"
    args = [
        "task=teacher",
        "dataset=cifar10",
        "teacher.num_experts=2",
        "teacher.epochs=2",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        f"teacher.out={store_dir}",
        "logger=none",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    dsa_available = (ROOT / "lightning_modules" / "dsa.py").exists()
    if not dsa_available:
        args.append("teacher.dsa=false")
    first = run_train(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    files = sorted(p.name for p in store_dir.iterdir())
    assert files == ["expert_0000.pt", "expert_0001.pt"]
    mtimes = [p.stat().st_mtime_ns for p in sorted(store_dir.iterdir())]
    time.sleep(0.05)
    second = run_train(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    summaries = sorted((tmp_path / "runs" / "teacher").glob("*/summary.json"))
    last = json.loads(summaries[-1].read_text())
    assert last["experts_trained"] == 0 and last["experts_skipped"] == 2
    assert [p.stat().st_mtime_ns for p in sorted(store_dir.iterdir())] == mtimes
    assert ExpertStore(store_dir).load(0).meta["dsa_strategy"] == (
        "" if not dsa_available else "color_crop_cutout_flip_scale_rotate"
    )


def test_teacher_cli_bad_store_is_one_line(tiny_data, tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "expert_0000.pt").write_bytes(b"not a zip")
    result = run_train(
        *teacher_overrides(tiny_data, store_dir, f"paths.runs_dir={tmp_path / 'runs'}"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "expert_0000.pt is truncated or corrupt" in lines[0]
