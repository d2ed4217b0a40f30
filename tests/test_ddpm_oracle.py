"""task=ddpm beside the exact noise predictor: the oracle's draws use the model's chain and
seeds (a model that *is* the exact predictor scores a ratio of exactly 1), and a tiny
``dataset=gmm`` run writes the oracle's metrics, the ratios and the component shares."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import train
from lightning_modules.diffusion.oracles import oracle_comparison
from lightning_modules.tasks import ddpm

TINY_GMM = [
    "task=ddpm",
    "dataset=gmm",
    "dataset.dim=4",
    "dataset.components=3",
    "dataset.num_samples=600",
    "dataset.num_reference=200",
    "ddpm.timesteps=100",
    "ddpm.steps=5",
    "ddpm.batch_size=64",
    "ddpm.sample_steps=20",
    "ddpm.sw_projections=100",
    "ddpm.sinkhorn_samples=200",
    "ddpm.floor_pairs=4",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "eps_net=resnet",
    "eps_net.width=16",
    "eps_net.depth=1",
]


class _Exact(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.eps, self.dummy = eps, nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        return self.eps(x, t)


def test_a_perfect_model_scores_exactly_the_oracle(compose, tmp_path):
    cfg = compose(*TINY_GMM, "ddpm.ema=null")
    r = ddpm.build(cfg, tmp_path)
    eps = r.data.exact_eps(r.schedule.alpha_bar)
    r.module.eps_net = _Exact(eps)
    n = r.sampler.num_samples
    draws = [r.sampler.draw(r.module, n, draw=i)[0] for i in ddpm.draw_indices(cfg)]
    assert len(draws) == 3 and not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws[1], r.sampler.draw(r.module, n, draw=101, eps=eps)[0])
    result = r.sampler.score(draws)
    out = ddpm.compare_to_oracle(r, result)
    for key in ("sw", "sinkhorn", "mmd"):
        assert out[f"{key}_ratio"] == pytest.approx(1.0), key
        assert out[f"{key}_oracle_draws"] == pytest.approx(result[f"{key}_draws"])
    assert out["mode_share_oracle"] == result["mode_share"]


def test_oracle_comparison_ratios_and_floors():
    seen = {}

    def score(draws, floors=None):
        seen["floors"] = floors
        return {"sw": 0.5, "sw_draws": [0.5] * len(draws), "mode_share": 0.9}

    model = {"sw": 0.75, "sw_floor": 0.1, "sw_floor_hi": 0.2, "floor_pairs": 3, "mode_share": 0.8}
    out = oracle_comparison(model, lambda i: torch.full((2, 1), float(i)), [0, 101], score)
    assert out["sw_ratio"] == 1.5 and out["sw_oracle"] == 0.5 and "sinkhorn_ratio" not in out
    assert out["mode_share_oracle"] == 0.9 and seen["floors"] == {
        "sw_floor": 0.1,
        "sw_floor_hi": 0.2,
        "floor_pairs": 3,
    }


def test_gmm_run_writes_oracle_metrics_and_component_shares(compose):
    summary = train.run(compose(*TINY_GMM))
    for key in ("sw", "sinkhorn", "mmd"):
        assert summary[f"{key}_oracle"] > 0, key
        assert math.isclose(summary[f"{key}_ratio"], summary[key] / summary[f"{key}_oracle"])
        assert f"{key}_floor_hi" in summary  # the bands stay beside the oracle
    assert 0 < summary["mode_share_oracle"] <= 1 and summary["oracle_sample_s"] > 0
    assert len(summary["component_shares"]) == 3 == len(summary["component_weights"])
    assert len(summary["component_shares_oracle"]) == 3
    assert 0 <= summary["component_share_gap"] <= 1 and "component_share_ok" in summary


def test_oracle_can_be_switched_off(compose):
    summary = train.run(compose(*TINY_GMM, "ddpm.oracle=false"))
    assert "sw_oracle" not in summary and "component_shares" in summary
