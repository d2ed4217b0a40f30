"""Coreset selectors (random, herding, forgetting) and ``task=coreset`` end to end."""

from __future__ import annotations

import pytest
import torch

from datamodules.syn_set import SyntheticSet
from datamodules.trajectories import ExpertStore
from lightning_modules.condense.coresets import (
    ForgettingTracker,
    check_ipc,
    forgetting_scores,
    herding_order,
    herding_per_class,
    most_forgotten_per_class,
    random_per_class,
)
from lightning_modules.errors import UserError
from tests.conftest import run_train

INF = float("inf")


def test_random_is_balanced_distinct_and_seeded():
    labels = torch.arange(60) % 3
    a = random_per_class(labels, 7, 3, torch.Generator().manual_seed(0))
    b = random_per_class(labels, 7, 3, torch.Generator().manual_seed(0))
    c = random_per_class(labels, 7, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 21
    assert labels[a].tolist() == [0] * 7 + [1] * 7 + [2] * 7


# Five 2-D points with mean mu = (0.02, 0). Step t picks the f nearest to t*mu - S:
#   t=1 target (0.02, 0)   -> (0.2, 0)  [2]
#   t=2 target (-0.16, 0)  -> (-1, -1)  [1]   (|.|^2 1.71 vs 2.35 for (1, 1))
#   t=3 target (0.86, 1)   -> (1, 1)    [3]
#   t=4 target (-0.12, 0)  -> (-4, 1)   [0]   (16.05 vs 17.16 for (3.9, -1))
#   t=5                    -> (3.9, -1) [4]
# Ranking by distance to the mean alone would give [2, 3, 1, ...]: the sequence is greedy herding.
HERDING_POINTS = torch.tensor([[-4.0, 1.0], [-1.0, -1.0], [0.2, 0.0], [1.0, 1.0], [3.9, -1.0]])


def test_herding_picks_the_known_greedy_sequence():
    assert herding_order(HERDING_POINTS, 5).tolist() == [2, 1, 3, 0, 4]
    assert herding_order(HERDING_POINTS, 3).tolist() == [2, 1, 3]


def test_herding_per_class_maps_back_to_dataset_indices():
    # class 1 holds the five points at odd positions; class 0 a second copy shifted far away
    features = torch.zeros(10, 2)
    labels = torch.tensor([0, 1] * 5)
    features[1::2] = HERDING_POINTS
    features[0::2] = HERDING_POINTS.flip(0) + 100
    chosen = herding_per_class(features, labels, 3, 2)
    assert chosen[3:].tolist() == [2 * i + 1 for i in (2, 1, 3)]
    assert chosen[:3].tolist() == [2 * i for i in (2, 3, 1)]  # flipped order, same points
    assert labels[chosen].tolist() == [0, 0, 0, 1, 1, 1]


def test_herding_mean_converges_to_class_mean():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 8, generator=g)
    order = herding_order(feats, 20)
    assert len(set(order.tolist())) == 20
    herded = (feats[order].mean(0) - feats.mean(0)).norm()
    randoms = [
        (feats[torch.randperm(200, generator=g)[:20]].mean(0) - feats.mean(0)).norm()
        for _ in range(20)
    ]
    assert herded < min(randoms)


# rows: presentations, columns: examples
SCRIPT = torch.tensor(
    [
        [1, 1, 0, 0, 1],
        [1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0],
    ],
    dtype=torch.bool,
)
# example 0 never forgets, 1 forgets 3 times, 2 is never learned, 3 once, 4 once (stays wrong)
SCRIPT_SCORES = [0.0, 3.0, INF, 1.0, 1.0]


def test_forgetting_counts_match_a_scripted_sequence():
    assert forgetting_scores(SCRIPT).tolist() == SCRIPT_SCORES


def test_forgetting_tracker_with_shuffled_batches():
    """Batches in a random order per epoch give the same counts as the per-example script."""
    g = torch.Generator().manual_seed(3)
    tracker = ForgettingTracker(5)
    for row in SCRIPT:
        order = torch.randperm(5, generator=g)
        for batch in (order[:2], order[2:]):
            tracker.update(batch, row[batch])
    assert tracker.scores().tolist() == SCRIPT_SCORES
    assert tracker.counts.tolist() == [0, 3, 0, 1, 1]
    assert tracker.learned.tolist() == [True, True, False, True, True]
    assert tracker.presentations.tolist() == [6] * 5


