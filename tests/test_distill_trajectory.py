"""Trajectory distillation against closed-form answers on a linear flow model.

For a velocity v(x, t) = a x, an Euler step from t to t' maps x -> (1 + (t' - t) a) x, so the
teacher's fine Euler trajectory from t_i to t_j is x * prod(1 + dt_k a). A student with its own
coefficient b_i per step reaches the same state in one step exactly when
b_i = (prod(1 + dt_k a) - 1) / (t_j - t_i): there both losses are zero, and their gradients too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samplers
from distill.objectives.trajectory import TrajectoryConfig, TrajectoryDistillation
from distill.trajectories import Trajectories, record_trajectories, snap_to_grid

A = -0.7
TEACHER_STEPS = 12


class PerStepSlope(nn.Module):
    """v(x, t) = b_i x, with b_i the coefficient of the student step whose sigma is t."""

    def __init__(self, sigmas: torch.Tensor, slopes: torch.Tensor):
        super().__init__()
        self.sigmas = sigmas
        self.slopes = nn.Parameter(slopes.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        index = (self.sigmas[:-1, None] - t[None, :]).abs().argmin(dim=0)
        return self.slopes[index].view(-1, *([1] * (x.ndim - 1))) * x


def teacher() -> samplers.Denoiser:
    return samplers.Denoiser(lambda x, t, **_: A * x, prediction_type="flow")


def recorded(tmp_path, count: int = 6) -> Trajectories:
    noise = torch.randn(count, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    sigmas = samplers.make_sigmas("flow", TEACHER_STEPS, samplers.FlowSchedule())
    return record_trajectories(teacher(), noise, {"labels": torch.arange(count)}, solver="euler", sigmas=sigmas,
                               batch_size=4, folder=tmp_path / "traj", meta={"teacher": "linear"})


def exact_slopes(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    slopes = []
    for start, end in zip(index[:-1].tolist(), index[1:].tolist()):
        product = torch.prod(1 + (grid[start + 1:end + 1] - grid[start:end]).double() * A)
        slopes.append((product - 1) / (grid[end] - grid[start]).double())
    return torch.stack(slopes).float()


def objective(tmp_path, loss: str, perturb: float = 0.0):
    trajectories = recorded(tmp_path)
    config = TrajectoryConfig(steps=3, batch_size=4, loss=loss)
    wanted = samplers.make_sigmas("flow", 3, samplers.FlowSchedule())
    index = snap_to_grid(wanted, trajectories.sigmas)
    module = PerStepSlope(trajectories.sigmas[index], exact_slopes(trajectories.sigmas, index) + perturb)
    student = samplers.Denoiser(lambda x, t, **_: module(x, t), prediction_type="flow")
    return TrajectoryDistillation("step-distill", module, student, trajectories, config, export=lambda out: out)


def test_teacher_states_follow_the_closed_form(tmp_path):
    trajectories = recorded(tmp_path)
    grid = trajectories.sigmas.double()
    factor = torch.cumprod(1 + (grid[1:] - grid[:-1]) * A, dim=0).float()
    expected = trajectories.states[:, :1] * factor.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(trajectories.states[:, 1:], expected, rtol=1e-5, atol=1e-6)
    assert trajectories.states.shape == (6, TEACHER_STEPS + 1, 1, 2, 2)
    assert trajectories.x0.shape == (6, TEACHER_STEPS, 1, 2, 2)


def test_recording_resumes_from_finished_chunks(tmp_path):
    first = recorded(tmp_path)
    calls = []
    counting = samplers.Denoiser(lambda x, t, **_: calls.append(1) or A * x, prediction_type="flow")
    again = record_trajectories(counting, first.states[:, 0], first.cond, solver="euler", sigmas=first.sigmas,
                                batch_size=4, folder=tmp_path / "traj", meta={"teacher": "linear"})
    assert calls == []
    torch.testing.assert_close(again.states, first.states)
    with pytest.raises(ValueError, match="delete it or choose another folder"):
        record_trajectories(counting, first.states[:, 0], first.cond, solver="euler", sigmas=first.sigmas,
                            batch_size=4, folder=tmp_path / "traj", meta={"teacher": "other"})


@pytest.mark.parametrize("loss", ["segments", "rollout"])
def test_exact_student_has_zero_loss_and_gradient(tmp_path, loss):
    target = objective(tmp_path, loss)
    value = target.loss(step=0, micro_batch=0)
    value.backward()
    assert float(value.detach()) < 1e-10
    assert float(target.module().slopes.grad.abs().max()) < 1e-5


@pytest.mark.parametrize("loss", ["segments", "rollout"])
def test_perturbed_student_is_pulled_back(tmp_path, loss):
    target = objective(tmp_path, loss, perturb=0.3)
    value = target.loss(step=0, micro_batch=0)
    value.backward()
    assert float(value.detach()) > 1e-4
    assert bool((target.module().slopes.grad > 0).all())  # slopes too high -> gradient pushes them down


def test_snap_to_grid_keeps_points_distinct():
    grid = torch.linspace(1, 0, 5)
    index = snap_to_grid(torch.tensor([1.0, 0.95, 0.9, 0.0]), grid)
    assert index.tolist() == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="cannot place"):
        snap_to_grid(torch.tensor([1.0, 0.1, 0.05, 0.02, 0.01, 0.0]), grid)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="evaluations a step"):
        TrajectoryConfig(solver="heun")
    with pytest.raises(ValueError, match="loss must be one of"):
        TrajectoryConfig(loss="bogus")


def test_states_between_grid_points_are_interpolated(tmp_path):
    trajectories = recorded(tmp_path)
    grid = trajectories.sigmas
    on_grid = trajectories.states_at(grid[[0, 3, 12]])
    torch.testing.assert_close(on_grid, trajectories.states[:, [0, 3, 12]])
    middle = trajectories.states_at(((grid[4] + grid[5]) / 2).reshape(1))
    torch.testing.assert_close(middle[:, 0], (trajectories.states[:, 4] + trajectories.states[:, 5]) / 2)
