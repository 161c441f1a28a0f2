"""Flow-matching and DDPM objectives: closed-form zero losses, determinism, time and label sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.objective import Objective
from distill.objectives.ddpm import DDPMEpsilon
from distill.objectives.flow_matching import FlowMatching, label_dropout, shifted_logit_normal

C = torch.tensor([[0.5, -1.0, 2.0]])  # a point-mass data distribution


def _point_mass(generator: torch.Generator, batch: int):
    return C.expand(batch, 3).clone(), torch.randint(0, 10, (batch,), generator=generator)


def test_flow_matching_loss_is_zero_for_the_exact_velocity_and_deterministic():
    holder = nn.Linear(1, 1)
    exact = FlowMatching(model=holder, sample=_point_mass, batch_size=64, time_shift=3.0,
                         velocity=lambda x, t, labels: (x - C) / t[:, None])  # x_t = (1-t) c + t n => n - c
    assert isinstance(exact, Objective) and exact.name == "flow-matching"
    assert exact.loss(0, 0).item() < 1e-10
    wrong = FlowMatching(model=holder, sample=_point_mass, batch_size=64, seed=3,
                         velocity=lambda x, t, labels: torch.zeros_like(x))
    assert wrong.loss(5, 1).item() == wrong.loss(5, 1).item() != wrong.loss(5, 2).item()


def test_ddpm_loss_is_zero_for_the_exact_noise():
    abar = torch.linspace(0.999, 0.01, 1000)
    exact = DDPMEpsilon(model=nn.Linear(1, 1), sample=_point_mass, batch_size=64, alphas_cumprod=abar,
                        epsilon=lambda x, t, labels: (x - abar[t].sqrt()[:, None] * C) / (1 - abar[t]).sqrt()[:, None])
    assert exact.name == "ddpm" and exact.loss(0, 0).item() < 1e-9
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DDPMEpsilon(model=nn.Linear(1, 1), sample=_point_mass, batch_size=2, alphas_cumprod=torch.ones(10),
                    epsilon=lambda x, t, c: x)


def test_shifted_logit_normal_median_and_label_dropout_rate():
    t = shifted_logit_normal(200_000, 3.0, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(3.0 / 4.0, abs=0.01)  # median u = 1/2 -> s / (1 + s)
    seen = []
    objective = FlowMatching(model=nn.Linear(1, 1), sample=_point_mass, batch_size=4000, cond_dropout=0.25,
                             drop_condition=label_dropout(10),
                             velocity=lambda x, t, labels: seen.append(labels) or torch.zeros_like(x))
    objective.loss(0, 0)
    assert (seen[0] == 10).float().mean().item() == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ValueError, match="cond_dropout > 0 needs drop_condition"):
        FlowMatching(model=nn.Linear(1, 1), sample=_point_mass, batch_size=4, cond_dropout=0.1,
                     velocity=lambda x, t, c: x)