def test_most_forgotten_per_class_ranks_then_breaks_ties_by_seed():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scores = torch.tensor([1.0, INF, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    picks = [
        most_forgotten_per_class(scores, labels, 2, 2, torch.Generator().manual_seed(s))
        for s in range(20)
    ]
    for p in picks:
        assert labels[p].tolist() == [0, 0, 1, 1]
        assert p[0] == 1 and p[1] in (0, 3)  # never learned first, then one of the two 1.0s
        assert p[2] == 7 and p[3] in (4, 5, 6)
    assert len({tuple(p.tolist()) for p in picks}) > 1  # the ties really are broken by the seed
    again = most_forgotten_per_class(scores, labels, 2, 2, torch.Generator().manual_seed(0))
    assert torch.equal(again, picks[0])


def test_never_learned_last_ranks_them_below_learned_examples():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([INF, 0.0, 2.0, INF, INF, 0.0])
    picks = most_forgotten_per_class(
        scores, labels, 2, 2, torch.Generator().manual_seed(0), never_learned="last"
    )
    assert picks[:2].tolist() == [2, 1] and picks[2] == 5 and picks[3] in (3, 4)
    with pytest.raises(UserError, match="never_learned must be first or last"):
        most_forgotten_per_class(scores, labels, 2, 2, torch.Generator(), never_learned="x")


def test_ipc_larger_than_a_class_is_one_line():
    labels = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(
        UserError, match=r"^ipc=3 but class 1 has only 2 training images; lower ipc"
    ):
        check_ipc(labels, 3, 2)
    for select in (
        lambda: random_per_class(labels, 3, 2, torch.Generator()),
        lambda: herding_per_class(torch.zeros(5, 2), labels, 3, 2),
        lambda: most_forgotten_per_class(torch.zeros(5), labels, 3, 2, torch.Generator()),
    ):
        with pytest.raises(UserError, match="ipc=3"):
            select()
    with pytest.raises(UserError, match="ipc must be at least 1"):
        check_ipc(labels, 0, 2)


def coreset_overrides(data, method, *extra):
    return [
        "task=coreset",
        "dataset=cifar10",
        f"dataset.data_dir={data}",
        "dataset.download=false",
        f"coreset.method={method}",
        "ipc=3",
        "net.width=8",
        "coreset.train_epochs=1",
        "coreset.forgetting_epochs=2",
        "coreset.batch_size=64",
        "logger=none",
        *extra,
    ]


@pytest.mark.parametrize("method", ["random", "herding", "forgetting"])
def test_coreset_task_writes_a_balanced_set(tiny_data, tmp_path, compose, method):
    import train
    from datamodules.cifar import CIFARDataModule

    cfg = compose(*coreset_overrides(tiny_data, method, f"coreset.store={tmp_path / 'empty'}"))
    summary = train.run(cfg)
    coreset = SyntheticSet.load(summary["set_path"])
    assert summary["set_path"] == str(tmp_path / "outputs" / "run" / "set.pt")
    assert coreset.method == method and coreset.lr is None and coreset.ipc == 3
    assert coreset.labels.tolist() == sorted(list(range(10)) * 3)
    dm = CIFARDataModule(
        "cifar10", str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    coreset.check_against(dm)
    # every image is a distinct real training image of its class, in model input space
    rows = [(dm.train_x == img).flatten(1).all(1).nonzero().flatten() for img in coreset.images]
    assert all(len(r) == 1 for r in rows)
    found = torch.cat(rows)
    assert len(set(found.tolist())) == 30 and torch.equal(dm.train_y[found], coreset.labels)
    assert (tmp_path / "outputs" / "run" / "set.png").stat().st_size > 0
    if method == "herding":
        assert summary["feature_source"] == "trained 1 epochs"
    if method == "forgetting":
        assert 0.0 <= summary["never_learned_fraction"] <= 1.0


def test_herding_uses_an_expert_when_the_store_has_one(tiny_data, tmp_path, compose):
    import train

    store = tmp_path / "store"
    teacher = compose(
        "task=teacher", f"dataset.data_dir={tiny_data}", "dataset.download=false",
        "teacher.num_experts=1", "teacher.epochs=1", "teacher.dsa=false", f"teacher.out={store}",
        "net.width=8", "logger=none",
    )  # fmt: skip
    train.run(teacher)
    out = tmp_path / "my_set.pt"
    summary = train.run(
        compose(
            *coreset_overrides(tiny_data, "herding", f"coreset.store={store}", f"coreset.out={out}")
        )
    )
    assert summary["feature_source"] == f"{ExpertStore(store).path(0)}@epoch1"
    assert summary["set_path"] == str(out) and SyntheticSet.load(out).method == "herding"
    # a store of another width is refused, naming the way out
    with pytest.raises(UserError, match="net.width=8, not 16.*coreset.features=train"):
        train.run(
            compose(
                *coreset_overrides(tiny_data, "herding", f"coreset.store={store}", "net.width=16")
            )
        )
    with pytest.raises(UserError, match="no expert trajectories"):
        train.run(
            compose(
                *coreset_overrides(
                    tiny_data,
                    "herding",
                    f"coreset.store={tmp_path}/none",
                    "coreset.features=expert",
                )
            )
        )


def test_coreset_bad_input_is_one_line(tiny_data, tmp_path, compose):
    import train

    with pytest.raises(
        UserError, match="coreset.method must be one of random, herding, forgetting"
    ):
        train.run(compose(*coreset_overrides(tiny_data, "kmeans")))
    result = run_train(
        *coreset_overrides(tiny_data, "random", "ipc=21", f"paths.runs_dir={tmp_path}"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: ipc=21 but class 0 has only 20 training images; "
        "lower ipc or use more training data "
        "(dataset.train_per_class)"
    ]
